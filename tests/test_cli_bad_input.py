"""Bad input to sample / evaluate / prepare / train: one line on stderr naming the flag and the valid values, exit
status 2, no traceback, nothing written (no --out, no cache entry, no shipped asset). Every case is refused before
any model is trained or data is loaded."""
import os

import pytest

from tests.conftest import run_cli

HUGE = "99999999999999999999"          # does not fit 64 bits
SEED_RULE = f"--seed must be in 0..{2 ** 40}"


def cli(capsys, *args):
    """The CLI in-process: (exit status, stderr)."""
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def refused(code, err, *needles):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err        # exactly one line
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("VARBENCH_CACHE", str(c))
    return c


@pytest.fixture(scope="module")
def vqvae(tmp_path_factory):
    """A VQ-VAE as `train vqvae` leaves it: weights (random) plus the metadata beside them (32 px images)."""
    import json

    from bench.checkpoints import save_state_dict
    from bench.models.vqvae import VQVAE
    from bench.train import DEFAULT_VQVAE
    d = tmp_path_factory.mktemp("vq")
    save_state_dict(VQVAE(**DEFAULT_VQVAE), str(d / "vqvae.safetensors"))
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULT_VQVAE.items()}
    (d / "vqvae.json").write_text(json.dumps(dict(kind="vqvae", config=cfg)))
    return str(d / "vqvae.safetensors")


# ------------------------------------------------------------------------------------- 1. seeds: 0..MAX_SEED
@pytest.mark.parametrize("seed", [HUGE, str(2 ** 40 + 1), "-1"])
def test_sample_seed_bounded(tmp_path, capsys, seed):
    out = tmp_path / "g.png"
    refused(*cli(capsys, "sample", "--model", "tiny", "--classes", "0", "--seed", seed, "--out", out),
            SEED_RULE, f"got {seed}")
    assert not out.exists()


def test_evaluate_seed_bounded(tmp_path, capsys, cache):
    out = tmp_path / "e.json"
    refused(*cli(capsys, "evaluate", "--model", "tiny", "--samples", 2, "--seed", HUGE, "--out", out),
            SEED_RULE, f"got {HUGE}")
    assert not out.exists() and not cache.exists()


def test_prepare_seed_bounded(tmp_path, capsys, cache):
    refused(*cli(capsys, "prepare", "dmoe", "--model", "tiny", "--seed", HUGE), SEED_RULE, f"got {HUGE}")
    refused(*cli(capsys, "prepare", "dmoe", "--model", "tiny", "--seed", "-1"), "--seed must be >= 0")
    assert not cache.exists()


@pytest.mark.parametrize("seed", [HUGE, "-5"])
@pytest.mark.parametrize("what", ["vqvae", "var", "classifier"])
def test_train_seed_bounded(tmp_path, capsys, vqvae, what, seed):
    out = tmp_path / "out"
    extra = ["--vqvae", vqvae] if what == "var" else []
    refused(*cli(capsys, "train", what, "--out", out, "--steps", 1, "--seed", seed, *extra),
            SEED_RULE, f"got {seed}")
    assert not out.exists()


# ------------------------------------------------------------------------------------- 2. threads: 0..512
def test_prepare_threads_bounded(tmp_path):
    """A real process: the old code crashed (segfault) inside torch with 100000 threads."""
    cache, out = tmp_path / "cache", tmp_path / "arts"
    for n in ("100000", "-1"):
        r = run_cli("prepare", "dmoe", "--model", "tiny", "--threads", n, "--out", out,
                    env={"VARBENCH_CACHE": str(cache)})
        refused(r.returncode, r.stderr, f"--threads must be in 0..512 (0: torch default), got {n}")
    assert not cache.exists() and not out.exists()


def test_train_threads_bounded(tmp_path, capsys):
    out = tmp_path / "out"
    refused(*cli(capsys, "train", "vqvae", "--out", out, "--steps", 1, "--threads", -1),
            "--threads must be in 0..512 (0: torch default), got -1")
    r = run_cli("train", "vqvae", "--out", out, "--steps", 1, "--threads", 100000)   # a real process, as above
    refused(r.returncode, r.stderr, "--threads must be in 0..512 (0: torch default), got 100000")
    assert not out.exists()


# ------------------------------------------------------------------------------------- 3. prepare --out a file
def test_prepare_out_must_not_be_a_file(tmp_path, capsys, cache):
    afile = tmp_path / "afile"
    afile.write_text("x")
    refused(*cli(capsys, "prepare", "dmoe", "--model", "tiny", "--out", afile), f"--out '{afile}' is an existing "
            "file; give a directory")
    assert afile.read_text() == "x" and not cache.exists() and sorted(os.listdir(tmp_path)) == ["afile"]


# ------------------------------------------------------------------------------------- 4. empty path flags
def test_train_empty_out_is_refused_up_front(tmp_path, capsys):
    import time
    t = time.time()
    refused(*cli(capsys, "train", "vqvae", "--out", "", "--steps", 1), "--out is empty")
    assert time.time() - t < 10          # no data loaded first
    refused(*cli(capsys, "train", "vqvae", "--out", "  ", "--steps", 1), "--out is empty")
    refused(*cli(capsys, "train", "var", "--out", tmp_path / "o", "--vqvae", ""), "--vqvae is empty")
    refused(*cli(capsys, "train", "classifier", "--out", tmp_path / "o", "--data", ""), "--data is empty")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,needle", [
    (["prepare", "dmoe", "--model", "tiny", "--out", ""], "--out is empty"),
    (["prepare", "dmoe", "--model", "tiny", "--data", ""], "--data is empty"),
    (["evaluate", "--model", "tiny", "--samples", 2, "--out", ""], "--out is empty"),
    (["evaluate", "--model", "tiny", "--samples", 2, "--classifier", ""], "--classifier is empty"),
    (["sample", "--var-ckpt", "", "--vae-ckpt", ""], "--var-ckpt is empty"),
])
def test_empty_path_flags_are_refused(tmp_path, capsys, cache, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)          # an empty path would have meant this directory
    refused(*cli(capsys, *args), needle)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- 5. VAR shape
