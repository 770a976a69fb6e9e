"""FastVAR: cached token pruning (Guo et al., ICCV 2025, arXiv 2503.23367; code csguoh/FastVAR).

The rule, per block from the start layer on, at each pruned scale (n = pn² tokens, K = n − ⌊n·ratio⌋ kept):
  * pivotal token selection: before each sub-layer (attention, then FFN) every token is scored by its squared L2
    distance to the map's DC component (the mean token of the scale, i.e. 1×1 average pooling) on the block's
    current residual stream; the K highest-scoring (highest-frequency) tokens are kept. The release recomputes the
    choice before each sub-layer, so attention and FFN may keep different tokens (same count).
  * only the kept tokens go through the sub-layer (their q/k/v are what the block appends to its KV cache, as in
    methods/_tokens.py; they attend to the earlier scales' cache plus the K new keys);
  * cached token restoration: the sub-layer's output (after the adaLN gain) at every pruned slot is the same
    sub-layer's output at the cache scale, area-interpolated to this scale's side (the release's `unmerge`), and
    added to the residual like a computed one.
The cache scale is the last scale before the first pruned one, kept fixed for all pruned scales (the release
caches one fixed scale, 24×24, for both pruned scales of Infinity). Layers before `start_layer` and from `end_layer`
on run dense (the release prunes layers 3..27 of Infinity's 32).

Translation to the embedded default (7 scales, sides 1,2,3,4,5,6,8): the release prunes two large scales with
ratios 0.4 then 0.5; we prune the last two (6×6 at 0.4, 8×8 at 0.5), restoring from the 5×5 scale. Its layer
range scales with depth: start = round(3/32·depth), end = depth − round(4/32·depth) (d16: layers 2..13).
Not translated: the release's Infinity code also skips Infinity's last two scales (48², 64²) outright ("100%
pruning ratio at the last two scales is acceptable"), so its 2.7× comes with two steps dropped; this default skips
nothing (that step is methods/skip_scales.py). The release's HART setting prunes the last two scales, as here, at
0.5 / 0.75 in every layer.

Cost: projections and FFN over the K kept tokens, scores over (kept query, key present); the frequency score,
interpolation, gather and scatter are elementwise or data movement (0 MACs), as fvcore counts them.

    create_method("fastvar")                                   # the paper's setting, translated
    create_method("fastvar", ratio=[0.3, 0.6], scales=[5, 6], start_layer=1)
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.registry import Method, Param, clone_structure, register_method
from methods import _tokens
from methods._tokens import Gate, TokenGatedBlock, _ln_mod, topk_positions

DEFAULT_RATIO = [0.4, 0.5]       # the release's ratios for its two pruned scales, earlier scale first


def kept_count(ratio: float, n: int) -> int:
    """Tokens kept out of n: the release prunes ⌊n·ratio⌋ of them."""
    return n - int(n * ratio)


def frequency_score(x: torch.Tensor) -> torch.Tensor:
    """(rows, n) squared distance of each token to the scale's mean token (its DC / lowest-frequency component)."""
    return (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=-1)


def predicted_macs(cfg, kept: Dict[int, int], layers: range) -> List[float]:
    """Per-scale transformer MACs per image by formula, before generating (FastVAR's counts do not depend on the
    data): bench/analytic.py with the projections and FFN over the kept tokens of the pruning layers and the scores
    over the keys each layer has appended so far. Equal to what the blocks record (tests)."""
    from bench.analytic import dense_scale_macs
    C, H = cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio)
    keys = [0] * cfg.depth
    out = []
    for si, sm in enumerate(dense_scale_macs(cfg, 1)):
        n = cfg.patch_nums[si] ** 2
        per_row = 0.0
        for l in range(cfg.depth):
            q = kept[si] if si in kept and l in layers else n
            keys[l] += q
            per_row += q * 4 * C * C + q * keys[l] * 2 * C + q * 2 * C * H
        out.append(2 * per_row + sm.head + sm.adaln + sm.word_embed)
    return out


class FastVARGate(Gate):
    """Which scales are pruned (kept counts), which layers prune, and which scale's outputs restore the rest.

    The cache-scale outputs are kept here, per block index, not on the block: a composition may run the cache scale
    and a pruned scale on different VARs' blocks (DMoE's dense_weights=original switches weights at its first MoE
    scale), and block i of either restores from what block i computed at the cache scale."""

    def __init__(self, kept: Dict[int, int], layers: range, cache_scale: int):
        super().__init__(kept)
        self.layers, self.cache_scale = layers, cache_scale
        self.cached: Dict[int, Dict[str, torch.Tensor]] = {}

    def prunes(self, index: int, si: Optional[int]) -> bool:
        return self.active(si) and index in self.layers


