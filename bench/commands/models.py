"""`python -m bench models`: the embedded models and what they were trained with."""
from __future__ import annotations

ORDER = 5


def register(sub):
    p = sub.add_parser("models", help="list the embedded models (official weights load from paths)")
    p.set_defaults(func=run)


def run(a):
    from bench.zoo import BUILTIN, read_manifest   # lazy: --help stays instant (no torch)
    m = read_manifest()
    aliases = {v: k for k, v in m.get("aliases", {}).items()}
    print(f"{'name':<14}{'alias':<10}{'depth':>6}{'width':>7}{'params':>9}  scales / sampling")
    for name, e in sorted(m.get("models", {}).items()):
        c = e["var_config"]
        params = 0
        from bench.models.var import VAR, VARConfig   # lazy: --help stays instant (no torch)
        import torch
        with torch.device("meta"):
            params = sum(p.numel() for p in VAR(VARConfig(**{**c, "patch_nums": tuple(c["patch_nums"])})).parameters())
        print(f"{name:<14}{aliases.get(name, ''):<10}{c['depth']:>6}{c['embed_dim']:>7}{params / 1e6:>8.2f}M  "
              f"{tuple(c['patch_nums'])} / {e.get('sampling')}")
    for name in BUILTIN:
        print(f"{name:<14}{'':<10}{'':>6}{'':>7}{'':>9}  random weights, for tests and smoke runs")
    # lazy: --help stays instant (no torch)
    from bench.usermodels import list_user_models, models_dir, read_user_manifest
    for name in list_user_models():
        e = read_user_manifest(name)
        c, ds = e["var_config"], e["dataset"]
        print(f"{name:<14}{'(yours)':<10}{c['depth']:>6}{c['embed_dim']:>7}{'':>9}  {tuple(c['patch_nums'])} / "
              f"{e.get('sampling')} / data {ds.get('path', ds['name'])}")
    print(f"your models: {models_dir()} (VARBENCH_HOME; `python -m bench register`)")
    print("official releases: --var-ckpt var_d16.pth --vae-ckpt vae_ch160v4096z32.pth [--depth N]")
    return 0
