"""Token merging, ToMe-for-Stable-Diffusion style (Bolya & Hoffman 2023, arXiv 2303.17604; ToMe: Bolya et al. 2022,
arXiv 2210.09461) on VAR's large scales — the merging rival of FastVAR's pruning (methods/fastvar.py).

Per block, at each merged scale (n = pn² tokens of one row):
  * bipartite soft matching, by cosine similarity, on the block's input hidden state x (ToMe-SD's metric; or
    metric='keys': the attention keys of every token, W_k of the modulated LN(x), ToMe-ViT's metric, at the cost of
    one extra key projection n·C²): the scale's pn×pn map is cut into 2×2 cells, the top-left token of each cell is a
    destination (dst), every other token a source (src); each src finds its most similar dst, and the
    r = min(⌊n·ratio⌋, #src) src tokens with the highest similarity are merged into their dst by averaging (scatter
    mean, the dst itself included);
  * the chosen sub-layers (`merge`: attention, FFN or both) run on the n − r merged tokens — the attention's merged
    q/k/v are what the block appends to its KV cache, so later scales attend to n − r keys of this scale;
  * unmerge: every src merged into a dst receives a copy of that dst's output; then the residual add as dense.
  The matching is computed once per block from the block input and used for both sub-layers (ToMe-SD computes one
  merge per transformer block and applies it to the attention and MLP inputs after their norms).

Translation to our layout (7 scales, sides 1..8): ToMe-SD's defaults (its release dbolya/tomesd, apply_patch) are
ratio 0.5, 2×2 strides, merging for self-attention only (its MLP merging is "very not recommended" there), on the
highest-resolution layers only (max_downsample 1); here ratio 0.5, merge='attn', on the last two scales (6×6: 18 of
36 tokens merged; 8×8: 32 of 64), the large scales FastVAR prunes. ToMe-SD draws the dst of each cell at random
(use_rand); here it is the top-left token (its use_rand=False), so a generation takes no extra random draws and the
same seed gives the same images. The KV cache holds the merged keys (kv_cache_bytes counts them). Not translated:
ToMe-ViT's proportional attention (ToMe-SD does not use it either) and its merging that persists across layers (here,
as in ToMe-SD, every block matches and unmerges anew). The teacher-forced path (si None) runs dense.

Identity: ratio=0 (or a scale whose r is 0) runs the unmodified block: bitwise dense (test).

Cost, per row and block at a merged scale: the similarity matmul |src|·|dst|·C (fvcore counts it: it is a matmul;
metric='keys' adds the key projection n·C²), projections 4C² and scores 2C·keys over the merged queries when
attention merges, the FFN 2·C·H over the merged tokens when the FFN merges; the norms, argsort, gather, scatter-mean
and copies are elementwise or data movement (0 MACs), as fvcore counts them.

    create_method("tome")                                           # ratio 0.5, attention only, last two scales
    create_method("tome", ratio=0.7, scales=[4, 5, 6], merge="attn+ffn")
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.analytic import dense_scale_macs, kv_bytes
from bench.registry import Method, Param, check_distinct_scales, clone_structure, register_method
from methods import _tokens

MERGE = ("attn", "ffn", "attn+ffn")
METRIC = ("hidden", "keys")


def dst_positions(pn: int) -> List[int]:
    """Destination tokens of a pn×pn map: the top-left of every whole 2×2 cell (row-major positions)."""
    return [2 * i * pn + 2 * j for i in range(pn // 2) for j in range(pn // 2)]


def merged_count(ratio: float, pn: int) -> int:
    """r: tokens merged away at a pn×pn scale (ToMe-SD: ⌊n·ratio⌋, at most the number of src tokens)."""
    n = pn * pn
    return min(int(n * ratio), n - len(dst_positions(pn)))


class Matching:
    """One bipartite soft matching of a scale's tokens (rows, n, C): merge() to n − r tokens, unmerge() back."""

    def __init__(self, x: torch.Tensor, pn: int, r: int):
        rows, n, C = (int(v) for v in x.shape)
        dst = torch.tensor(dst_positions(pn), device=x.device)
        is_dst = torch.zeros(n, dtype=torch.bool, device=x.device)
        is_dst[dst] = True
        src = torch.arange(n, device=x.device)[~is_dst]
        metric = x / x.norm(dim=-1, keepdim=True)
        a, b = metric[:, src], metric[:, dst]
        scores = a @ b.transpose(-1, -2)                                   # rows, |src|, |dst|
        node_max, node_idx = scores.max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)                 # most similar src first
        self.unm_idx, self.src_idx = order[:, r:], order[:, :r]           # indices into src
        self.dst_idx = node_idx.gather(1, self.src_idx)                   # their dst (indices into dst)
        self.src, self.dst, self.n, self.r = src, dst, n, r

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, n, C) -> (rows, n − r, C): unmerged src tokens, then the dst tokens (mean of dst and its srcs)."""
        C = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]
        unm = src.gather(1, self.unm_idx.unsqueeze(-1).expand(-1, -1, C))
        moved = src.gather(1, self.src_idx.unsqueeze(-1).expand(-1, -1, C))
        dst = dst.scatter_reduce(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, C), moved, reduce="mean")
        return torch.cat((unm, dst), dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(rows, n − r, C) -> (rows, n, C): each token gets the output of the merged token it went into."""
        rows, _, C = y.shape
        k = int(self.unm_idx.shape[1])
        unm, dst = y[:, :k], y[:, k:]
        moved = dst.gather(1, self.dst_idx.unsqueeze(-1).expand(-1, -1, C))
        out = y.new_zeros(rows, self.n, C)
        out[:, self.dst] = dst
        src_pos = self.src.expand(rows, -1)
        out.scatter_(1, src_pos.gather(1, self.unm_idx).unsqueeze(-1).expand(-1, -1, C), unm)
        out.scatter_(1, src_pos.gather(1, self.src_idx).unsqueeze(-1).expand(-1, -1, C), moved)
        return out


