"""LiteVAR (Xie et al. 2024, arXiv 2411.17178): windowed attention over scales, attention shared across the CFG
branches, mixed precision — training-free, each part switchable for ablations.

Source: only the paper's abstract and summaries were readable in this session (not its method section or tables).
The abstract names three redundancies of VAR — the attention map, the attention outputs of the two CFG branches, the
data precision — and reports 85.2% less attention computation, 50% less memory, FID +0.056 at most. Where a detail
below is our reading rather than the paper's text, it says so. Translation to our layout (the embedded default:
7 scales, sides 1,2,3,4,5,6,8; CFG rows [conditional B; unconditional B] as bench/sampling.py builds them):

  * windowed attention (`window`, `keep_first`; the paper's multi-diagonal windowed attention, MDWA). At scale si
    the queries attend to the keys of scales si-window .. si (the current scale and the `window` before it) plus the
    first `keep_first` scales (scale 0 is the class/start token, the attention sink every scale looks at); the other
    scales' keys are sliced out before the scores, and out of the block's KV cache too (windows only slide forward,
    so a dropped scale is never attended again). Default window=1, keep_first=1 (our reading): scale 6 attends to
    scales 0, 5, 6. Not implemented: any narrowing *within* a scale. The paper's 85.2% cannot come from dropping
    whole scales (on VAR-d30's 10 scales this window saves 37% of the score MACs, 61% at window=0; 32% on our 7),
    so its "multi-diagonal" windows presumably also restrict the keys of a scale spatially. window=None (or >= the
    number of scales) attends to every scale.
  * attention shared across CFG (`share`, `share_last`; the paper's ASC). On the last `share_last` scales, in every
    block, the unconditional rows reuse the conditional rows' attention. share='output' (default: the abstract puts
    the redundancy in "the attention outputs when using classifier free guidance") gives the unconditional row the
    conditional row's attention output (before its own adaLN gain): no q/k/v, scores or projection for the
    unconditional rows. share='map' gives it the conditional row's attention map applied to its own values (its
    value projection, the A·V product and the output projection run; its q/k and scores do not). Which layers and
    scales the paper shares on is not known here: all blocks of the last 2 scales (our reading: the large scales, as
    cfg-skip and FastVAR translate their papers). The unconditional rows' cache slots at shared scales hold the
    conditional keys (share='output': and values) as stand-ins: a suffix of scales is shared, so no unconditional
    query ever reads them.
  * mixed precision (`precision`). 'linear-but-fc2' (default): the linear layers of the blocks (qkv, attention
    projection, FFN fc1) compute in bfloat16 under torch.autocast, output cast back to float32 (under --dtype bf16/fp16
    left as autocast gives it, so the KV cache has the element size of --dtype as for dense), all but the FFN's fc2,
    whose input is the post-GELU activation (our reading of which part the paper keeps at higher precision: the
    outlier-heavy activation; not verified against its text); 'all-linear' puts fc2 in bf16 too; 'fp32' none.
    Translation: the paper quantises to low-bit formats (its 50% memory saving reads as 8-bit weights in place of
    16-bit); this harness's low precision is bench.precision's bf16 autocast, so the MACs are the same and only time
    and quality change. Rows of different precision (this parameter, or --dtype) must not be compared as if one
    method setting: the param_precision and dtype columns say which.

Identity: window=None, share='none', precision='fp32' — every block runs the unmodified block (bitwise dense; test).
Under --dtype fp32 the scores, softmax inputs and the residual stream stay float32; the teacher-forced path (si None)
is dense.

Cost (bench/analytic.py terms, per row and block): projections 4C² per token (share='map' unconditional rows: 2C²,
their v and output projections; share='output': 0), scores 2C per (query, attended key) (share='map': C for the
conditional QKᵀ, C per row for A·V), FFN 2·C·H per token; head, adaLN, word embedding as dense. The key slicing is
data movement (0 MACs), as fvcore counts it.

    create_method("litevar")                                           # the three parts, translated
    create_method("litevar", window=None, share="none", precision="linear-but-fc2")   # mixed precision only
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.analytic import dense_scale_macs, kv_bytes
from bench.errors import BenchError
from bench.registry import Method, Param, clone_structure, register_method
from methods._tokens import BlockView, VarView

SHARE = ("none", "output", "map")
PRECISION = ("fp32", "linear-but-fc2", "all-linear")
LOW_DTYPE = torch.bfloat16       # bench.precision's --dtype bf16: autocast to it runs on CPUs and recent GPUs


def kept_scales(si: int, window: Optional[int], keep_first: int) -> List[int]:
    """Scales whose keys scale si's queries attend to (ascending): the first keep_first, and si-window .. si."""
    if window is None:
        return list(range(si + 1))
    return sorted(set(range(min(keep_first, si + 1))) | set(range(max(0, si - window), si + 1)))