class FastVARBlock(TokenGatedBlock):
    """A block that prunes by the frequency score and restores pruned slots from its cache-scale outputs."""

    def reset_stats(self):
        super().reset_stats()
        self.gate.cached.pop(self.index, None)
        self.last_idx_ffn: Dict[int, torch.Tensor] = {}

    def forward(self, x, cond_BD, attn_bias=None, cache=None, si: Optional[int] = None):
        g: FastVARGate = self.gate
        if si is None or cache is None:
            return self.block(x, cond_BD, attn_bias, cache, si)
        blk = self.block
        g1, g2, s1, s2, sh1, sh2 = blk.modulation(cond_BD)
        rows, n, C = (int(v) for v in x.shape)   # python ints also inside fvcore's jit trace
        if not g.prunes(self.index, si):
            a = blk.attn(_ln_mod(blk, x, s1, sh1), None, cache).mul_(g1)
            x = x + a
            f = blk.ffn(_ln_mod(blk, x, s2, sh2), si).mul(g2)
            if si == g.cache_scale and self.index in g.layers:
                g.cached[self.index] = dict(attn=a, ffn=f)
            self._record(si, rows, n, n, int(cache.k.shape[2]), 0, None)
            return x + f
        mine = g.cached.get(self.index, {})
        if set(mine) != {"attn", "ffn"} or mine["attn"].shape[0] != rows:
            raise RuntimeError(f"fastvar: block {self.index} pruned scale {si} before caching scale {g.cache_scale}")
        K, pn = g.kept[si], int(round(math.sqrt(n)))
        idx = topk_positions(frequency_score(x), K)
        idx_e = idx.unsqueeze(-1).expand(-1, -1, C)
        a = blk.attn(_ln_mod(blk, x.gather(1, idx_e), s1, sh1), None, cache).mul_(g1)   # appends K keys/values
        x = x + self._restore(mine["attn"], pn).scatter(1, idx_e, a)
        idx_f = topk_positions(frequency_score(x), K)
        idx_fe = idx_f.unsqueeze(-1).expand(-1, -1, C)
        f = blk.ffn(_ln_mod(blk, x.gather(1, idx_fe), s2, sh2), si).mul(g2)
        self._record(si, rows, n, K, int(cache.k.shape[2]), 0, idx)
        self.last_idx_ffn[si] = idx_f
        return x + self._restore(mine["ffn"], pn).scatter(1, idx_fe, f)

    @staticmethod
    def _restore(c: torch.Tensor, pn: int) -> torch.Tensor:
        """A cache-scale sub-layer output c, area-interpolated to pn×pn, as (rows, pn², C)."""
        rows, m, C = c.shape
        pc = int(round(math.sqrt(m)))
        up = F.interpolate(c.transpose(1, 2).reshape(rows, C, pc, pc), size=(pn, pn), mode="area")
        return up.reshape(rows, C, pn * pn).transpose(1, 2)


