"""An instant CLI: parsing (`--help` of the program and of every subcommand, `--version`, argument errors) imports
no heavy module; each command imports torch & co. only when it runs. A fact about sys.modules, not a timing."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "numpy", "ray", "pandas", "matplotlib", "pyarrow", "scipy", "sklearn", "fvcore", "torch_fidelity",
         "torchmetrics", "safetensors", "PIL", "yaml")

# In one fresh interpreter: each argv as `python -m bench ARGV` (runpy, as -m does), then which heavy modules are
# loaded. The subcommands (nested ones too: `results show`, `train var`) are read from the parser itself.
CHILD = r"""
import contextlib, io, json, runpy, sys
HEAVY = %r

def heavy():
    return sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))

def cli(argv):
    sys.argv = ["bench", *argv]
    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("bench", run_name="__main__")
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()

report = {"steps": []}
report["steps"].append(["--help", *cli(["--help"]), heavy()])

import argparse
from bench.cli import build_parser

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, p in action.choices.items():
                yield (*prefix, name)
                yield from commands(p, (*prefix, name))

argvs = [[*c, "--help"] for c in commands(build_parser())]
argvs += [["--version"], ["run", "--samples", "x"], ["sample", "--bogus"], ["run", "--results", ""],
          ["bench-moe", "--dtype", "fp64"], ["nosuchcommand"]]
for argv in argvs:
    report["steps"].append([" ".join(argv), *cli(argv), heavy()])
print(json.dumps(report))
"""


def test_parsing_imports_no_heavy_module():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", CHILD % (HEAVY,)], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    steps = json.loads(p.stdout.strip().splitlines()[-1])["steps"]
    by_argv = {argv: (code, out, err, heavy) for argv, code, out, err, heavy in steps}
    for argv, (code, out, err, heavy) in by_argv.items():   # the first step that loads one names the culprit
        assert heavy == [], f"`python -m bench {argv}` imported {', '.join(heavy)}"
    helps = [a for a in by_argv if a.endswith("--help")]
    assert {"run --help", "sweep --help", "results show --help", "train var --help", "bench-moe --help",
            "bench-harness --help", "prepare --help", "report --help"} <= set(helps), helps
    for a in helps:
        code, out, err, _ = by_argv[a]
        assert code in (0, None) and out.startswith("usage: "), (a, code, err)
    assert "--dtype" in by_argv["run --help"][1] and "fp32 | bf16 | fp16" in by_argv["run --help"][1]
    code, out, _, _ = by_argv["--version"]
    assert code in (0, None) and out.startswith("var-bench ")
    for a, needle in (("run --samples x", "invalid int value: 'x'"), ("sample --bogus", "unrecognized arguments"),
                      ("run --results ", "--results is empty"), ("bench-moe --dtype fp64", "invalid choice"),
                      ("nosuchcommand", "invalid choice")):
        code, _, err, _ = by_argv[a]
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (a, code, err)