class ToMeBlock(_tokens.BlockView):
    """One AdaLNSelfAttn that merges tokens on the chosen scales; elsewhere it runs the block itself."""

    def __init__(self, block, index: int, merged: Dict[int, int], merge: str, metric: str = "hidden"):
        super().__init__(block, index)
        self.merged, self.merge, self.metric = dict(merged), merge, metric
        self.last: Optional[Matching] = None     # the latest matching (tests read it)

    def forward(self, x, cond_BD, attn_bias=None, cache=None, si: Optional[int] = None):
        r = self.merged.get(si, 0) if si is not None and cache is not None else 0
        if r == 0:
            return self.block(x, cond_BD, attn_bias, cache, si)
        blk, pn = self.block, int(round(math.sqrt(int(x.shape[1]))))

        def attend(u):                # one matching per block, from its input, for both sub-layers
            if self.metric == "keys":  # the attention's keys of every token (all heads side by side; k has no bias)
                C = int(x.shape[-1])
                metric = F.linear(u, blk.attn.mat_qkv.weight[C:2 * C])
            else:
                metric = x
            m = self.last = Matching(metric, pn, r)
            return m.unmerge(blk.attn(m.merge(u), None, cache)) if "attn" in self.merge else blk.attn(u, None, cache)

        def ffn(h):
            m = self.last
            return m.unmerge(blk.ffn(m.merge(h), si)) if "ffn" in self.merge else blk.ffn(h, si)
        return self.residual(x, cond_BD, attend, ffn)


def predicted_macs(cfg, merged: Dict[int, int], merge: str, batch: int = 1, metric: str = "hidden") -> List[float]:
    """Per-scale transformer MACs for `batch` images (CFG rows included): bench/analytic.py's terms over the merged
    token counts, the keys each layer's cache holds, and the similarity matmul. Data-independent (the counts are)."""
    C, H, d = cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio), cfg.depth
    keys, out = 0, []
    for si, sm in enumerate(dense_scale_macs(cfg, batch)):
        pn = cfg.patch_nums[si]
        n, r = pn * pn, merged.get(si, 0)
        q = n - r if "attn" in merge else n
        t = n - r if "ffn" in merge else n
        keys += q
        nd = len(dst_positions(pn))
        match = ((n - nd) * nd * C + (n * C * C if metric == "keys" else 0)) if r else 0
        per_row = d * (q * 4 * C * C + q * keys * 2 * C + t * 2 * C * H + match)
        out.append(float(2 * batch * per_row + sm.head + sm.adaln + sm.word_embed))
    return out


@register_method("tome")
class ToMe(Method):
    kind = "token"
    display_name = "ToMe (token merging)"
    family = "tome"
    description = "token merging on the large scales: bipartite soft matching, merged sub-layers, copies back (ToMe-SD)"
    params = (
        Param("ratio", float, 0.5, "share of each merged scale's tokens merged away (capped at the non-dst tokens)",
              low=0.0, high=1.0, high_open=True),
        Param("scales", int, None, "merged scale indices (default: the last two)", low=0, list_ok=True,
              nullable=True),
        Param("merge", str, "attn", "sub-layers that run on the merged tokens", choices=MERGE),
        Param("metric", str, "hidden", "what the matching compares: the block input (ToMe-SD) or the attention keys "
              "of every token (ToMe-ViT's choice; one extra key projection)", choices=METRIC),
    )

    def check(self):
        check_distinct_scales(self.name, self.config["scales"])

    def merged(self, bundle) -> Dict[int, int]:
        """{scale: r} for the merged scales (a scale too small for any 2×2 cell merges nothing)."""
        pns = bundle.var.patch_nums
        scales = _tokens.resolve_scales(self.name, self.config["scales"], len(pns))
        return {s: merged_count(self.config["ratio"], pns[s]) for s in scales}

    def check_model(self, bundle):
        self.merged(bundle)

    def build(self, bundle):
        merged = self.merged(bundle)
        var = clone_structure(bundle.var)
        for i, blk in enumerate(var.blocks):
            var.blocks[i] = ToMeBlock(blk, i, merged, self.config["merge"], self.config["metric"])
        return var

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return predicted_macs(bundle.var.cfg, self.merged(bundle), self.config["merge"], batch, self.config["metric"])

    def kv_cache_bytes(self, net, bundle, elem_bytes: int = 4) -> float:
        """Each layer caches the merged tokens of the merged scales (when attention merges) and every other token."""
        cfg, merged = bundle.var.cfg, self.merged(bundle)
        attn = "attn" in self.config["merge"]
        keys = sum(p * p - (merged.get(s, 0) if attn else 0) for s, p in enumerate(cfg.patch_nums))
        return kv_bytes([keys] * cfg.depth, cfg.embed_dim, 2, elem_bytes)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        pns, merged = bundle.var.patch_nums, self.merged(bundle)
        return dict(tome_tokens_per_scale=[p * p - merged.get(s, 0) for s, p in enumerate(pns)],
                    sparse_scales=sorted(s for s, r in merged.items() if r),
                    macs_saved_fraction=self.macs_saved_fraction(net, bundle))

    @property
    def label(self) -> str:
        keys = " keys" if self.config["metric"] == "keys" else ""
        return f"tome r={self.config['ratio']:g} {self.config['merge']}{keys}"
