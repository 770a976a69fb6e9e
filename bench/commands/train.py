"""`python -m bench train vqvae|var|classifier|ship`: produce the embedded default with our own code."""
from __future__ import annotations

import argparse

ORDER = 50


def _kv(text: str) -> dict:
    from bench.errors import BenchError
    out = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = float(v) if "." in v else int(v)
        except ValueError:
            raise BenchError(f"--sampling: {part!r} is not KEY=NUMBER; valid keys: cfg, top_k, top_p "
                             "(e.g. cfg=2.0,top_k=100,top_p=0.95)") from None
    return out


def check_args(a) -> None:
    """Refuse bad training arguments before any data is loaded or anything is written."""
    import math
    import os
    from bench.checkpoints import check_writable_dir
    from bench.errors import BenchError
    for flag in ("steps", "batch", "count"):
        v = getattr(a, flag, None)
        if v is not None and v < 1:
            raise BenchError(f"--{flag} must be a positive integer, got {v}")
    if getattr(a, "lr", None) is not None and not (math.isfinite(a.lr) and a.lr > 0):
        raise BenchError(f"--lr must be a finite positive number, got {a.lr}")
    if getattr(a, "threads", 0) < 0:
        raise BenchError(f"--threads must be >= 0 (0: torch default), got {a.threads}")
    if getattr(a, "image_size", 1) < 1:
        raise BenchError(f"--image-size must be a positive integer, got {a.image_size}")
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
    from bench import train
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
        s = _kv(a.sampling)
        train.ship(a.name, a.vqvae, a.var, a.classifier, dict(cfg=float(s.get("cfg", 1.5)), top_k=int(s.get("top_k", 0)),
                   top_p=float(s.get("top_p", 0.0))), a.alias)
    return 0