class Plan:
    """The settings every wrapped block reads, plus whether the current call has CFG rows (set by LiteVARNet)."""

    def __init__(self, begin_ends, window, keep_first, share, shared_scales, precision):
        self.begin_ends, self.window, self.keep_first = list(begin_ends), window, keep_first
        self.sizes = [e - b for b, e in self.begin_ends]
        self.share, self.shared_scales, self.precision = share, set(shared_scales), precision
        self.cfg_rows = False

    def restricts(self, si: int) -> bool:
        return len(kept_scales(si, self.window, self.keep_first)) < si + 1

    def held_before(self, si: int) -> List[int]:
        """Scales whose keys a block's cache holds before scale si's append: all until a scale restricted (and was
        cut to its window); after that the previous scale's window (a later window is a subset of an earlier one
        plus the new scale: a dropped scale is never attended again)."""
        if si > 0 and self.restricts(si - 1):
            return kept_scales(si - 1, self.window, self.keep_first)
        return list(range(si))

    def peak_keys(self) -> int:
        """The most keys a block's cache holds: after some scale's append, before its cut."""
        return max(sum(self.sizes[j] for j in self.held_before(si)) + self.sizes[si] for si in range(len(self.sizes)))

    def sharing(self, si: int) -> Optional[str]:
        return self.share if self.share != "none" and si in self.shared_scales and self.cfg_rows else None

    def low(self, part: str) -> bool:
        """Whether linear layer `part` (qkv, proj, fc1, fc2) computes in low precision."""
        return self.precision == "all-linear" or (self.precision == "linear-but-fc2" and part != "fc2")


