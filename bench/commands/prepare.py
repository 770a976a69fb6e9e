"""`python -m bench prepare <method> [options]`: make a method's cached artifacts (fine-tunes, splits, routers).

Generic: it dispatches to any registered method (methods/*.py) that declares a prepare recipe and hook; the list
of such methods is the list of valid names. `python -m bench prepare <method> --help` shows that method's options.

Prepare protocol (on the bench.registry.Method subclass):

    recipe = Recipe(Setting(Param(...), ...), ...)   # bench.recipe: the flags, their checks, the artifact keys
    @classmethod
    def prepare(cls, bundle, values, out_root, data=None, force=False) -> str | list[str]:
        ...                                   # returns the artifact directory (or directories) it wrote/reused

The method's flags come from its recipe (one per setting, checked before the model loads: a bad value is one line,
exit 2). Before loading the model the command also builds the method from the recipe's method parameters, so
cross-parameter checks run first too. It adds the common options itself: the model (--model / --var-ckpt /
--vae-ckpt / --depth / --patch-nums / --device), --data ('shapes' or an image folder; default: the model's own
dataset), --force, --out (artifact root) and --threads. `values` are the recipe's settings by name; `out_root`
is the --out directory, or None for the user cache (`$VARBENCH_CACHE/artifacts`, default
~/.cache/var-bench/artifacts), which is where bench.artifacts.find_artifact looks first; give
`--out bench/assets/artifacts` to make the copies shipped with the repo. The hook must check everything that
needs the model before writing anything, write each artifact directory atomically with DONE last
(bench.artifacts.write_artifact), and record in its metadata what made it (recorded settings, seed, command,
losses). Example: methods/dmoe.py.
"""
from __future__ import annotations

import argparse
import os
import time

from bench.cli import OneLineParser, add_verbosity_args
from bench.commands._common import add_model_args, bundle_from_args, check_flags
from bench.commands.train import threads_range
from bench.errors import BenchError
from bench.log import setup_logging
from bench.registry import list_methods, method_class

ORDER = 40


def register(sub):
    p = sub.add_parser("prepare", help="make a method's prepared artifacts (e.g. dmoe: fine-tune, experts, routers)",
                       description="Make a method's cached artifacts. `python -m bench prepare METHOD --help` lists "
                                   "the method's options.")
    p.add_argument("method", nargs="?", help="a method with a prepare step (run without one to list them)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def preparable_methods():
    return [n for n in list_methods() if callable(getattr(method_class(n), "prepare", None))
            and getattr(method_class(n), "recipe", None) is not None]


def method_parser(name: str, cls, parser_class):
    q = parser_class(prog=f"python -m bench prepare {name}",
                     description=(cls.description or name) + " — prepare its artifacts.")
    add_model_args(q)
    q.add_argument("--out", default=None, help="artifact root (default: $VARBENCH_CACHE/artifacts, "
                   "~/.cache/var-bench/artifacts; bench/assets/artifacts to ship)")
    q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    q.add_argument("--data", default=None, help="'shapes' or an image folder (default: the model's dataset)")
    q.add_argument("--force", action="store_true", help="redo even if a matching artifact exists")
    cls.recipe.add_arguments(q)
    add_verbosity_args(q)          # -v / -q after the method name too
    return q


IMAGENET_CLASSES = 1000


def check_data_classes(data, bundle) -> None:
    """A folder's classes become labels 0..k-1 in sorted order: more of them than the model has would run past
    its class embedding (the row after the last class is the unconditional label)."""
    if data is None or data == "shapes":
        return
    import re
    from bench.data import folder_data   # lazy: --help stays instant (no torch)
    classes = folder_data(data).classes
    n = len(classes)
    if n > bundle.num_classes:
        raise BenchError(f"--data {data} has {n} classes but model {bundle.name} has {bundle.num_classes}; give a "
                         f"folder with at most {bundle.num_classes} class subfolders (they become labels "
                         f"0..k-1 in sorted order)")
    # ImageNet's labels are its 1000 synsets in sorted order: only the whole set gives every folder its own label
    if bundle.num_classes == IMAGENET_CLASSES and n < IMAGENET_CLASSES \
            and all(re.fullmatch(r"n\d{8}", c) for c in classes):
        raise BenchError(f"--data {data} holds {n} of ImageNet's {IMAGENET_CLASSES} class folders (n0...): they "
                         f"would get labels 0..{n - 1}, not their ImageNet labels, and {bundle.name} would be "
                         f"calibrated on the wrong classes; give ImageNet's train/ folder with all "
                         f"{IMAGENET_CLASSES} class folders (calibration takes a class-stratified sample of it)")


def check_seeds(recipe, values) -> None:
    """A recipe's seeds (a setting named *seed) are bounded like every seed of the bench (0..MAX_SEED): a larger
    one overflows torch's 64-bit generator seed mid-run."""
    from types import SimpleNamespace

    from bench.measure import MAX_SEED   # lazy: --help stays instant (no torch)
    for s in recipe.settings:
        if s.name.endswith("seed"):
            v = values[s.name]
            for one in (v if isinstance(v, (list, tuple)) else [v]):
                check_flags(SimpleNamespace(**{s.dest: one}), **{s.dest: (0, MAX_SEED)})


def run(a):
    valid = preparable_methods()
    if a.method is None:
        raise BenchError(f"prepare needs a method; valid: {', '.join(valid) or '(none)'}")
    if a.method not in list_methods():
        raise BenchError(f"unknown method {a.method!r}; valid: {', '.join(valid) or '(none)'}")
    cls = method_class(a.method)
    if a.method not in valid:
        raise BenchError(f"method {a.method!r} needs no preparation; methods with a prepare step: "
                         f"{', '.join(valid) or '(none)'}")
    args = method_parser(a.method, cls, OneLineParser).parse_args(a.rest)
    if hasattr(args, "verbose") or hasattr(args, "quiet"):
        setup_logging(getattr(a, "verbose", 0) + getattr(args, "verbose", 0)
                      - getattr(a, "quiet", 0) - getattr(args, "quiet", 0))
    check_flags(args, threads=threads_range())
    out_root = None
    if args.out is not None:
        out_root = os.path.abspath(args.out)
        if os.path.exists(out_root) and not os.path.isdir(out_root):
            raise BenchError(f"--out {args.out!r} is an existing file; give a directory (the artifact root)")
        parent = out_root if os.path.isdir(out_root) else os.path.dirname(out_root)
        if not os.path.isdir(parent):
            raise BenchError(f"--out: directory does not exist: {parent}")
        if not os.access(parent, os.W_OK):
            raise BenchError(f"--out: directory is not writable: {parent}")
    if args.data is not None and args.data != "shapes" and not os.path.isdir(args.data):
        raise BenchError(f"--data: image folder not found: {args.data}; valid: 'shapes' or an image folder")
    values = cls.recipe.from_args(args, cls)
    check_seeds(cls.recipe, values)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = bundle_from_args(args)
    check_data_classes(args.data, bundle)
    t0 = time.time()
    dirs = cls.prepare(bundle, values, out_root, data=args.data, force=args.force)
    dirs = [dirs] if isinstance(dirs, str) else list(dirs)
    for d in dirs:
        print(d)
    print(f"prepared {a.method} for {bundle.model_id} in {time.time() - t0:.1f}s ({len(dirs)} artifact"
          f"{'s' if len(dirs) != 1 else ''})")
    return 0
