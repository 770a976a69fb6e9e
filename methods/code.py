"""CoDe: collaborative decoding (Chen et al., CVPR 2025, arXiv 2411.17787; code czg1225/CoDe).

A large model (the drafter) generates the small scales, where the image's content is decided; a small model (the
refiner) generates the large scales, which add detail and hold most tokens. At the takeover scale the refiner has no
cache of its own, so it runs one teacher-forced (block-causal masked) forward over the input maps of every drafted
scale plus the takeover scale's (the release's `autoregressive_infer_cfg_refine`: `token_hub` of the drafter's next-
scale inputs, concatenated, one masked pass); that fills its KV cache with keys/values of the drafter's token maps and
gives the takeover scale's logits. The drafter's caches are dropped at that point (never read again: the release's
memory halving). From then on the refiner runs scale by scale as usual.

Models: the refiner is the bundle's model (default) or another named one, the drafter a named model or a VAR
checkpoint path (official weights: loaded with the bundle's VQ-VAE file). Both must share the bundle's VQ-VAE,
patch layout, vocabulary and classes (refused otherwise, one line). The row is paired with the bundle's own dense
model (bench/measure.py's dense is bundle.var): with the default refiner that is the refiner run alone.

Paper setting and translation: VAR-d30 drafts and VAR-d16 refines; the default (N=8 draft steps of the 10 scales 1..16)
gives the refiner the last two scales, 13² and 16² (425 of 680 tokens, 62.5%). The embedded default has 7 scales
(1,2,3,4,5,6,8): shapes-d6 drafts, the bundle (shapes-d4, the default model) refines, and the refiner takes over at
scale 5, the last two scales 6² and 8² (100 of 155 tokens, 64.5%): takeover = S - 2 on any layout (8 on the official
10 scales, as the paper). Training-free CoDe only (the release also ships fine-tuned drafter/refiner weights, and
samples with per-scale top-k 600 and temperature 1.1; here the bundle's sampling settings apply to both models).

Identity: takeover=0 is the refiner alone (no drafted scale, no prefill); with the default refiner that is the dense
model, bitwise.

Cost: drafter scales cost the drafter's dense MACs, refiner scales after the takeover the refiner's; the takeover
scale costs the refiner's masked pass over L_T = Σ_{j≤T} p_j² tokens (projections and FFN over L_T tokens, scores
over the full L_T x L_T square, as the attention kernel computes it with the mask; word embedding of the L_T − 1
drafted-input tokens once per image; the head on the takeover scale's tokens only).

    create_method("code")                                   # shapes-d6 drafts, the bundle refines from scale S-2
    create_method("code", drafter="/ckpt/var_d30.pth")      # official: run with --var-ckpt var_d16.pth
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from bench.analytic import dense_scale_macs
from bench.errors import BenchError
from bench.registry import Method, Param, register_method
from bench.zoo import load_model, resolve_name
from methods._tokens import VarView

CHECKPOINT_EXTS = (".pth", ".pt", ".bin", ".safetensors")


def load_partner(name: str, bundle):
    """Another model for a CoDe run, on the bundle's device: a model name (bench.zoo), or a VAR checkpoint path
    loaded as official weights with the bundle's VQ-VAE file. Tests replace this to serve small models."""
    device = str(bundle.device)
    if name.endswith(CHECKPOINT_EXTS) or os.path.sep in name:
        if not os.path.isfile(name):
            raise BenchError(f"method code: model checkpoint {name!r} does not exist; valid: a model name "
                             f"(python -m bench models) or a VAR checkpoint file")
        vae = bundle.files.get("vqvae")
        if not vae:
            raise BenchError(f"method code: a checkpoint path ({name}) needs the bundle's VQ-VAE file, and model "
                             f"{bundle.name} has none; valid: a model name (python -m bench models)")
        return load_model(var_ckpt=name, vae_ckpt=vae, device=device, patch_nums=bundle.var.patch_nums)
    if resolve_name(name) == bundle.name:   # the bundle itself (an alias of it included): no second copy
        return bundle
    return load_model(name, device=device)


def check_partner(role: str, other, bundle) -> None:
    """One line unless `other` draws with the bundle's VQ-VAE on the same scales, vocabulary and classes."""
    a, b = other.var, bundle.var
    what = f"method code: the {role} {other.name} and the model {bundle.name}"
    if tuple(a.patch_nums) != tuple(b.patch_nums):
        raise BenchError(f"{what} have different patch layouts {tuple(a.patch_nums)} vs {tuple(b.patch_nums)}; "
                         f"valid: models on the same scales and VQ-VAE")
    if (a.V, a.Cvae, a.num_classes) != (b.V, b.Cvae, b.num_classes):
        raise BenchError(f"{what} differ in vocabulary/Cvae/classes ({a.V}, {a.Cvae}, {a.num_classes}) vs "
                         f"({b.V}, {b.Cvae}, {b.num_classes}); valid: models sharing one VQ-VAE and label set")
    if other.vqvae is not bundle.vqvae:
        sa, sb = other.vqvae.state_dict(), bundle.vqvae.state_dict()
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa):
            raise BenchError(f"{what} use different VQ-VAE weights; valid: models sharing one VQ-VAE")


class CoDeCaches(list):
    """The drafter's caches then the refiner's (one flat list: whoever sums the caches sees both), and the input maps
    of the drafted scales (the refiner's prefill reads them)."""

    def __init__(self, drafter, refiner):
        super().__init__(list(drafter) + list(refiner))
        self.drafter, self.refiner = list(drafter), list(refiner)
        self.maps: List[torch.Tensor] = []