class LiteVARBlock(BlockView):
    """One AdaLNSelfAttn under the plan; where the plan changes nothing at a scale it runs the block itself."""

    def __init__(self, block, index: int, plan: Plan):
        super().__init__(block, index)
        self.plan = plan

    def _linear(self, part, x, weight, bias):
        if not self.plan.low(part):
            return F.linear(x, weight, bias)
        ambient = torch.is_autocast_enabled(x.device.type)   # --dtype bf16/fp16: keep what autocast gives (the
        with torch.autocast(x.device.type, dtype=LOW_DTYPE):  # K/V element size the row's kv bytes assume)
            y = F.linear(x, weight, bias)
        return y if ambient else y.float()

    def forward(self, x, cond_BD, attn_bias=None, cache=None, si: Optional[int] = None):
        p = self.plan
        if si is None or cache is None or not (p.restricts(si) or p.sharing(si) or p.precision != "fp32"):
            return self.block(x, cond_BD, attn_bias, cache, si)
        return self.residual(x, cond_BD, lambda u: self._attention(u, cache, si), lambda h: self._ffn(h, si))

    def _ffn(self, h, si):
        ffn = self.block.ffn
        if self.plan.precision == "fp32" or not hasattr(ffn, "fc1"):
            return ffn(h, si)
        return self._linear("fc2", ffn.act(self._linear("fc1", h, ffn.fc1.weight, ffn.fc1.bias)),
                            ffn.fc2.weight, ffn.fc2.bias)

    def _attention(self, u, cache, si):
        a, p = self.block.attn, self.plan
        rows, n, C = (int(v) for v in u.shape)        # python ints also inside fvcore's jit trace
        H, c = a.num_heads, a.head_dim
        mode = p.sharing(si)
        B = rows // 2
        src = u[:B] if mode else u                      # rows whose q/k are computed
        q, k, v = self.qkv(src, lambda x, w, b: self._linear("qkv", x, w, b))   # rows H n c
        if mode == "map":      # the unconditional rows' own values (the last C of the qkv projection)
            v_u = self._linear("qkv", u[B:], a.mat_qkv.weight[2 * C:], a.v_bias).view(B, n, H, c).transpose(1, 2)
            K, V = cache.append(torch.cat((k, k)), torch.cat((v, v_u)))
        elif mode == "output":
            K, V = cache.append(torch.cat((k, k)), torch.cat((v, v)))
        else:
            K, V = cache.append(k, v)
        if p.restricts(si):    # keep the window's keys; the cache keeps only them too (no later scale reads others)
            held = p.held_before(si) + [si]
            offsets = [0]
            for j in held:
                offsets.append(offsets[-1] + p.sizes[j])
            idx = [i for i, j in enumerate(held) if j in set(kept_scales(si, p.window, p.keep_first))]
            K = torch.cat([K[:, :, offsets[i]:offsets[i + 1]] for i in idx], dim=2)
            V = torch.cat([V[:, :, offsets[i]:offsets[i + 1]] for i in idx], dim=2)
            cache.k, cache.v = K, V
        proj = (lambda x, w, b: self._linear("proj", x, w, b))
        if mode is None:
            out = F.scaled_dot_product_attention(q, K, V, scale=a.scale)
        elif mode == "output":
            o = self.project(F.scaled_dot_product_attention(q, K[:B], V[:B], scale=a.scale), proj)
            return torch.cat((o, o))
        else:                  # one map from the conditional rows, applied to both rows' values
            attn = torch.matmul(q, K[:B].transpose(-2, -1)).mul(a.scale).softmax(dim=-1)
            out = torch.matmul(attn.unsqueeze(0), V.reshape(2, B, H, -1, c)).reshape(rows, H, n, c)
        return self.project(out, proj)


