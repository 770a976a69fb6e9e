"""Token gating shared by ActVAR (methods/actvar.py), fixed token pruning (methods/token_pruning.py), FastVAR and
compositions (methods/compose.py). ../shared/METHODS.md §5-6; ActVAR paper §3.3-3.4, eq. 9. Also the two views every
method that rewrites part of the model builds on: BlockView (one block; its adaLN residual, q/k/v and output
projection as the block computes them, for LiteVAR, ScaleKV and ToMe to replace one part) and VarView (the sampler
interface of a net around a VAR: methods/_steps.py, LiteVAR, CoDe).

    TokenGatedBlock(block, index, gate)   wraps one AdaLNSelfAttn; on a gated scale only the gate's K kept
                                          tokens go through attention + FFN, the others are copied unchanged
    LearnedGate(selector, kept)           ActVAR: per block Linear(C,1) on the block's adaLN-modulated input,
                                          softmax over the scale's tokens, top-K (a new choice in every block)
    FixedGate(kept, criterion, shared)    fixed pruning: block 0 chooses, every later block reuses its choice
    gate_net(net, make_gate)              wrap every VAR found in a net (SwitchNet included)
    gated_macs / token_row_metrics        FLOPs and row columns from what the blocks recorded

KV cache (what a gated block appends): at a gated scale, block m computes q/k/v for its K kept tokens only;
their keys/values are what it appends to its own cache, and its kept tokens attend to the cache of earlier
scales plus the K new keys (bidirectionally inside the scale, as in the dense model). Unselected tokens skip the
block entirely: no query, no key, no value, no FFN — so at every later scale that block's attention sees only
the keys of the tokens it kept earlier. Each block keeps its own choice (ActVAR), so the cache lengths of
different blocks may hold different positions but the same counts; fixed pruning appends the same positions
in every block. Ungated scales run the wrapped block unchanged (all tokens, full cache append).

Cost accounting is by recording, never by assumption: each gated block records, per scale, rows, kept tokens,
the keys its kept queries actually saw (cache length after the append), and the tokens a learned selector
scored; its FFN reports what it ran. The teacher-forced masked pass (`VAR.forward`, si=None) is always dense.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import registry
from bench.analytic import dense_scale_macs, kv_bytes
from bench.errors import BenchError
from bench.models.var import KVCache, VAR

DEFAULT_LAST_SCALES = 2          # ActVAR acts on the last two scales (paper Table 6)
MAP_SAMPLES = 4                  # conditional rows whose token-activation maps are kept for the results row


@contextlib.contextmanager
def untraced():
    """Statistics bookkeeping outside a jit trace (bench/flops.py traces the real generation step): the counters
    are not the method's work and must not show up among the traced ops."""
    get, set_ = getattr(torch._C, "_get_tracing_state", None), getattr(torch._C, "_set_tracing_state", None)
    state = get() if get else None
    if state is not None:
        set_(None)
    try:
        yield
    finally:
        if state is not None:
            set_(state)


# ------------------------------------------------------------------------------------------------ configuration
def kept_count(rate: float, n: int) -> int:
    """Tokens kept out of n at activation rate `rate`: round half up, at least one, at most n."""
    return min(n, max(1, int(math.floor(rate * n + 0.5))))


def check_scales_and_rates(method: str, scales, rates, what: str) -> None:
    """Model-free checks: no scale twice; a per-scale rate list has one value per listed scale."""
    registry.check_distinct_scales(method, scales)
    if isinstance(rates, list) and isinstance(scales, list) and len(rates) != len(scales):
        raise BenchError(f"method {method}: {what} has {len(rates)} values but scales has {len(scales)}; "
                         f"give one value or one per scale")


def resolve_scales(method: str, value, num_scales: int, default_last: int = DEFAULT_LAST_SCALES) -> List[int]:
    """Sorted scale indices (None: the last `default_last`), checked against the model."""
    return sorted(registry.resolve_scales(method, value, num_scales, default_last))


