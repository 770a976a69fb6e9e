"""Models the harness can run: the embedded defaults shipped in bench/assets, or official releases from paths.

    bundle = load_model("default")                               # embedded, trained by our own commands
    bundle = load_model(var_ckpt="var_d16.pth", vae_ckpt="vae_ch160v4096z32.pth")   # official, depth inferred

Paths may also come from VARBENCH_VAR_CKPT / VARBENCH_VAE_CKPT / VARBENCH_DEPTH.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from bench.checkpoints import check_compatible, file_sha256, read_state_dict
from bench.data import SHAPES_CLASSES
from bench.errors import BenchError
from bench.models.var import VAR, VARConfig
from bench.models.vqvae import OFFICIAL_VQVAE, VQVAE
from bench.sampling import SamplingConfig
from bench.shipped import ASSETS, BUILTIN, read_manifest, shipped_names
from bench.usermodels import list_user_models, read_user_manifest

OFFICIAL_SAMPLING = SamplingConfig(cfg=1.5, top_k=900, top_p=0.96)  # the VAR paper's FID setting
OFFICIAL_DEPTHS = (16, 20, 24, 30)


@dataclass
class ModelBundle:
    name: str
    model_id: str              # stable id used in cache keys and result rows
    var: VAR
    vqvae: VQVAE
    sampling: SamplingConfig   # the model's default sampling settings
    class_names: List[str]
    image_size: int
    source: str                # "embedded" | "official"
    dataset: Optional[dict] = None      # for embedded models: how to render the reference set
    classifier: Optional[str] = None    # path of the shipped feature-extractor weights
    files: Dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.var.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.var.parameters()).device


def list_models() -> List[str]:
    return sorted(shipped_names() + list_user_models())


def tiny_bundle(seed: int = 0, depth: int = 2, embed_dim: int = 32, device="cpu") -> ModelBundle:
    """A deterministic random-weight VAR (d2, C=32) + VQ-VAE on the default's scales and 32px images.

    Quality numbers are meaningless; everything else (sampling, FLOPs, timing, methods) runs for real."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        vq = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                   v_patch_nums=(1, 2, 3, 4, 5, 6, 8))
        cfg = VARConfig(depth=depth, embed_dim=embed_dim, num_heads=2, vocab_size=64, Cvae=8, num_classes=10,
                        patch_nums=(1, 2, 3, 4, 5, 6, 8))
        var = VAR(cfg).init_weights()
        with torch.no_grad():  # break the init's symmetry so that logits depend on the input
            for p in var.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    classifier = None
    m = read_manifest()
    for entry in m.get("models", {}).values():
        if "classifier" in entry.get("files", {}):
            classifier = os.path.join(ASSETS, entry["files"]["classifier"])
            break
    return ModelBundle(name="tiny", model_id=f"tiny-s{seed}-d{depth}-c{embed_dim}", var=var.to(device).eval(),
                       vqvae=frozen(vq, device), sampling=SamplingConfig(cfg=1.5, top_k=0, top_p=0.0),
                       class_names=list(SHAPES_CLASSES), image_size=32, source="builtin",
                       dataset=dict(name="shapes", classes=list(SHAPES_CLASSES), image_size=32,
                                    reference_split="val"), classifier=classifier)


def frozen(vq: VQVAE, device) -> VQVAE:
    """The VQ-VAE as the release runs it: eval mode and parameters frozen (with trainable ones `more_smooth`
    images differed from the release's by up to 1e-3)."""
    return vq.to(device).eval().requires_grad_(False)


def resolve_name(name: str) -> str:
    m = read_manifest()
    if name in BUILTIN:
        return name
    name = m.get("aliases", {}).get(name, name)
    if name not in m.get("models", {}) and name not in list_user_models():
        valid = list_models()
        hint = "; or give --var-ckpt/--vae-ckpt for official weights"
        raise BenchError(f"unknown model {name!r}; valid: {', '.join(valid) if valid else '(none shipped)'}{hint}")
    return name


def _build_vqvae(cfg: dict) -> VQVAE:
    return VQVAE(**cfg)


def load_embedded(name: str, device="cpu") -> ModelBundle:
    name = resolve_name(name)
    if name == "tiny":
        return tiny_bundle(device=device)
    entry = read_manifest()["models"].get(name)
    source, paths = "embedded", None
    if entry is None:   # a model the user registered ($VARBENCH_HOME/models/<name>/)
        entry = read_user_manifest(name)
        source, paths = "user", entry["paths"]
    vcfg = dict(entry["vqvae_config"])
    vq = _build_vqvae(vcfg)
    var_cfg = VARConfig(**{**entry["var_config"], "patch_nums": tuple(entry["var_config"]["patch_nums"])})
    var = VAR(var_cfg)
    paths = paths or {k: os.path.join(ASSETS, entry["files"][k]) for k in entry["files"]}
    for module, key, desc in ((vq, "vqvae", "the VQ-VAE"), (var, "var", f"VAR(depth={var_cfg.depth})")):
        sd = read_state_dict(paths[key], f"{key} checkpoint")
        check_compatible(module, sd, f"{key} checkpoint {paths[key]}", desc)
        module.load_state_dict(sd, strict=True)
    check_patch_nums(var, vq)
    s = entry.get("sampling", {})
    return ModelBundle(
        name=name, model_id=f"{name}-{entry['sha256']['var'][:8]}", var=var.to(device).eval(),
        vqvae=frozen(vq, device), sampling=SamplingConfig(**s), class_names=list(entry["dataset"]["classes"]),
        image_size=vq.image_size, source=source, dataset=entry["dataset"],
        classifier=paths.get("classifier"), files=paths)


