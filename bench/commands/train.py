"""`python -m bench train vqvae|var|classifier|ship`: produce the embedded default with our own code."""
from __future__ import annotations

import argparse

from bench.commands._common import check_flags
from bench.errors import BenchError

ORDER = 50


def threads_range():
    """check_flags range of --threads in train and prepare: 0 keeps torch's default (run and bench-* take 1..)."""
    from bench.measure import MAX_THREADS   # lazy: --help stays instant (no torch)
    return 0, MAX_THREADS, " (0: torch default)"


def image_size_rule(what: str, vqvae=None):
    """(valid sizes as a list or range, their description) of --image-size for `train vqvae|classifier`."""
    from bench.train import DEFAULT_VQVAE, vqvae_image_size   # lazy: --help stays instant (no torch)
    if what == "vqvae":
        size = vqvae_image_size(DEFAULT_VQVAE)
        return [size], (f"{size} (the VQ-VAE's last patch side {DEFAULT_VQVAE['v_patch_nums'][-1]} x its "
                        f"downsampling {2 ** (len(DEFAULT_VQVAE['ch_mult']) - 1)})")
    if vqvae is not None:
        from bench.train import trained_vqvae_config   # lazy: --help stays instant (no torch)
        size = vqvae_image_size(trained_vqvae_config(vqvae, "--vqvae"))
        return [size], f"{size} (the image size of --vqvae {vqvae}, whose reconstructions it also trains on)"
    return range(8, 1025, 8), "a multiple of 8 in 8..1024 (the classifier pools three times by 2)"


def _physical_memory() -> int:
    """Bytes of RAM (0 where the system does not say)."""
    import os
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def check_args(a) -> None:
    """Refuse bad training arguments before any data is loaded or anything is written."""
    import math
    import os
    from bench.checkpoints import check_writable_dir   # lazy: --help stays instant (no torch)
    from bench.measure import MAX_SEED   # lazy: --help stays instant (no torch)
    if a.what == "ship":
        from bench.usermodels import NAME_RE   # lazy: --help stays instant (no torch)
        for flag in ("name", "alias"):
            v = getattr(a, flag)
            if v is not None and not NAME_RE.match(v):
                raise BenchError(f"--{flag} {v!r} must be 1-64 letters, digits, '.', '_' or '-' (not starting "
                                 "with '.', '_' or '-')")
    for flag in ("steps", "batch", "count"):
        v = getattr(a, flag, None)
        if v is not None and v < 1:
            raise BenchError(f"--{flag} must be a positive integer, got {v}")
    if getattr(a, "lr", None) is not None and not (math.isfinite(a.lr) and a.lr > 0):
        raise BenchError(f"--lr must be a finite positive number, got {a.lr}")
    check_flags(a, **{k: r for k, r in dict(seed=(0, MAX_SEED), threads=threads_range()).items() if hasattr(a, k)})
    if a.what == "var":
        from bench.train import var_shape   # lazy: --help stays instant (no torch)
        check_flags(a, depth=(1,), width_per_depth=(1,), width=(1,), heads=(1,))
        var_shape(a.depth, a.width_per_depth, a.width, a.heads)
    for flag in ("vqvae", "var", "classifier"):
        if getattr(a, flag, None) is not None:
            from bench.train import trained_meta   # lazy: --help stays instant (no torch)
            trained_meta(getattr(a, flag), flag, f"--{flag}")
    if getattr(a, "image_size", None) is not None:
        valid, rule = image_size_rule(a.what, getattr(a, "vqvae", None))
        if a.image_size not in valid:
            raise BenchError(f"--image-size must be {rule}, got {a.image_size}")
        need, have = a.count * 3 * a.image_size ** 2 * 4, _physical_memory()
        if a.data == "shapes" and have and need > have:   # the training images are held as float32 tensors
            raise BenchError(f"--count {a.count} images at --image-size {a.image_size} need {need / 2 ** 30:.0f} GiB "
                             f"as float32, more than this machine's {have / 2 ** 30:.0f} GiB; lower --count or "
                             "--image-size")
    out = getattr(a, "out", None)
    if out is not None:
        if os.path.exists(out) and not os.path.isdir(out):
            raise BenchError(f"--out {out!r} is an existing file; give a directory (new, or one to resume)")
        check_writable_dir(out, "--out")