class CoDeNet(VarView):
    """Sampler interface over two VARs: scales < takeover by the drafter, the rest by the refiner (the view's VAR:
    classes and scales are the refiner's)."""

    def __init__(self, drafter, refiner, takeover: int):
        super().__init__(refiner)
        self.drafter, self.takeover = drafter, takeover

    @property
    def refiner(self):
        return self.var

    def new_caches(self):
        return CoDeCaches(self.drafter.new_caches(), self.refiner.new_caches())

    def scale_forward(self, si: int, x_in, label_2B, caches: CoDeCaches):
        T = self.takeover
        if si < T:
            if si > 0:
                caches.maps.append(x_in)
            return self.drafter.scale_forward(si, x_in, label_2B, caches.drafter)
        if si > T or T == 0:
            return self.refiner.scale_forward(si, x_in, label_2B, caches.refiner)
        for c in caches.drafter:          # never read again: the drafter's memory goes before the refiner's prefill
            c.k = c.v = None
        maps, caches.maps = caches.maps + [x_in], []
        return self.prefill(T, torch.cat(maps, dim=1), label_2B, caches.refiner)

    def prefill(self, T: int, x_maps, label_2B, caches):
        """The refiner's teacher-forced pass over scales 0..T (inputs: the drafted maps of scales 1..T), block-causal
        mask, appending every position to its caches; the logits of scale T."""
        var = self.refiner
        cond = var.class_emb(label_2B)
        lvl_pos = var.lvl_pos()
        rows, first = label_2B.shape[0], var.first_l
        bg, ed = var.begin_ends[T]
        sos = cond.unsqueeze(1).expand(rows, first, -1) + var.pos_start.expand(rows, first, -1) + lvl_pos[:, :first]
        x = var.word_embed(x_maps) + lvl_pos[:, first:ed]          # once per image, then repeated for CFG (as VAR)
        x = torch.cat((sos, x.repeat(rows // x.shape[0], 1, 1)), dim=1)
        mask = var.attn_bias_for_masking[:, :, :ed, :ed]
        for blk, cache in zip(var.blocks, caches):
            x = blk(x, cond, mask, cache, None)      # si=None: the teacher-forced pass (every FFN type runs dense)
        return var.get_logits(x[:, bg:ed], cond)


def prefill_macs(cfg, T: int, batch: int) -> float:
    """MACs of the refiner's masked pass over scales 0..T for `batch` images (2 rows each under CFG)."""
    C, d, V, H = cfg.embed_dim, cfg.depth, cfg.vocab_size, round(cfg.embed_dim * cfg.mlp_ratio)
    ns = [p * p for p in cfg.patch_nums[:T + 1]]
    L, rows = sum(ns), 2 * batch
    per_row = d * (L * 4 * C * C + 2 * L * L * C + L * 2 * C * H) + ns[-1] * C * V + (6 * d + 2) * C * C
    return float(rows * per_row + batch * (L - ns[0]) * cfg.Cvae * C)


@register_method("code")
class CoDe(Method):
    kind = "token"
    display_name = "CoDe"
    family = "code"
    description = "collaborative decoding: a large model drafts the small scales, a small one refines the large (CoDe)"
    params = (
        Param("drafter", str, "shapes-d6", "model that generates the scales before the takeover: a model name or a "
              "VAR checkpoint path (official: loaded with the bundle's VQ-VAE)"),
        Param("refiner", str, None, "model from the takeover on (default: the bundle's model, the paired dense)",
              nullable=True),
        Param("takeover", int, None, "first scale the refiner generates (default: S-2, the paper's N=8 of 10 "
              "translated; 0 = the refiner alone)", low=0, nullable=True),
    )

    def takeover(self, bundle) -> int:
        S = len(bundle.var.patch_nums)
        T = S - 2 if self.config["takeover"] is None else self.config["takeover"]
        if not 0 <= T < S:
            raise BenchError(f"method {self.name}: takeover={T} is out of range for a model with {S} scales; "
                             f"valid: 0..{S - 1}")
        return T

    def models(self, bundle):
        """(drafter bundle, refiner bundle), loaded once per bundle and checked against it."""
        key = (id(bundle), self.config["drafter"], self.config["refiner"])
        if getattr(self, "_models_key", None) != key:
            ref = bundle if self.config["refiner"] is None else load_partner(self.config["refiner"], bundle)
            check_partner("refiner", ref, bundle)
            dr = load_partner(self.config["drafter"], bundle)
            check_partner("drafter", dr, bundle)
            self._models, self._models_key = (dr, ref), key
        return self._models

    def check_model(self, bundle):
        self.takeover(bundle)
        self.models(bundle)

    def build(self, bundle):
        T = self.takeover(bundle)
        dr, ref = self.models(bundle)
        return CoDeNet(dr.var, ref.var, T).eval()

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        T = net.takeover
        dr = dense_scale_macs(net.drafter.cfg, batch)
        ref = dense_scale_macs(net.refiner.cfg, batch)
        return [dr[si].total if si < T else ref[si].total if si > T or T == 0 else prefill_macs(net.refiner.cfg, T, batch)
                for si in range(len(net.patch_nums))]

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # at the last scale only the refiner's caches are held (the drafter's went at the takeover), all positions
        from bench.analytic import dense_kv_cache_bytes
        return dense_kv_cache_bytes(net.refiner.cfg, elem_bytes)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        dr, ref = self.models(bundle)
        return dict(code_drafter=dr.name, code_refiner=ref.name, code_takeover=net.takeover,
                    code_drafter_depth=net.drafter.cfg.depth, code_refiner_depth=net.refiner.cfg.depth,
                    macs_saved_fraction=self.macs_saved_fraction(net, bundle))

    @property
    def label(self) -> str:
        c = self.config
        t = "S-2" if c["takeover"] is None else c["takeover"]
        return f"code {os.path.basename(c['drafter'])}->{c['refiner'] or 'model'} @{t}"
