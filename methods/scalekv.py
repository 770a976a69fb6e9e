"""ScaleKV: scale-aware KV-cache compression (Li et al. 2025, arXiv 2505.19602; code StargazerX0/ScaleKV).

The paper sorts transformer layers into drafters, whose queries attend broadly across earlier scales, and refiners,
which attend mostly to the current token map; refiners get a small KV budget, drafters a large one. Here:
  * roles: `refiners=auto` classifies layers once, on a calibration generation of `calib_images` images with the dense
    model: each layer's share of attention mass that the current scale's queries put on the current scale's keys
    (mean over rows, heads, queries and the scales after the first); the ⌊depth/2⌋ layers with the largest share are
    refiners (ties: the lower index). Or an explicit list of layer indices; `none` = no refiner (the dense model).
    The paper re-identifies roles at every scale; one classification for all scales is this harness's simplification.
  * drafters keep every cached key/value; refiners keep a budget: after scale k's attention, of the keys it saw (its
    kept earlier ones plus scale k's own) each head keeps the K = max(1, round(budget · L_k)) with the largest
    attention mass from scale k's queries (the observation window, as SnapKV/ScaleKV select by the current queries'
    scores), in position order; L_k = Σ_{j≤k} p_j² is what the dense cache holds after scale k. Nothing is cut after
    the last scale (no later query reads it) or where the cache already fits the budget.
  * a refiner layer at a scale that cuts computes attention as softmax(q·Kᵀ·scale)·V explicitly (the weights are the
    selection's scores; same MACs as the fused kernel, 2·n·L·C per row); elsewhere blocks run unchanged.

Translation to the embedded default: the paper's headline keeps 10% of Infinity's KV cache in total (drafters more,
refiners less); here budget=0.1 (the default) applies to refiner layers only, drafters keep everything, so the whole
cache is larger than 10% (kv_cache_bytes_peak says how much). Identity: budget=1.0 cuts nothing: the dense model,
bitwise.

Cost: the dense formula with each refiner layer's scores over the keys it holds (bench/analytic.py components); the
top-k, gather and softmax are data movement / elementwise (0 MACs). Calibration runs once at build and is not counted.

    create_method("scalekv")                        # budget 0.1, roles from 8 calibration images
    create_method("scalekv", budget=0.25, refiners=[1, 3])
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from bench.analytic import dense_scale_macs, kv_bytes
from bench.errors import BenchError
from bench.registry import Method, Param, clone_structure, register_method
from bench.sampling import generate
from methods._tokens import BlockView, kept_count, untraced


class KVPlan:
    """Which layers cut their caches after which scale, and to how many keys; `probe` records attention shares."""

    def __init__(self, patch_nums, refiners, budget: float, probe: bool = False):
        self.refiners, self.probe = set(refiners), probe
        S = len(patch_nums)
        self.cut: Dict[int, int] = {}            # scale -> keys a refiner layer keeps after it
        self.keys_seen: List[int] = []           # per scale, keys a refiner layer's queries attend to
        L = prefix = 0
        for si, p in enumerate(patch_nums):
            n = p * p
            L += n
            seen = prefix + n
            self.keys_seen.append(seen)
            K = kept_count(budget, L)
            if si < S - 1 and K < seen:
                self.cut[si], prefix = K, K
            else:
                prefix = seen
        self.share_sum: Dict[int, float] = {}    # probe: layer -> summed share of attention on the current scale
        self.share_n: Dict[int, int] = {}

    def keep(self, index: int, si: Optional[int]) -> Optional[int]:
        return self.cut.get(si) if index in self.refiners else None


class ScaleKVBlock(BlockView):
    """An AdaLNSelfAttn (parameters shared) whose cache is cut to the plan's budget after the scales that cut."""

    def __init__(self, block, index: int, plan: KVPlan):
        super().__init__(block, index)
        self.plan = plan

    def forward(self, x, cond_BD, attn_bias=None, cache=None, si: Optional[int] = None):
        keep = self.plan.keep(self.index, si)
        if si is None or cache is None or (keep is None and not self.plan.probe):
            return self.block(x, cond_BD, attn_bias, cache, si)
        return self.residual(x, cond_BD, lambda u: self._attend(u, cache, keep), lambda h: self.block.ffn(h, si))

    def _attend(self, x, cache, keep: Optional[int]):
        q, k, v = self.qkv(x)
        K, V = cache.append(k, v)
        w = (q @ K.transpose(-2, -1)).mul_(self.block.attn.scale).softmax(dim=-1)   # (B, H, n, Lk): the scores
        out = w @ V
        if self.plan.probe:
            self._record_share(w, int(x.shape[1]))
        if keep is not None and keep < int(K.shape[2]):
            idx = w.sum(dim=2).topk(keep, dim=-1).indices.sort(dim=-1).values     # per head, position order
            idx = idx.unsqueeze(-1).expand(-1, -1, -1, int(K.shape[3]))
            cache.k, cache.v = K.gather(2, idx), V.gather(2, idx)
        return self.project(out)

    @torch.no_grad()
    def _record_share(self, w, n: int):
        if int(w.shape[-1]) == n:      # the first scale: only itself to attend to, says nothing about the role
            return
        with untraced():
            p = self.plan
            p.share_sum[self.index] = p.share_sum.get(self.index, 0.0) + float(w[..., -n:].sum(-1).mean())
            p.share_n[self.index] = p.share_n.get(self.index, 0) + 1