def register(sub):
    p = sub.add_parser("train", help="train the embedded VQ-VAE, VAR or quality classifier (CPU or GPU)")
    tsub = p.add_subparsers(dest="what", metavar="WHAT", parser_class=type(p))

    def add_common(q, **defaults):
        q.add_argument("--out", required=True, help="output directory (weights, metadata, resumable state)")
        q.add_argument("--steps", type=int, default=defaults["steps"])
        q.add_argument("--batch", type=int, default=defaults["batch"])
        q.add_argument("--lr", type=float, default=defaults["lr"])
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--data", default="shapes", help="'shapes' (procedural) or an image folder DIR/<class>/*.png "
                       "(trained on its seeded class-stratified 'train' split; val/test are held out)")
        q.add_argument("--count", type=int, default=20_000, help="training images (class-stratified sample)")
        q.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                       help="mirror images left-right as augmentation (default: on for shapes, off for a folder)")
        q.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")

    q = tsub.add_parser("vqvae", help="multi-scale VQ-VAE")
    add_common(q, steps=3000, batch=32, lr=5e-4)
    q.add_argument("--image-size", type=int, default=32)
    q.set_defaults(func=_run)
    q = tsub.add_parser("var", help="VAR transformer on the VQ-VAE's tokens")
    add_common(q, steps=4000, batch=64, lr=1e-3)
    q.add_argument("--vqvae", required=True, help="trained vqvae.safetensors")
    q.add_argument("--depth", type=int, default=4)
    q.add_argument("--width-per-depth", type=int, default=32)
    q.add_argument("--width", type=int, default=None, help="embedding width (overrides --width-per-depth)")
    q.add_argument("--heads", type=int, default=None, help="attention heads (default: depth, as released)")
    q.set_defaults(func=_run)
    q = tsub.add_parser("classifier", help="quality feature extractor (offline FID/IS/PR/KID)")
    add_common(q, steps=3000, batch=128, lr=2e-3)
    q.add_argument("--vqvae", default=None, help="also train on this VQ-VAE's reconstructions")
    q.add_argument("--image-size", type=int, default=32)
    q.set_defaults(func=_run)
    q = tsub.add_parser("ship", help="copy trained weights into bench/assets and update the manifest")
    q.add_argument("--name", required=True)
    q.add_argument("--vqvae", required=True)
    q.add_argument("--var", required=True)
    q.add_argument("--classifier", default=None)
    q.add_argument("--sampling", default="cfg=1.5,top_k=0,top_p=0.0", help="default sampling, e.g. cfg=2.0,top_k=100")
    q.add_argument("--alias", default=None, help="also register this alias (e.g. default)")
    q.set_defaults(func=_run)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _run(a):
    import torch
    from bench import train   # lazy: --help stays instant (no torch)
    check_args(a)
    if getattr(a, "threads", 0):
        torch.set_num_threads(a.threads)
    if a.what == "vqvae":
        train.train_vqvae(a.out, a.steps, a.batch, a.lr, a.seed, a.data, a.count, a.image_size, hflip=a.hflip)
    elif a.what == "var":
        train.train_var(a.out, a.vqvae, a.depth, a.steps, a.batch, a.lr, a.seed, a.data, a.count, a.width_per_depth,
                        width=a.width, heads=a.heads, hflip=a.hflip)
    elif a.what == "classifier":
        train.train_classifier(a.out, a.vqvae, a.steps, a.batch, a.lr, a.seed, a.data, a.count, a.image_size,
                               hflip=a.hflip)
    elif a.what == "ship":
        from bench.usermodels import parse_sampling   # unknown keys (cfgg=2) were ignored by a parser of its own
        s = parse_sampling(a.sampling)
        train.ship(a.name, a.vqvae, a.var, a.classifier, dict(cfg=float(s.get("cfg", 1.5)), top_k=int(s.get("top_k", 0)),
                   top_p=float(s.get("top_p", 0.0))), a.alias)
    return 0
