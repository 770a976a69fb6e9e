"""`python -m bench <command>`: one module per command in bench/commands, each with `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

import bench.commands as commands
from bench import __version__
from bench.errors import BenchError
from bench.log import setup_logging


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (problem + where to look) with exit status 2, and no prefix
    matching of long options: `--reference` must never be read as an abbreviation of `--reference-count`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def program_name() -> str:
    """How the user started us: `var-bench` (the console script) or `python -m bench`."""
    base = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m bench" if base in ("__main__.py", "-m", "-c", "") or base.startswith("python") else base


class VersionAction(argparse.Action):
    """`--version`: argparse's, but the version is read only when asked for (bench.__version__ is lazy)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show program's version number and exit"):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"var-bench {__version__}", file=sys.stdout)
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Parsing imports no heavy module (torch, ray, pandas, ...): each command's register() reads only light ones
    (bench.defaults, bench.commands._common) and imports the rest when it runs (tests/test_cli_instant.py)."""
    parser = OneLineParser(prog=program_name(), description="var-bench: benchmark & ablation harness for "
                           "efficiency methods on Visual AutoRegressive (VAR) image models.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    # bench/commands/*.py but _*.py (listed directly: pkgutil.iter_modules imports inspect, ~5 ms per call)
    names = sorted({f[:-3] for d in commands.__path__ for f in os.listdir(d) if f.endswith(".py") and f[0] != "_"})
    mods = [importlib.import_module(f"bench.commands.{name}") for name in names]
    for mod in sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__)):
        mod.register(sub)
    for p in [parser, *sub.choices.values()]:   # -v / -q before or after the command
        add_verbosity_args(p)
    return parser


def add_verbosity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("messages")
    g.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more messages (debug detail, timestamps)")
    g.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                   help="fewer messages: warnings only (-qq: errors only)")


def blank_argument(argv) -> Optional[str]:
    """The first empty or blank argument, named by its option (`--out ""` would mean the working directory to some
    commands and nothing to others): none of ours takes an empty value."""
    for i, tok in enumerate(argv):
        if tok.startswith("--") and "=" in tok and not tok.split("=", 1)[1].strip():
            return tok.split("=", 1)[0]
        if not tok.strip():
            return argv[i - 1] if i and argv[i - 1].startswith("-") else f"argument {i + 1}"
    return None


def main(argv=None):
    parser = build_parser()
    blank = blank_argument(sys.argv[1:] if argv is None else list(argv))
    if blank is not None:
        print(f"error: {blank} is empty; give a value, or leave the option out for its default", file=sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", 0) - getattr(args, "quiet", 0))
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2 if argv is None and len(sys.argv) <= 1 else 0)
    try:
        rc = args.func(args)
    except BenchError as e:
        if getattr(e, "row_json", None):   # a finished measurement that could not be stored: never lose it
            print(e.row_json, flush=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc or 0)