def wrap(var, plan: KVPlan):
    """A clone_structure copy of `var` with every block wrapped (the loaded model is untouched)."""
    net = clone_structure(var)
    for i, blk in enumerate(net.blocks):
        net.blocks[i] = ScaleKVBlock(blk, i, plan)
    return net


@torch.no_grad()
def calibrate_shares(bundle, images: int, seed: int = 0) -> List[float]:
    """Per layer, the mean share of attention mass that the current scale's queries put on the current scale's keys,
    over a dense generation of `images` images (labels 0, 1, ... cycling over the classes)."""
    var = bundle.var
    plan = KVPlan(var.patch_nums, (), 1.0, probe=True)
    labels = torch.arange(images, device=bundle.device) % var.num_classes
    generate(wrap(var, plan).eval(), bundle.vqvae, labels, seed, bundle.sampling, decode=False)
    return [plan.share_sum[i] / plan.share_n[i] for i in range(var.cfg.depth)]


@register_method("scalekv")
class ScaleKV(Method):
    kind = "token"
    display_name = "ScaleKV"
    family = "scalekv"
    description = "scale-aware KV-cache compression: refiner layers keep a budget of their cached keys/values (ScaleKV)"
    params = (
        Param("budget", float, 0.1, "share of the dense cache length a refiner layer keeps after each scale "
              "(1.0: dense)", low=0.0, high=1.0, low_open=True),
        Param("refiners", str, "auto", "refiner layers: auto (the half of the layers attending most to the current "
              "scale on calibration images), none, or a list of layer indices", list_ok=True),
        Param("calib_images", int, 8, "images of the calibration generation (refiners=auto)", low=1),
    )

    def check(self):
        r = self.config["refiners"]
        if isinstance(r, list) or r not in ("auto", "none"):
            vals = r if isinstance(r, list) else [r]
            try:
                ints = [int(str(v).strip()) for v in vals]
            except ValueError:
                raise BenchError(f"method {self.name}: refiners={r!r} is not valid; valid: auto, none, or a list of "
                                 f"layer indices") from None
            if len(set(ints)) != len(ints):
                raise BenchError(f"method {self.name}: refiners lists a layer twice: {ints}")
            self._explicit = ints

    def refiners(self, bundle) -> List[int]:
        depth, r = bundle.var.cfg.depth, self.config["refiners"]
        if r == "none":
            return []
        if r != "auto":
            bad = [i for i in self._explicit if not 0 <= i < depth]
            if bad:
                raise BenchError(f"method {self.name}: refiner layer {bad[0]} out of range; valid: 0..{depth - 1} "
                                 f"(the model has {depth} blocks)")
            return sorted(self._explicit)
        shares = self.shares(bundle)
        order = sorted(range(depth), key=lambda i: (-shares[i], i))
        return sorted(order[:depth // 2])

    def shares(self, bundle) -> List[float]:
        key = (id(bundle), self.config["calib_images"])
        if getattr(self, "_shares_key", None) != key:
            self._shares, self._shares_key = calibrate_shares(bundle, self.config["calib_images"]), key
        return self._shares

    def check_model(self, bundle):
        if self.config["refiners"] not in ("auto", "none"):
            self.refiners(bundle)

    def build(self, bundle):
        self.check_model(bundle)
        plan = KVPlan(bundle.var.patch_nums, self.refiners(bundle), self.config["budget"])
        return wrap(bundle.var, plan).eval()

    @staticmethod
    def _plan(net) -> KVPlan:
        return net.blocks[0].plan

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        """The dense formula with each refiner layer's scores over the keys it holds (2 rows per image)."""
        cfg, plan = bundle.var.cfg, self._plan(net)
        out, L = [], 0
        for si, sm in enumerate(dense_scale_macs(cfg, batch)):
            n = cfg.patch_nums[si] ** 2
            L += n
            per_layer_keys = [plan.keys_seen[si] if i in plan.refiners else L for i in range(cfg.depth)]
            scores = 2 * batch * sum(2 * n * k * cfg.embed_dim for k in per_layer_keys)
            out.append(float(sm.total - sm.scores + scores))
        return out

    def kv_keys_last(self, net, bundle) -> List[int]:
        """Positions each layer's cache holds after the last scale's append."""
        plan, L = self._plan(net), sum(p * p for p in bundle.var.patch_nums)
        return [plan.keys_seen[-1] if i in plan.refiners else L for i in range(bundle.var.cfg.depth)]

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        return kv_bytes(self.kv_keys_last(net, bundle), bundle.var.cfg.embed_dim, 2, elem_bytes)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        plan = self._plan(net)
        out = dict(scalekv_refiners=sorted(plan.refiners), scalekv_kv_keys_last=self.kv_keys_last(net, bundle),
                   scalekv_keep_after_scale=[plan.cut.get(si) for si in range(len(bundle.var.patch_nums))],
                   macs_saved_fraction=self.macs_saved_fraction(net, bundle))
        if self.config["refiners"] == "auto":
            out["scalekv_current_scale_share"] = [round(s, 4) for s in self.shares(bundle)]
        return out

    @property
    def label(self) -> str:
        r = self.config["refiners"]
        r = ",".join(map(str, r)) if isinstance(r, list) else r
        return f"scalekv budget={self.config['budget']:g} refiners={r}"
