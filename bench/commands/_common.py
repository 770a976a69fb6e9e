"""Arguments shared by commands: which model, which sampling settings, which device."""
from __future__ import annotations

import os

from bench.defaults import DEFAULT_BATCH_SIZE, DEFAULT_DTYPE, DTYPE_NAMES
from bench.errors import BenchError

# Only torch-free modules at module level: every command's register() reads this module, and parsing (--help,
# --version, argument errors) must not import torch (tests/test_cli_instant.py). Heavy modules load in the functions.


def check_device(device):
    """bench.env.check_device (the library's check, used by commands through here), imported when called."""
    from bench.env import check_device   # lazy: --help stays instant (no torch)
    return check_device(device)


def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="embedded model name (see `python -m bench models`; default: "
                   "default); not with --var-ckpt/--vae-ckpt")
    g.add_argument("--var-ckpt", default=None, help="official var_d*.pth (or VARBENCH_VAR_CKPT)")
    g.add_argument("--vae-ckpt", default=None, help="official vae_ch160v4096z32.pth (or VARBENCH_VAE_CKPT)")
    g.add_argument("--depth", type=int, default=None, help="official VAR depth (default: read from the checkpoint)")
    g.add_argument("--patch-nums", default=None, help="official weights: token-map sides, e.g. 1,2,3,4,5,6,8,10,13,16")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")


def add_sampling_args(p):
    g = p.add_argument_group("sampling (default: the model's own)")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance strength")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--more-smooth", action="store_true", help="Gumbel-softmax smoothing (visualisation only)")


def add_dtype_arg(p):
    p.add_argument("--dtype", default=DEFAULT_DTYPE, help=f"{' | '.join(DTYPE_NAMES)}: autocast of the VAR transformer "
                   "forward (sampling and VQ-VAE decode stay float32; the paired dense side runs in the same dtype; "
                   "default %(default)s)")


def add_benchmark_args(p, samples: int, samples_help: str = "N images"):
    """The options the bench-* timing commands share: model, sampling, dtype, N images, batch size, seed, torch
    threads."""
    add_model_args(p)
    add_sampling_args(p)
    add_dtype_arg(p)
    p.add_argument("--samples", type=int, default=samples, help=f"{samples_help} (default {samples})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def check_benchmark_args(a, **ranges) -> None:
    """Check the shared bench-* options and the command's own integer flags (`ranges`, as check_flags), normalise
    --dtype (checked against --device), then set torch's threads."""
    import torch
    from bench.measure import MAX_SEED, MAX_THREADS   # lazy: --help stays instant (no torch)
    from bench.precision import check_dtype   # lazy: --help stays instant (no torch)
    check_flags(a, samples=(1,), batch_size=(1,), seed=(0, MAX_SEED), threads=(1, MAX_THREADS), **ranges)
    a.dtype = check_dtype(a.dtype, check_device(a.device))
    if a.threads is not None:
        torch.set_num_threads(a.threads)


def bundle_from_args(a):
    from bench.zoo import load_model   # lazy: --help stays instant (no torch)
    ckpts = [f for f, v in (("--var-ckpt", a.var_ckpt), ("--vae-ckpt", a.vae_ckpt),
                            ("VARBENCH_VAR_CKPT", os.environ.get("VARBENCH_VAR_CKPT")),
                            ("VARBENCH_VAE_CKPT", os.environ.get("VARBENCH_VAE_CKPT"))) if v]
    if a.model is not None and ckpts:   # the checkpoints would win and --model be ignored without a word
        raise BenchError(f"--model {a.model} and {' / '.join(ckpts)} name two models; valid: --model NAME (an "
                         f"embedded or registered model) or official checkpoints, not both")
    return load_model(a.model or "default", a.var_ckpt, a.vae_ckpt, a.depth, check_device(a.device), a.patch_nums)


def check_flags(a, **ranges) -> None:
    """One line per bad integer flag, first bad one wins: check_flags(a, samples=(1,), seed=(0, MAX)) checks
    a.samples >= 1 and 0 <= a.seed <= MAX; a flag left as None is not checked; a third item explains the bound."""
    for name, (low, *rest) in ranges.items():
        v = getattr(a, name)
        high = rest[0] if rest else None
        note = rest[1] if len(rest) > 1 else ""
        if v is not None and (v < low or (high is not None and v > high)):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise BenchError(f"--{name.replace('_', '-')} must be {bound}{note}, got {v}")


def sampling_from_args(a, bundle):
    from dataclasses import replace
    from bench.sampling import validate_sampling   # lazy: --help stays instant (no torch)
    s = bundle.sampling
    if a.cfg is not None:
        s = replace(s, cfg=a.cfg)
    if a.top_k is not None:
        s = replace(s, top_k=a.top_k)
    if a.top_p is not None:
        s = replace(s, top_p=a.top_p)
    if getattr(a, "more_smooth", False):
        s = replace(s, more_smooth=True)
    validate_sampling(s, bundle.var.V)
    return s


def parse_classes(text: str, num_classes: int):
    try:
        cls = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise BenchError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not cls:
        raise BenchError("--classes is empty")
    bad = [c for c in cls if not 0 <= c < num_classes]
    if bad:
        raise BenchError(f"class index {bad[0]} out of range; valid: 0..{num_classes - 1}")
    return cls


def check_writable_file(path: str, exts=None, flag: str = "output") -> None:
    """Fail before any work if the output file cannot be written: a wrong extension, a directory at the path, a
    missing or read-only directory. The directory is tried with a probe file (created and removed at once), so a
    read-only filesystem or one that refuses new files (/proc) is found even where os.access says yes (root)."""
    import tempfile
    if exts and not path.lower().endswith(tuple(exts)):
        raise BenchError(f"{flag} {path!r} must end with one of {', '.join(exts)}")
    if os.path.isdir(path):
        name = "out" + (exts[0] if exts else "")
        raise BenchError(f"{flag} {path!r} is a directory; give a file path, e.g. {os.path.join(path, name)}")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise BenchError(f"{flag} {path!r} exists and is not a regular file; give a file path")
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise BenchError(f"output directory does not exist: {d} ({flag} {path})")
    if not os.access(d, os.W_OK | os.X_OK):
        raise BenchError(f"output directory is not writable: {d} ({flag} {path})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".varbench-probe-", dir=d)
    except OSError as e:
        raise BenchError(f"output directory is not writable: {d} ({flag} {path}: {e.strerror or e})") from None
    os.close(fd)
    os.remove(probe)