@pytest.mark.parametrize("args,needle", [
    (["--depth", 0], "--depth must be >= 1, got 0"),
    (["--depth", -2], "--depth must be >= 1, got -2"),
    (["--width", -5], "--width must be >= 1, got -5"),
    (["--width", 0], "--width must be >= 1, got 0"),
    (["--width-per-depth", 0], "--width-per-depth must be >= 1, got 0"),
    (["--heads", 0], "--heads must be >= 1, got 0"),
    (["--width", 7], "--width 7 is divisible neither by --depth 4"),
    (["--width", 128, "--heads", 3], "--width 128 is not divisible by --heads 3; valid --heads: a divisor of 128"),
    (["--depth", 3, "--width-per-depth", 32, "--heads", 5], "width 96 (--width-per-depth 32 x --depth 3) is not "
                                                           "divisible by --heads 5"),
])
def test_train_var_shape_checked_before_writing(tmp_path, capsys, vqvae, args, needle):
    out = tmp_path / "out"
    refused(*cli(capsys, "train", "var", "--vqvae", vqvae, "--out", out, "--steps", 1, *args), needle)
    assert not out.exists()


def test_var_shape_library():
    from bench.errors import BenchError
    from bench.train import var_shape
    assert var_shape(4) == (128, 4) and var_shape(6, width=128) == (128, 4) and var_shape(2, width=64, heads=8) \
        == (64, 8)
    with pytest.raises(BenchError, match="--depth must be >= 1"):
        var_shape(0)


# ------------------------------------------------------------------------------------- 6. image size
@pytest.mark.parametrize("what,size,needle", [
    ("classifier", 99999, "--image-size must be a multiple of 8 in 8..1024"),
    ("classifier", 4, "--image-size must be a multiple of 8 in 8..1024"),
    ("classifier", 12, "--image-size must be a multiple of 8 in 8..1024"),
    ("vqvae", 99999, "--image-size must be 32 (the VQ-VAE's last patch side 8 x its downsampling 4)"),
    ("vqvae", 64, "--image-size must be 32"),
])
def test_train_image_size_bounded(tmp_path, capsys, what, size, needle):
    out = tmp_path / "out"
    refused(*cli(capsys, "train", what, "--out", out, "--image-size", size), needle, f"got {size}")
    assert not out.exists()


def test_train_classifier_image_size_matches_its_vqvae_and_memory(tmp_path, capsys, vqvae, monkeypatch):
    out = tmp_path / "out"
    refused(*cli(capsys, "train", "classifier", "--vqvae", vqvae, "--out", out, "--image-size", 64),
            "--image-size must be 32 (the image size of --vqvae", "got 64")
    import bench.commands.train as T
    monkeypatch.setattr(T, "_physical_memory", lambda: 8 * 2 ** 30)
    refused(*cli(capsys, "train", "classifier", "--out", out, "--image-size", 1024),
            "--count 20000 images at --image-size 1024 need 234 GiB as float32, more than this machine's 8 GiB")
    assert not out.exists()


# ------------------------------------------------------------------------------------- 7. ship
def _assets():
    from bench.shipped import ASSETS, MANIFEST
    with open(MANIFEST, "rb") as f:
        return sorted(os.listdir(ASSETS)), f.read()


@pytest.mark.parametrize("make,needle", [
    (lambda vq, t: ["--vqvae", "/nope", "--var", "/nope"], "--vqvae: file not found: /nope"),
    (lambda vq, t: ["--vqvae", vq, "--var", "/nope"], "--var: file not found: /nope"),
    (lambda vq, t: ["--vqvae", vq, "--var", vq], "holds a vqvae, not a var"),
    (lambda vq, t: ["--vqvae", t, "--var", vq], "has no training metadata beside it"),
    (lambda vq, t: ["--vqvae", vq, "--var", vq, "--name", "../x"], "--name '../x' must be 1-64 letters"),
])
def test_ship_checks_its_inputs_first(tmp_path, capsys, vqvae, make, needle):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(b"")
    args = make(vqvae, lone)
    if "--name" not in args:
        args += ["--name", "x"]
    before = _assets()
    refused(*cli(capsys, "train", "ship", *args), needle)
    assert _assets() == before


def test_sampling_settings_unknown_or_twice_are_refused():
    """`train ship --sampling` had a parser of its own that ignored unknown keys (cfgg=2); it and `register` now
    share one that also refuses a key given twice (cfg=3,cfg=4 kept the last)."""
    from bench.errors import BenchError
    from bench.usermodels import parse_sampling
    assert parse_sampling("cfg=3.0,top_k=100,top_p=0.95") == dict(cfg=3.0, top_k=100, top_p=0.95)
    with pytest.raises(BenchError, match=r"bad item 'cfgg=2'; valid keys: cfg, top_k, top_p"):
        parse_sampling("cfgg=2")
    with pytest.raises(BenchError, match=r"--sampling: cfg given twice; give it once"):
        parse_sampling("cfg=3,cfg=4")