def infer_official_depth(sd) -> int:
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    if not blocks:
        raise BenchError("VAR checkpoint has no 'blocks.N.*' keys; is it a VAR state dict?")
    return max(blocks) + 1


def check_patch_nums(var: VAR, vq: VQVAE) -> None:
    if tuple(var.patch_nums) != tuple(vq.v_patch_nums):
        raise BenchError(f"patch sizes of the VAR {tuple(var.patch_nums)} and the VQ-VAE {tuple(vq.v_patch_nums)} differ")
    if var.Cvae != vq.Cvae or var.V != vq.vocab_size:
        raise BenchError(f"VAR expects Cvae={var.Cvae}, V={var.V} but the VQ-VAE has Cvae={vq.Cvae}, V={vq.vocab_size}")


def parse_patch_nums(text) -> Tuple[int, ...]:
    try:
        pns = tuple(int(x) for x in str(text).replace("_", ",").split(",") if x.strip())
    except ValueError:
        raise BenchError(f"--patch-nums must be comma-separated integers, got {text!r}") from None
    if not pns or any(p < 1 for p in pns) or list(pns) != sorted(set(pns)):
        raise BenchError(f"--patch-nums must be strictly increasing positive integers, got {text!r}")
    return pns


def load_official(var_ckpt: str, vae_ckpt: str, depth: Optional[int] = None, device="cpu",
                  patch_nums=None) -> ModelBundle:
    if not var_ckpt or not vae_ckpt:
        raise BenchError("official weights need both --var-ckpt and --vae-ckpt (or VARBENCH_VAR_CKPT/VARBENCH_VAE_CKPT)")
    var_sd = read_state_dict(var_ckpt, "VAR checkpoint")
    depth = infer_official_depth(var_sd) if depth is None else depth
    if depth < 1:
        raise BenchError(f"--depth must be a positive integer (released: {', '.join(map(str, OFFICIAL_DEPTHS))})")
    cfg = VARConfig.official(depth)
    if patch_nums is not None:
        cfg.patch_nums = parse_patch_nums(patch_nums) if isinstance(patch_nums, str) else tuple(patch_nums)
    # the position table fixes the token count; check it before building anything large
    n_tokens = sum(p * p for p in cfg.patch_nums)
    if "pos_1LC" in var_sd and var_sd["pos_1LC"].shape[1] != n_tokens:
        raise BenchError(f"patch sizes {tuple(cfg.patch_nums)} give {n_tokens} tokens but the VAR checkpoint has "
                         f"{var_sd['pos_1LC'].shape[1]}")
    with torch.device("meta"):  # shape check without allocating a billion parameters
        var = VAR(cfg)
    check_compatible(var, var_sd, f"VAR checkpoint {var_ckpt}", f"VAR(depth={depth})")
    vae_sd = read_state_dict(vae_ckpt, "VQ-VAE checkpoint")
    hits = vae_sd.get("quantize.ema_vocab_hit_SV")  # one row per scale the VQ-VAE was trained with
    if hits is not None and hits.dim() == 2 and hits.shape[0] != len(cfg.patch_nums):
        raise BenchError(f"patch sizes {tuple(cfg.patch_nums)} ({len(cfg.patch_nums)} scales) are inconsistent with "
                         f"the VQ-VAE checkpoint, trained on {hits.shape[0]} scales")
    vq = VQVAE(**{**OFFICIAL_VQVAE, "v_patch_nums": tuple(cfg.patch_nums)})
    check_compatible(vq, vae_sd, f"VQ-VAE checkpoint {vae_ckpt}", "the official VQ-VAE (ch=160, V=4096, Cvae=32)",
                     ignore=("quantize.ema_vocab_hit_SV",))
    var.load_state_dict(var_sd, strict=True, assign=True)  # meta tensors take the file's: no second copy
    vq.load_state_dict(vae_sd, strict=True)
    check_patch_nums(var, vq)
    # both files in the id: prepared artifacts (tokens, calibrations) depend on the VQ-VAE too
    sha, vae_sha = file_sha256(var_ckpt)[:8], file_sha256(vae_ckpt)[:8]
    return ModelBundle(
        name=f"official-d{depth}", model_id=f"official-d{depth}-{sha}-{vae_sha}", var=var.to(device).eval(),
        vqvae=frozen(vq, device), sampling=OFFICIAL_SAMPLING, class_names=[str(i) for i in range(cfg.num_classes)],
        image_size=vq.image_size, source="official", files={"var": var_ckpt, "vqvae": vae_ckpt})


def load_model(name: str = "default", var_ckpt: Optional[str] = None, vae_ckpt: Optional[str] = None,
               depth: Optional[int] = None, device: str = "cpu", patch_nums=None) -> ModelBundle:
    var_ckpt = var_ckpt or os.environ.get("VARBENCH_VAR_CKPT")
    vae_ckpt = vae_ckpt or os.environ.get("VARBENCH_VAE_CKPT")
    if depth is None and os.environ.get("VARBENCH_DEPTH"):
        try:
            depth = int(os.environ["VARBENCH_DEPTH"])
        except ValueError:
            raise BenchError(f"VARBENCH_DEPTH must be an integer, got {os.environ['VARBENCH_DEPTH']!r}") from None
    if var_ckpt or vae_ckpt:
        return load_official(var_ckpt, vae_ckpt, depth, device, patch_nums)
    if depth is not None or patch_nums is not None:
        raise BenchError("--depth/--patch-nums apply to official checkpoints; give --var-ckpt and --vae-ckpt too")
    return load_embedded(name, device)
