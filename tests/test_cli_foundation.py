"""`python -m bench sample` end to end, and bad input: one line, exit 2, nothing written."""
import os

import pytest
import torch

from tests.conftest import run_cli


def test_help_lists_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("sample", "train"):
        assert cmd in r.stdout


def test_version_and_program_name():
    import shutil
    import subprocess
    import sys
    from bench import __version__
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"var-bench {__version__}" and __version__ != "0+unknown"
    assert run_cli("--help").stdout.startswith("usage: python -m bench ")
    script = shutil.which("var-bench", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.fail("the var-bench console script is not installed beside this python (pip install -e .)")
    p = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("usage: var-bench ")
    p = subprocess.run([script, "run", "--bogus"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.startswith("error: var-bench: unrecognized arguments: --bogus")


def test_sample_writes_a_grid(tmp_path):
    out = tmp_path / "grid.png"
    r = run_cli("sample", "--model", "tiny", "--classes", "0,1,2", "--per-class", "2", "--seed", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    im = Image.open(out)
    assert im.size[0] > 3 * 96 and im.size[1] > 3 * 96


@pytest.mark.parametrize("args,needle", [
    (("--model", "nope"), "unknown model 'nope'; valid:"),
    (("--model", "tiny", "--classes", "0,12"), "class index 12 out of range; valid: 0..9"),
    (("--model", "tiny", "--top-k", "100000"), "--top-k must be in [0, 64]"),
    (("--var-ckpt", "/nonexistent/var.pth", "--vae-ckpt", "/nonexistent/vae.pth"), "VAR checkpoint not found"),
    (("--model", "tiny", "--bogus",), "unrecognized arguments: --bogus"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, args, needle):
    out = tmp_path / "g.png"
    r = run_cli("sample", *args, "--out", out)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def test_mismatched_and_corrupt_checkpoints(tmp_path):
    from tests.test_models import official_var_state_dict
    sd = official_var_state_dict(depth=1)
    sd["blocks.0.ffn.fc1.weight"] = torch.zeros(3, 64)
    bad = tmp_path / "var_bad.pth"
    torch.save(sd, bad)
    corrupt = tmp_path / "vae.pth"
    corrupt.write_bytes(b"\x00garbage")
    before = set(os.listdir(tmp_path))
    r = run_cli("sample", "--var-ckpt", bad, "--vae-ckpt", corrupt, "--out", tmp_path / "g.png")
    assert r.returncode == 2 and "shape clashes" in r.stderr and "blocks.0.ffn.fc1.weight (3, 64) vs (256, 64)" in r.stderr
    sd = official_var_state_dict(depth=1)
    good = tmp_path / "var_good.pth"
    torch.save(sd, good)
    r = run_cli("sample", "--var-ckpt", good, "--vae-ckpt", corrupt, "--out", tmp_path / "g.png")
    assert r.returncode == 2 and "cannot read VQ-VAE checkpoint" in r.stderr
    r = run_cli("sample", "--var-ckpt", good, "--vae-ckpt", corrupt, "--patch-nums", "1,2,3", "--out", tmp_path / "g.png")
    assert r.returncode == 2 and "tokens but the VAR checkpoint has 680" in r.stderr
    assert set(os.listdir(tmp_path)) == before | {"var_good.pth"}


def test_no_parser_matches_option_prefixes():
    """argparse's prefix matching read `evaluate --reference DIR` as `--reference-count DIR`; every parser of
    the command line (sub-commands, their sub-commands, prepare's per-method parsers) refuses abbreviations."""
    import argparse
    from bench.cli import OneLineParser, build_parser
    from bench.commands.prepare import method_parser, preparable_methods
    from bench.registry import method_class

    def walk(p):
        yield p
        for act in p._actions:
            if isinstance(act, argparse._SubParsersAction):
                for q in act.choices.values():
                    yield from walk(q)
    parsers = list(walk(build_parser()))
    parsers += [method_parser(m, method_class(m), OneLineParser) for m in preparable_methods()]
    assert len(parsers) > 15 and all(p.allow_abbrev is False for p in parsers), \
        [p.prog for p in parsers if p.allow_abbrev is not False]
    a = build_parser().parse_args(["run", "--model", "tiny", "--reference", "some/dir"])
    assert a.reference == "some/dir" and a.reference_count is None
    r = run_cli("bench-harness", "--model", "tiny", "--reference", "5")   # it has only --reference-count
    assert r.returncode == 2 and "unrecognized arguments: --reference 5" in r.stderr, r.stderr