@register_method("fastvar")
class FastVAR(Method):
    kind = "token"
    display_name = "FastVAR"
    family = "fastvar"
    description = "cached token pruning: high-frequency (pivotal) tokens run, pruned slots restored from an earlier scale (FastVAR)"
    params = (
        Param("scales", int, None, "pruned scale indices (default: the last two)", low=1, list_ok=True, nullable=True),
        Param("ratio", float, DEFAULT_RATIO, "pruned share of each pruned scale's tokens: one value or one per scale",
              low=0.0, high=1.0, high_open=True, list_ok=True),
        Param("start_layer", int, None, "first pruning block (default: round(3/32 x depth))", low=0, nullable=True),
        Param("end_layer", int, None, "blocks from here on run dense (default: depth - round(4/32 x depth))", low=1,
              nullable=True),
        Param("match_saved", float, None, "overrides ratio: one ratio on every pruned scale, chosen so that this "
              "share of the dense transformer MACs is saved (nearest reachable)", low=0.0, high=1.0, high_open=True,
              nullable=True),
    )

    def check(self):
        c = self.config
        _tokens.check_scales_and_rates(self.name, c["scales"], c["ratio"], "ratio")
        if c["start_layer"] is not None and c["end_layer"] is not None and c["start_layer"] >= c["end_layer"]:
            raise BenchError(f"method {self.name}: start_layer={c['start_layer']} must be below "
                             f"end_layer={c['end_layer']}")

    def layers(self, depth: int) -> range:
        c = self.config
        start = round(3 / 32 * depth) if c["start_layer"] is None else c["start_layer"]
        end = depth - round(4 / 32 * depth) if c["end_layer"] is None else c["end_layer"]
        if not 0 <= start < end <= depth:
            raise BenchError(f"method {self.name}: pruning layers {start}..{end - 1} do not fit a model with {depth} "
                             f"blocks; valid: 0 <= start_layer < end_layer <= {depth}")
        return range(start, end)

    def kept_tokens(self, bundle) -> Dict[int, int]:
        c = self.config
        pns = bundle.var.patch_nums
        rates = _tokens.rates_by_scale(self.name, c["scales"], c["ratio"], len(pns), "ratio")
        if 0 in rates:
            raise BenchError(f"method {self.name}: scale 0 cannot be pruned (no earlier scale to restore it from); "
                             f"valid: 1..{len(pns) - 1}")
        if c["match_saved"] is not None:
            r = self.matched_ratio(bundle, sorted(rates))
            rates = {s: r for s in rates}
        return {s: kept_count(r, pns[s] ** 2) for s, r in rates.items()}

    def matched_ratio(self, bundle, scales: List[int]) -> float:
        """The one ratio (on a 1/1000 grid) whose predicted saving is nearest to match_saved."""
        cfg, lay = bundle.var.cfg, self.layers(bundle.var.cfg.depth)
        dense = sum(predicted_macs(cfg, {}, lay))
        target = self.config["match_saved"]

        def saved(r):
            kept = {s: kept_count(r, cfg.patch_nums[s] ** 2) for s in scales}
            return 1 - sum(predicted_macs(cfg, kept, lay)) / dense
        grid = [(i / 1000, saved(i / 1000)) for i in range(1000)]
        most = max(grid, key=lambda g: g[1])
        if target > most[1] + 5e-4:   # "nearest reachable" must not turn 0.99 into 0.60 under a "match 0.99" label
            raise BenchError(f"method {self.name}: match_saved={target:g} cannot be reached: pruning scales "
                             f"{scales} in blocks {lay.start}..{lay.stop - 1} saves at most {most[1]:.3f} of the dense "
                             f"transformer MACs (ratio {most[0]:g}); valid: match_saved <= {most[1]:.3f}, or more "
                             f"pruned scales (scales=...) or blocks (start_layer, end_layer)")
        return min(grid, key=lambda g: abs(g[1] - target))[0]

    def check_model(self, bundle):
        self.kept_tokens(bundle)
        self.layers(bundle.var.cfg.depth)

    # ------------------------------------------------------------------ build
    def apply_tokens(self, net, bundle):
        """Wrap every VAR block of `net` (a clone_structure copy) in place. Also the composition hook."""
        kept = self.kept_tokens(bundle)
        gate = FastVARGate(kept, self.layers(bundle.var.cfg.depth), min(kept) - 1)
        for var in _tokens.var_modules(net):
            for i, blk in enumerate(var.blocks):
                if isinstance(blk, TokenGatedBlock):
                    raise BenchError("blocks are already token-gated: only one token method per run")
                var.blocks[i] = FastVARBlock(blk, i, gate)
        return net

    def build(self, bundle):
        self.check_model(bundle)
        return self.apply_tokens(clone_structure(bundle.var), bundle)

    # ------------------------------------------------------------------ accounting
    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return _tokens.gated_macs(net, bundle, batch, _tokens.plain_ffn_macs)

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # a pruned scale appends the keys/values of its attention's K kept tokens only (restored slots append none)
        return _tokens.gated_kv_bytes(net, bundle, elem_bytes)

    def row_metrics(self, net, bundle, totals: bool = True) -> Dict[str, Any]:
        S = len(bundle.var.patch_nums)
        kept = self.kept_tokens(bundle)
        lay = self.layers(bundle.var.cfg.depth)
        out = dict(fastvar_kept_per_scale=[kept.get(s) for s in range(S)], sparse_scales=sorted(kept),
                   fastvar_ratio_per_scale=[None if s not in kept else
                                            round(1 - kept[s] / bundle.var.patch_nums[s] ** 2, 4) for s in range(S)],
                   fastvar_layers=[lay.start, lay.stop - 1], fastvar_cache_scale=min(kept) - 1)
        out.update(_tokens.token_row_metrics(net, bundle))
        if totals:
            out["macs_saved_fraction"] = self.macs_saved_fraction(net, bundle)
        return out

    @property
    def label(self) -> str:
        r = self.config["ratio"]
        r = ",".join(f"{x:g}" for x in r) if isinstance(r, list) else f"{r:g}"
        if self.config["match_saved"] is not None:
            r = f"match {self.config['match_saved']:g} saved"
        return f"fastvar prune={r}"