class LiteVARNet(VarView):
    """The VAR with LiteVAR blocks; tells the plan whether a call's rows are [conditional; unconditional] (sharing
    applies only then: forward_by_scale's plain label batch is not a CFG batch)."""

    def __init__(self, var, plan: Plan):
        super().__init__(var)
        self.plan = plan

    def scale_forward(self, si, x_in, label_B, caches):
        rows = int(label_B.shape[0])
        self.plan.cfg_rows = rows % 2 == 0 and bool((label_B[rows // 2:] == self.var.num_classes).all())
        return self.var.scale_forward(si, x_in, label_B, caches)


def predicted_macs(cfg, window, keep_first, share, shared_scales, batch: int = 1) -> List[float]:
    """Per-scale transformer MACs for `batch` images (CFG rows included) by formula: bench/analytic.py's terms with
    the attended keys of the window and the unconditional rows' shared work. Mixed precision changes no MAC."""
    C, H, d = cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio), cfg.depth
    sizes = [p * p for p in cfg.patch_nums]
    out = []
    for si, sm in enumerate(dense_scale_macs(cfg, batch)):
        n = sizes[si]
        keys = sum(sizes[j] for j in kept_scales(si, window, keep_first))
        mode = share if share != "none" and si in shared_scales else None
        if mode is None:
            attn = 2 * (4 * C * C * n + 2 * C * n * keys)
        elif mode == "output":
            attn = 4 * C * C * n + 2 * C * n * keys
        else:     # cond: qkv 3C² + proj C², QKᵀ C, A·V C; uncond: v C² + proj C², A·V C
            attn = (4 * C * C * n + 2 * C * n * keys) + (2 * C * C * n + C * n * keys)
        per_image = d * (attn + 2 * 2 * C * H * n)
        out.append(float(batch * per_image + sm.head + sm.adaln + sm.word_embed))
    return out


@register_method("litevar")
class LiteVAR(Method):
    kind = "token"
    display_name = "LiteVAR"
    family = "litevar"
    description = ("windowed attention over scales, attention shared across the CFG branches, mixed precision "
                   "(LiteVAR)")
    params = (
        Param("window", int, 1, "earlier scales each scale attends to besides itself and the first ones "
              "(null, or the number of scales - 1: every scale)", low=0, nullable=True),
        Param("keep_first", int, 1, "first scales every scale attends to (1: the class/start token)", low=0),
        Param("share", str, "output", "what the unconditional rows take from the conditional ones on the shared "
              "scales", choices=SHARE),
        Param("share_last", int, 2, "how many of the last scales share attention across CFG", low=0),
        Param("precision", str, "linear-but-fc2", "block linear layers computed in bf16 (autocast)", choices=PRECISION),
    )

    def check_model(self, bundle):
        S = len(bundle.var.patch_nums)
        c = self.config
        if c["keep_first"] > S:
            raise BenchError(f"method {self.name}: keep_first={c['keep_first']} is out of range for a model with {S} "
                             f"scales; valid: 0..{S}")
        if c["share_last"] > S:
            raise BenchError(f"method {self.name}: share_last={c['share_last']} is out of range for a model with {S} "
                             f"scales; valid: 0..{S}")

    def shared_scales(self, bundle) -> List[int]:
        S = len(bundle.var.patch_nums)
        return list(range(S - self.config["share_last"], S)) if self.config["share"] != "none" else []

    def build(self, bundle):
        self.check_model(bundle)
        c = self.config
        var = clone_structure(bundle.var)
        plan = Plan(var.begin_ends, c["window"], c["keep_first"], c["share"], self.shared_scales(bundle),
                    c["precision"])
        for i, blk in enumerate(var.blocks):
            var.blocks[i] = LiteVARBlock(blk, i, plan)
        return LiteVARNet(var, plan)

    def kv_cache_bytes(self, net, bundle, elem_bytes: int = 4) -> float:
        """The largest cache: with a window, a block's cache is cut to the window after each restricted scale, so its
        peak is some scale's window before the cut plus that scale (the dense model's peak, every key, without one).
        CFG sharing keeps the unconditional rows' slots (stand-ins), so both rows count."""
        cfg, c = bundle.var.cfg, self.config
        plan = Plan(bundle.var.begin_ends, c["window"], c["keep_first"], "none", [], "fp32")
        return kv_bytes([plan.peak_keys()] * cfg.depth, cfg.embed_dim, 2, elem_bytes)

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        c = self.config
        return predicted_macs(bundle.var.cfg, c["window"], c["keep_first"], c["share"], self.shared_scales(bundle),
                              batch)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        c, S = self.config, len(bundle.var.patch_nums)
        sizes = [p * p for p in bundle.var.patch_nums]
        return dict(litevar_keys_per_scale=[sum(sizes[j] for j in kept_scales(si, c["window"], c["keep_first"]))
                                            for si in range(S)],
                    litevar_shared_scales=self.shared_scales(bundle),
                    macs_saved_fraction=self.macs_saved_fraction(net, bundle))

    @property
    def label(self) -> str:
        c = self.config
        w = "all" if c["window"] is None else f"{c['window']}+{c['keep_first']}"
        share = "none" if c["share"] == "none" else f"{c['share']}@{c['share_last']}"
        return f"litevar w={w} share={share} {c['precision']}"