def rates_by_scale(method: str, scales_value, rates, num_scales: int, what: str) -> Dict[int, float]:
    """{scale: rate}. A rate list follows the order of the given scales (or the ascending default scales)."""
    given = None if scales_value is None else ([scales_value] if isinstance(scales_value, int) else list(scales_value))
    scales = resolve_scales(method, scales_value, num_scales)
    order = given if given is not None else scales
    vals = rates if isinstance(rates, list) else [rates] * len(order)
    if len(vals) != len(order):
        raise BenchError(f"method {method}: {what} has {len(vals)} values but there are {len(order)} scales "
                         f"{order}; give one value or one per scale")
    return {s: float(r) for s, r in zip(order, vals)}


# ------------------------------------------------------------------------------------------------ gates
class Gate(nn.Module):
    """Chooses the kept tokens of one block at one scale. `kept`: {scale: K}. select() returns
    (idx (rows, K) ascending positions, probs (rows, n) with grad or None, tokens scored by a learned linear)."""

    def __init__(self, kept: Dict[int, int]):
        super().__init__()
        self.kept = dict(kept)

    def active(self, si: Optional[int]) -> bool:
        return si is not None and si in self.kept

    def select(self, index: int, x, u, si: int):
        raise NotImplementedError


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest scores per row, in ascending position order (so rate 1 is the identity)."""
    if k >= scores.shape[1]:
        return torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    return scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values


class LearnedGate(Gate):
    """ActVAR's gated selector G: Linear(C,1) on the block's adaLN-modulated input LN(x)(1+s1)+sh1 (the
    attention input, which carries the class condition), softmax over the scale's tokens, top-K.
    Cost: C MACs per scored token (the paper's 2·L·H FLOPs overhead term)."""

    def __init__(self, selector: nn.Linear, kept: Dict[int, int]):
        super().__init__(kept)
        self.selector = selector

    def logits(self, u):
        return self.selector(u).squeeze(-1)

    def select(self, index, x, u, si):
        logits = self.logits(u)
        probs = logits.softmax(dim=-1)
        return topk_positions(logits, self.kept[si]), probs, u.shape[1]


class FixedState:
    """What block 0 chose at the current scale; read by every later block (plain object, shared by reference)."""

    def __init__(self):
        self.si: Optional[int] = None
        self.idx: Optional[torch.Tensor] = None


class FixedGate(Gate):
    """Fixed token pruning (ActVAR's baseline, Table 4): the subset is chosen once per scale at block 0 and reused
    by every block. Criteria: 'selector' (block 0's learned ActVAR selector scores), 'norm' (L2 norm of the block-0
    input token; elementwise, counted as 0 MACs), 'random' (uniform, seeded by seed and scale: the same draw in
    every generation with the same batch shape)."""

    def __init__(self, kept: Dict[int, int], criterion: str, state: FixedState, selector: Optional[nn.Linear] = None,
                 seed: int = 0):
        super().__init__(kept)
        self.criterion, self.state, self.seed = criterion, state, seed
        self.selector = selector            # only block 0's gate has one (criterion 'selector')

    def select(self, index, x, u, si):
        if index == 0:
            scored = 0
            if self.criterion == "selector":
                scores, scored = self.selector(u).squeeze(-1), u.shape[1]
            elif self.criterion == "norm":
                scores = x.float().norm(dim=-1)
            else:
                g = torch.Generator().manual_seed(self.seed * 1000 + si)
                scores = torch.rand(x.shape[0], x.shape[1], generator=g).to(x.device)
            self.state.si, self.state.idx = si, topk_positions(scores, self.kept[si])
            return self.state.idx, None, scored
        if self.state.si != si or self.state.idx is None or self.state.idx.shape[0] != x.shape[0]:
            raise RuntimeError(f"fixed token pruning: block {index} ran at scale {si} before block 0 chose tokens")
        return self.state.idx, None, 0


# ------------------------------------------------------------------------------------------------ block
def _ln_mod(block, x, scale, shift):
    return block.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class BlockView(nn.Module):
    """A wrapper around one AdaLNSelfAttn that shares its parameters: the methods' blocks (token gates, FastVAR,
    LiteVAR, ScaleKV, ToMe) subclass it for the `block`/`index` they keep, the `attn`/`ffn` the sampler and FLOP
    counts read, and the pieces of the block's computation a method rewrites one part of (`residual`, `qkv`,
    `project`): each computes what AdaLNSelfAttn / SelfAttention compute, op for op, so a method that changes
    nothing else gives the block's numbers bit for bit."""

    def __init__(self, block, index: int):
        super().__init__()
        self.block, self.index = block, index

    @property
    def attn(self):
        return self.block.attn

    @property
    def ffn(self):
        return self.block.ffn

    def residual(self, x, cond_BD, attend: Callable, ffn: Callable):
        """The block's two adaLN-modulated residual updates with its attention and FFN replaced by attend(u) and
        ffn(h) (u, h: the modulated inputs)."""
        g1, g2, s1, s2, sh1, sh2 = self.block.modulation(cond_BD)
        x = x + attend(_ln_mod(self.block, x, s1, sh1)).mul_(g1)
        return x + ffn(_ln_mod(self.block, x, s2, sh2)).mul(g2)

    def qkv(self, u, linear: Callable = F.linear):
        """q, k, v (rows, H, n, c) of the attention on its input u: one qkv projection (bias q_bias, 0, v_bias),
        q and k l2-normalised and q scaled where the attention does. linear(x, weight, bias): e.g. in another
        precision."""
        a = self.block.attn
        rows, n = int(u.shape[0]), int(u.shape[1])       # python ints also inside fvcore's jit trace
        bias = torch.cat((a.q_bias, a.zero_k_bias, a.v_bias))
        q, k, v = linear(u, a.mat_qkv.weight, bias).view(rows, n, 3, a.num_heads, a.head_dim) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        if a.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(a.scale_mul_1H11.clamp_max(a.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        return q, k, v

    def project(self, out, linear: Callable = F.linear):
        """Attention heads (rows, H, n, c) -> (rows, n, C) through the output projection."""
        rows, H, n, c = (int(v) for v in out.shape)
        proj = self.block.attn.proj
        return linear(out.transpose(1, 2).reshape(rows, n, H * c), proj.weight, proj.bias)


class VarView(nn.Module):
    """A net that wraps a VAR for the sampler (bench/sampling.py: scale_forward, new_caches, num_classes,
    patch_nums); each is the VAR's unless a subclass overrides it."""

    def __init__(self, var):
        super().__init__()
        self.var = var

    @property
    def num_classes(self):
        return self.var.num_classes

    @property
    def patch_nums(self):
        return self.var.patch_nums

    def new_caches(self):
        return self.var.new_caches()

    def scale_forward(self, si: int, x_in, label_B, caches):
        return self.var.scale_forward(si, x_in, label_B, caches)


class TokenGatedBlock(BlockView):
    """An AdaLNSelfAttn whose gated scales update only the kept tokens (eq. 8-9); shares the block's parameters.

    Training hooks (methods/actvar.py): with `aux` set to a list, a LearnedGate's block also computes the full
    dense block update of every token (pseudo-labels: tokens that change most) and appends its distillation and
    balance losses; with `straight_through` on (stage 1) the kept tokens' update is multiplied by p/p.detach()
    (value 1, so outputs are unchanged) so that the classification loss reaches the selector through top-k."""

    def __init__(self, block, index: int, gate: Gate, map_samples: int = MAP_SAMPLES):
        super().__init__(block, index)
        self.gate = gate
        self.map_samples = map_samples
        self.aux: Optional[list] = None
        self.aux_fn: Optional[Callable] = None
        self.straight_through = False
        self.reset_stats()

    def reset_stats(self):
        self.stats: Dict[int, dict] = {}
        self.last_idx: Dict[int, torch.Tensor] = {}

    def forward(self, x, cond_BD, attn_bias=None, cache=None, si: Optional[int] = None):
        if not self.gate.active(si) or cache is None:
            out = self.block(x, cond_BD, attn_bias, cache, si)
            if si is not None and cache is not None:
                self._record(si, x.shape[0], x.shape[1], x.shape[1], cache.k.shape[2], 0, None)
            return out
        blk = self.block
        g1, g2, s1, s2, sh1, sh2 = blk.modulation(cond_BD)
        u = _ln_mod(blk, x, s1, sh1)                                  # attention input of every token
        idx, probs, scored = self.gate.select(self.index, x, u, si)
        if self.aux is not None and self.aux_fn is not None:
            self.aux_fn(self, x, u, (g1, g2, s2, sh2), cache, si, idx, probs)
        C = x.shape[-1]
        idx_e = idx.unsqueeze(-1).expand(-1, -1, C)
        xs, us = x.gather(1, idx_e), u.gather(1, idx_e)
        xs2 = xs + blk.attn(us, None, cache).mul_(g1)              # appends the kept tokens' keys/values only
        xs2 = xs2 + blk.ffn(_ln_mod(blk, xs2, s2, sh2), si).mul(g2)
        if self.straight_through and probs is not None and torch.is_grad_enabled():
            p = probs.gather(1, idx)
            xs2 = xs + (xs2 - xs) * (p / p.detach()).unsqueeze(-1)
        self._record(si, x.shape[0], x.shape[1], idx.shape[1], cache.k.shape[2], scored, idx)
        return x.scatter(1, idx_e, xs2)                              # eq. 9: the others are copies of x

    @torch.no_grad()
    def _record(self, si, rows, n, kept, keys, scored, idx):
        with untraced():
            self._record_untraced(si, rows, n, kept, keys, scored, idx)

    def _record_untraced(self, si, rows, n, kept, keys, scored, idx):
        st = self.stats.get(si)
        if st is None:
            st = self.stats[si] = dict(rows=0, tokens=0, kept=0, score_pairs=0, scored=0, map=None, n=n)
            k = min(self.map_samples, rows // 2 if rows > 1 else rows)   # generate(): conditional rows first
            pn = int(round(math.sqrt(n)))
            if idx is not None and k > 0 and pn * pn == n:
                m = torch.zeros(k, n, dtype=torch.bool)
                m.scatter_(1, idx[:k].cpu(), True)
                st["map"] = m.view(k, pn, pn)
        st["rows"] += rows
        st["tokens"] += rows * n
        st["kept"] += rows * kept
        st["score_pairs"] += rows * kept * keys
        st["scored"] += rows * scored
        if idx is not None:
            self.last_idx[si] = idx


def full_block_update(block, x, u, mods, cache, si) -> torch.Tensor:
    """Output of the whole block on all tokens (dense FFN, attention over the present cache + every token), without
    touching the cache: the reference 'fully updated sequence' q_m* of ActVAR's selector pseudo-labels."""
    g1, g2, s2, sh2 = mods
    tmp = KVCache()
    tmp.k, tmp.v = cache.k, cache.v
    y = x + block.attn(u, None, tmp).mul(g1)
    return y + block.ffn(_ln_mod(block, y, s2, sh2), None).mul(g2)   # si=None: every FFN type runs dense


# ------------------------------------------------------------------------------------------------ nets
def var_modules(net) -> list:
    """Every VAR inside a net (the net itself, or e.g. both halves of DMoE's SwitchNet)."""
    found = [m for m in net.modules() if isinstance(m, VAR)]
    if not found:
        raise BenchError(f"cannot gate tokens of {type(net).__name__}: it contains no VAR blocks")
    return found


def gate_net(net, make_gate: Callable[[int], Gate]):
    """Wrap the blocks of every VAR in `net` in place (call on a clone_structure copy). make_gate(i) -> Gate."""
    for var in var_modules(net):
        for i, blk in enumerate(var.blocks):
            if isinstance(blk, TokenGatedBlock):
                raise BenchError("blocks are already token-gated: only one token method per run")
            var.blocks[i] = TokenGatedBlock(blk, i, make_gate(i))
    return net


def gated_blocks(net) -> List[TokenGatedBlock]:
    return [m for m in net.modules() if isinstance(m, TokenGatedBlock)]


def _merged_stats(net, si: int) -> Dict[int, dict]:
    """Per block index, the recorded stats at scale si (summed over the VARs of a SwitchNet)."""
    out: Dict[int, dict] = {}
    for b in gated_blocks(net):
        st = b.stats.get(si)
        if not st:
            continue
        m = out.setdefault(b.index, dict(rows=0, tokens=0, kept=0, score_pairs=0, scored=0, block=b))
        for k in ("rows", "tokens", "kept", "score_pairs", "scored"):
            m[k] += st[k]
    return out


def gated_macs(net, bundle, batch: int, ffn_macs_per_row: Callable, skipped=()) -> List[float]:
    """Per-scale transformer MACs for `batch` images (CFG: 2 rows each) from the recorded counts:
    projections 4C² and the FFN over kept tokens only, scores 2·C per (kept query, key present), the learned
    selector C per scored token; head, adaLN and word embedding as in the dense formula (bench/analytic.py).
    ffn_macs_per_row(block, si, st) -> FFN MACs per row of that block at si (st: the merged stats).
    `skipped`: scales no image runs (a step-skipping wrapper): 0."""
    cfg = bundle.var.cfg
    C, depth = cfg.embed_dim, cfg.depth
    rows_out = 2 * batch
    out = []
    for si, sm in enumerate(dense_scale_macs(cfg, batch)):
        per_block = _merged_stats(net, si)
        if si in skipped:
            if per_block:
                raise BenchError(f"scale {si} is skipped but its blocks recorded work")
            out.append(0.0)
            continue
        if len(per_block) != depth or any(st["rows"] == 0 for st in per_block.values()):
            raise BenchError(f"no recorded token statistics at scale {si}; generate before counting FLOPs")
        per_row = 0.0
        for st in per_block.values():
            R = st["rows"]
            per_row += (st["kept"] * 4 * C * C + st["score_pairs"] * 2 * C + st["scored"] * C) / R
            per_row += ffn_macs_per_row(st["block"], si, st)
        out.append(float(rows_out * per_row + sm.head + sm.adaln + sm.word_embed))
    return out


def plain_ffn_macs(block, si, st) -> float:
    """A full FFN on the kept tokens: 2·C·H per token."""
    ffn = block.ffn
    fc1 = ffn.fc1 if hasattr(ffn, "fc1") else ffn.dense.fc1
    return st["kept"] / st["rows"] * 2 * fc1.in_features * fc1.out_features


def token_row_metrics(net, bundle, prefix: str = "") -> dict:
    """Kept tokens per scale (mean over blocks, per row), realised token rate, coverage (share of tokens kept by at
    least one block, over the map samples) and token-activation maps (share of blocks keeping each token)."""
    S = len(bundle.var.patch_nums)
    kept: List[Optional[float]] = [None] * S
    rate: List[Optional[float]] = [None] * S
    coverage: List[Optional[float]] = [None] * S
    maps = {}
    blocks = gated_blocks(net)
    for si in range(S):
        per_block = _merged_stats(net, si)
        if not per_block:
            continue
        kept[si] = round(sum(st["kept"] / st["rows"] for st in per_block.values()) / len(per_block), 3)
        rate[si] = round(sum(st["kept"] / st["tokens"] for st in per_block.values()) / len(per_block), 5)
        ms = [b.stats[si]["map"] for b in blocks if si in b.stats and b.stats[si]["map"] is not None]
        if ms and len(ms) == len(per_block) and all(m.shape == ms[0].shape for m in ms):
            stack = torch.stack(ms).float()                                  # (blocks, samples, pn, pn)
            coverage[si] = round(float(stack.amax(0).mean()), 4)
            maps[str(si)] = [[[round(v, 3) for v in row] for row in sample] for sample in stack.mean(0).tolist()]
    import json
    return {f"{prefix}kept_tokens_per_scale": kept, f"{prefix}token_rate_effective_per_scale": rate,
            f"{prefix}token_coverage_per_scale": coverage,
            f"{prefix}token_maps": json.dumps(dict(samples=len(next(iter(maps.values()))) if maps else 0,
                                                   value="share of blocks that kept each token (conditional rows)",
                                                   maps=maps))}


def gated_kv_bytes(net, bundle, elem_bytes: float = 4, last: Optional[int] = None) -> float:
    """K/V bytes per image after the append of scale `last` (default: the last scale; with skipped scales, the last
    one run), from what the gated blocks recorded there: each block's cache holds the keys of the tokens it kept at
    every scale, i.e. the cache length its last queries saw (score_pairs / kept), in 2 rows per image (CFG)."""
    last = len(bundle.var.patch_nums) - 1 if last is None else last
    per_block = _merged_stats(net, last)
    if len(per_block) != bundle.var.cfg.depth or any(st["kept"] == 0 for st in per_block.values()):
        raise BenchError(f"no recorded token statistics at scale {last}; generate before counting KV-cache bytes")
    keys = [per_block[i]["score_pairs"] / per_block[i]["kept"] for i in sorted(per_block)]
    return kv_bytes(keys, bundle.var.cfg.embed_dim, 2, elem_bytes)
