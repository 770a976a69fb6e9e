"""`python -m bench register`: make trained weights a named model in $VARBENCH_HOME/models/<name>/."""
from __future__ import annotations

ORDER = 51


def register(sub):
    p = sub.add_parser("register", help="register your trained VQ-VAE + VAR (+ classifier) as a named model in "
                                        "$VARBENCH_HOME/models/NAME (then --model NAME everywhere)")
    p.add_argument("--name", required=True, help="model name (must not clash with a shipped model)")
    p.add_argument("--vqvae", required=True, help="vqvae.safetensors from `train vqvae`")
    p.add_argument("--var", required=True, help="var.safetensors from `train var`")
    p.add_argument("--classifier", default=None, help="classifier.safetensors from `train classifier` (the quality "
                                                      "extractor and class accuracy of this model)")
    p.add_argument("--sampling", default="cfg=3.0,top_k=100,top_p=0.95",
                   help="default sampling of the model (default: the shipped default's)")
    p.add_argument("--reference", default=None, help="a separate held-out image folder with the model's classes "
                   "(default: the held-out 'val' split of the training folder)")
    p.add_argument("--force", action="store_true", help="replace a model of this name you registered before")
    p.set_defaults(func=run)


def run(a):
    from bench.usermodels import parse_sampling, register_model   # lazy: --help stays instant (no torch)
    d = register_model(a.name, a.vqvae, a.var, a.classifier, parse_sampling(a.sampling), a.reference, a.force)
    print(f"registered {a.name} in {d}; use --model {a.name}")
    return 0
