"""`python -m bench sample`: a labelled grid of class-conditional samples."""
from __future__ import annotations

from bench.commands._common import (add_model_args, add_sampling_args, bundle_from_args, check_flags,
                                    check_writable_file, parse_classes, sampling_from_args)

from bench.grid import save_grid

ORDER = 10


def register(sub):
    p = sub.add_parser("sample", help="generate a labelled image grid (embedded default or official weights)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated class indices (one row each)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (columns)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="output image (.png or .jpg)")
    p.set_defaults(func=run)


def run(a):
    import torch
    from bench.sampling import generate   # lazy: --help stays instant (no torch)
    from bench.measure import MAX_SEED   # lazy: --help stays instant (no torch)
    check_writable_file(a.out, (".png", ".jpg", ".jpeg"), "--out")
    check_flags(a, per_class=(1, 64), seed=(0, MAX_SEED))
    bundle = bundle_from_args(a)
    classes = parse_classes(a.classes, bundle.num_classes)
    sampling = sampling_from_args(a, bundle)
    labels = torch.tensor([c for c in classes for _ in range(a.per_class)])
    gen = generate(bundle.var, bundle.vqvae, labels, a.seed, sampling)
    names = [bundle.class_names[c] if c < len(bundle.class_names) else str(c) for c in classes]
    save_grid(gen.images.cpu(), rows=len(classes), row_labels=[f"{c}: {n}" for c, n in zip(classes, names)],
              path=a.out, title=f"{bundle.name} | cfg={sampling.cfg} top_k={sampling.top_k} top_p={sampling.top_p} seed={a.seed}")
    print(f"wrote {a.out} ({len(labels)} samples of {bundle.model_id})")
    return 0
