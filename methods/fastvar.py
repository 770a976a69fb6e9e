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
caches one fixed scale for all its pruned scales). Layers before the start layer and from the end layer on run dense.

Settings (`preset`; the translation is by position from the last scale, which on our layouts also keeps the
release's sides as fractions of the last side — Infinity 24, 32, 40, 48 of 64 = 0.375, 0.5, 0.625, 0.75; the
embedded default 3, 4, 5, 6 of 8, the same fractions; VAR's 10 scales 6, 8, 10, 13 of 16):
  * preset=release — the release's Infinity code (Infinity/infinity/models/fastvar_utils.py, infinity.py): ratios
    0.4 / 0.5 on the 32² / 40² scales (the 4th and 3rd from last), restored from 24² (the 5th from last), the 48²
    and 64² scales (the last two) not run at all ("100% pruning ratio at the last two scales is acceptable"; the
    release's 2.7× includes them), pruning in layers 3..27 of Infinity-2B's 32. Here: 0.4 / 0.5 on scales S−4 /
    S−3, cache scale S−5, scales S−2 and S−1 skipped as methods/skip-scales skips them (f_hat is the upsampled sum
    of the scales run), layers by the release's rule below. Embedded default: 4×4 at 0.4, 5×5 at 0.5, from 3×3;
    6×6 and 8×8 dropped (about 74% of the transformer MACs saved). Needs at least 5 scales.
  * preset=hart — the release's HART code (HART/hart/modules/networks/fastvar_utils.py): ratios 0.5 / 0.75 on the
    48² / 64² scales (the last two), restored from 36² (the one before), in every layer (its blocks prune
    unconditionally); nothing dropped. Here: 0.5 / 0.75 on the last two scales, cache scale S−3, every layer
    (embedded default: 6×6 at 0.5, 8×8 at 0.75; 41.5% saved).
  * no preset (default) — the mild reading: the release's Infinity ratios 0.4 / 0.5 on the last two scales (6×6 and
    8×8 on the embedded default), restored from the one before, layers by the release's rule, nothing dropped
    (22% saved on the embedded default). It is milder than preset=release, which drops what this prunes; `ratio`,
    `scales`, the layers and `match_saved` tune it. A preset fixes all of them: an explicit value that differs
    from the preset's is refused.
The release's layer rule: Infinity-2B keeps its first 3 and last 4 of 32 layers dense (range(3, 28)); at depth d
that is start = ⌊3/32·d + ½⌋, end = d − ⌊4/32·d + ½⌋, rounded half up (d16: 2..13; d20: 2..16; d30: 3..25; the
embedded default, depth 4: 0..2, block 3 dense). Python's round() rounds halves to even: at depth 4 it gave
4/32·4 = 0.5 → 0 dense blocks at the end, so every block pruned where the release keeps a share dense.

Cost: projections and FFN over the K kept tokens, scores over (kept query, key present); the frequency score,
interpolation, gather and scatter are elementwise or data movement (0 MACs), as fvcore counts them. A dropped scale
runs no block: 0 MACs.

    create_method("fastvar")                                   # the mild reading
    create_method("fastvar", preset="release")                 # the release's Infinity setting, translated
    create_method("fastvar", ratio=[0.3, 0.6], scales=[5, 6], start_layer=1)
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from bench.analytic import dense_scale_macs
from bench.errors import BenchError
from bench.registry import Method, Param, clone_structure, register_method
from methods import _steps, _tokens
from methods._tokens import Gate, TokenGatedBlock, _ln_mod, topk_positions

DEFAULT_RATIO = [0.4, 0.5]       # the release's Infinity ratios, earlier scale first (the mild default's)
PRESET_RATIOS = {"release": [0.4, 0.5], "hart": [0.5, 0.75]}    # earlier pruned scale first
PRESETS = tuple(PRESET_RATIOS)


def kept_count(ratio: float, n: int) -> int:
    """Tokens kept out of n: the release prunes ⌊n·ratio⌋ of them."""
    return n - int(n * ratio)


def half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def release_layers(depth: int) -> range:
    """The release's dense ends (3 first and 4 last of Infinity-2B's 32 layers) at another depth, rounded half up."""
    return range(half_up(3 / 32 * depth), depth - half_up(4 / 32 * depth))


def preset_setting(preset: str, num_scales: int, depth: int) -> Tuple[Dict[int, float], List[int], range]:
    """({pruned scale: ratio}, dropped scales, pruning layers) of a preset on a layout (see the module docstring)."""
    S, (early, late) = num_scales, PRESET_RATIOS[preset]
    if preset == "release":
        return {S - 4: early, S - 3: late}, [S - 2, S - 1], release_layers(depth)
    return {S - 2: early, S - 1: late}, [], range(depth)


def frequency_score(x: torch.Tensor) -> torch.Tensor:
    """(rows, n) squared distance of each token to the scale's mean token (its DC / lowest-frequency component)."""
    return (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=-1)


def predicted_macs(cfg, kept: Dict[int, int], layers: range, dropped=()) -> List[float]:
    """Per-scale transformer MACs per image by formula, before generating (FastVAR's counts do not depend on the
    data): bench/analytic.py with the projections and FFN over the kept tokens of the pruning layers and the scores
    over the keys each layer has appended so far; 0 at a dropped scale. Equal to what the blocks record (tests)."""
    C, H = cfg.embed_dim, round(cfg.embed_dim * cfg.mlp_ratio)
    keys = [0] * cfg.depth
    out = []
    for si, sm in enumerate(dense_scale_macs(cfg, 1)):
        if si in dropped:
            out.append(0.0)
            continue
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
        Param("preset", str, None, "release: the release's Infinity setting (0.4 / 0.5 on the 4th and 3rd scales "
              "from last, the last two dropped); hart: its HART setting (0.5 / 0.75 on the last two, every layer); "
              "unset: the mild reading", choices=PRESETS, nullable=True),
        Param("scales", int, None, "pruned scale indices (default: the last two)", low=1, list_ok=True, nullable=True),
        Param("ratio", float, None, "pruned share of each pruned scale's tokens: one value or one per scale "
              "(default 0.4, 0.5)", low=0.0, high=1.0, high_open=True, list_ok=True, nullable=True),
        Param("start_layer", int, None, "first pruning block (default: the release's rule, 3/32 of the depth rounded "
              "half up)", low=0, nullable=True),
        Param("end_layer", int, None, "blocks from here on run dense (default: the release's rule, depth minus 4/32 "
              "of it rounded half up)", low=1, nullable=True),
        Param("match_saved", float, None, "overrides ratio: one ratio on every pruned scale, chosen so that this "
              "share of the dense transformer MACs is saved (nearest reachable)", low=0.0, high=1.0, high_open=True,
              nullable=True),
    )

    def check(self):
        c = self.config
        _tokens.check_scales_and_rates(self.name, c["scales"], self.ratio(), "ratio")
        if c["start_layer"] is not None and c["end_layer"] is not None and c["start_layer"] >= c["end_layer"]:
            raise BenchError(f"method {self.name}: start_layer={c['start_layer']} must be below "
                             f"end_layer={c['end_layer']}")
        preset = c["preset"]
        if preset is None:
            return
        if c["match_saved"] is not None:
            self._conflict("match_saved", c["match_saved"], "its own ratios")
        given = c["ratio"]
        if given is not None:
            wanted = PRESET_RATIOS[preset]
            if (given if isinstance(given, list) else [given] * len(wanted)) != wanted:
                self._conflict("ratio", given, f"ratio {','.join(f'{r:g}' for r in wanted)}")

    def _conflict(self, name: str, value, fixed: str):
        shown = ",".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"
        raise BenchError(f"method {self.name}: {name}={shown} conflicts with preset={self.config['preset']}, which "
                         f"fixes {fixed}; valid: the preset alone, or {name} without a preset")

    def ratio(self):
        """The given ratio, or the mild default's."""
        r = self.config["ratio"]
        return list(DEFAULT_RATIO) if r is None else r

    def layers(self, depth: int) -> range:
        c = self.config
        rule = release_layers(depth)
        start = rule.start if c["start_layer"] is None else c["start_layer"]
        end = rule.stop if c["end_layer"] is None else c["end_layer"]
        if not 0 <= start < end <= depth:
            raise BenchError(f"method {self.name}: pruning layers {start}..{end - 1} do not fit a model with {depth} "
                             f"blocks; valid: 0 <= start_layer < end_layer <= {depth}")
        return range(start, end)

    def setting(self, bundle) -> Tuple[Dict[int, float], List[int], range]:
        """({pruned scale: ratio}, dropped scales, pruning layers) on this model."""
        c, pns, depth = self.config, bundle.var.patch_nums, bundle.var.cfg.depth
        S, preset = len(pns), c["preset"]
        if preset is None:
            rates = _tokens.rates_by_scale(self.name, c["scales"], self.ratio(), S, "ratio")
            if 0 in rates:
                raise BenchError(f"method {self.name}: scale 0 cannot be pruned (no earlier scale to restore it "
                                 f"from); valid: 1..{S - 1}")
            layers = self.layers(depth)
            if c["match_saved"] is not None:
                r = self.matched_ratio(bundle, sorted(rates), layers)
                rates = {s: r for s in rates}
            return rates, [], layers
        need = 5 if preset == "release" else 3     # a cache scale before the pruned ones, and (release) two to drop
        if S < need:
            raise BenchError(f"method {self.name}: preset={preset} needs a model with at least {need} scales; this "
                             f"one has {S}; valid: a larger layout, or ratio/scales without a preset")
        rates, dropped, layers = preset_setting(preset, S, depth)
        if c["scales"] is not None:
            given = sorted([c["scales"]] if isinstance(c["scales"], int) else c["scales"])
            if given != sorted(rates):
                self._conflict("scales", given, f"scales {','.join(map(str, sorted(rates)))} of this model")
        for name, value in (("start_layer", layers.start), ("end_layer", layers.stop)):
            if c[name] is not None and c[name] != value:
                self._conflict(name, c[name], f"{name} {value} at depth {depth}")
        return rates, dropped, layers

    def kept_tokens(self, bundle) -> Dict[int, int]:
        pns = bundle.var.patch_nums
        return {s: kept_count(r, pns[s] ** 2) for s, r in self.setting(bundle)[0].items()}

    def matched_ratio(self, bundle, scales: List[int], lay: range) -> float:
        """The one ratio (on a 1/1000 grid) whose predicted saving is nearest to match_saved."""
        cfg = bundle.var.cfg
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
        self.setting(bundle)

    # ------------------------------------------------------------------ build
    def _gate(self, net, bundle):
        rates, _, layers = self.setting(bundle)
        pns = bundle.var.patch_nums
        kept = {s: kept_count(r, pns[s] ** 2) for s, r in rates.items()}
        gate = FastVARGate(kept, layers, min(kept) - 1)
        for var in _tokens.var_modules(net):
            for i, blk in enumerate(var.blocks):
                if isinstance(blk, TokenGatedBlock):
                    raise BenchError("blocks are already token-gated: only one token method per run")
                var.blocks[i] = FastVARBlock(blk, i, gate)
        return net

    def apply_tokens(self, net, bundle):
        """Wrap every VAR block of `net` (a clone_structure copy) in place: the composition hook, which gates blocks
        and so cannot carry a preset's dropped scales."""
        if self.setting(bundle)[1]:
            raise BenchError(f"method {self.name}: preset={self.config['preset']} drops scales, which a composition "
                             f"(it gates blocks only) cannot carry; valid: preset=hart or no preset")
        return self._gate(net, bundle)

    def build(self, bundle):
        _, dropped, _ = self.setting(bundle)
        net = self._gate(clone_structure(bundle.var), bundle)
        if not dropped:
            return net
        S = len(bundle.var.patch_nums)          # the dropped scales are a tail: skipped as skip-scales skips them
        return _steps.StepNet(net, _steps.FixedPlan(stop=min(dropped), nocfg=S))

    # ------------------------------------------------------------------ accounting
    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return _tokens.gated_macs(net, bundle, batch, _tokens.plain_ffn_macs, skipped=self.setting(bundle)[1])

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # a pruned scale appends the keys/values of its attention's K kept tokens only (restored slots append none),
        # a dropped scale nothing: the largest cache is the one after the last scale run
        dropped = self.setting(bundle)[1]
        last = (min(dropped) if dropped else len(bundle.var.patch_nums)) - 1
        return _tokens.gated_kv_bytes(net, bundle, elem_bytes, last=last)

    def row_metrics(self, net, bundle, totals: bool = True) -> Dict[str, Any]:
        pns = bundle.var.patch_nums
        S = len(pns)
        rates, dropped, lay = self.setting(bundle)
        kept = {s: kept_count(r, pns[s] ** 2) for s, r in rates.items()}
        out = dict(fastvar_preset=self.config["preset"] or "none",
                   fastvar_kept_per_scale=[kept.get(s) for s in range(S)], sparse_scales=sorted(kept),
                   fastvar_ratio_per_scale=[None if s not in kept else round(1 - kept[s] / pns[s] ** 2, 4)
                                            for s in range(S)],
                   fastvar_layers=[lay.start, lay.stop - 1], fastvar_cache_scale=min(kept) - 1,
                   fastvar_dropped_scales=list(dropped))
        out.update(_tokens.token_row_metrics(net, bundle))
        if totals:
            out["macs_saved_fraction"] = self.macs_saved_fraction(net, bundle)
        return out

    @property
    def label(self) -> str:
        c = self.config
        if c["preset"] is not None:
            return f"fastvar preset={c['preset']}"
        if c["match_saved"] is not None:
            return f"fastvar prune=match {c['match_saved']:g} saved"
        r = self.ratio()
        return f"fastvar prune={','.join(f'{x:g}' for x in r) if isinstance(r, list) else f'{r:g}'}"
