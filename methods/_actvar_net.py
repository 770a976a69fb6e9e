"""ActVAR's model parts (methods/actvar.py: the methods; methods/_actvar_train.py: their training): the expert
FFN (ActExpertFFN), fresh routers and selectors, and a net with either or both attached.

The FFN is split into N equal contiguous experts (neurons [e·H/N, (e+1)·H/N)); a router R = Linear(C,N) ->
softmax picks the top K_w = round(γ·N) experts per token (methods/_experts.py runs them: grouped or masked-dense),
fc2's bias added once. The token selector is methods/_tokens.py's LearnedGate over a Linear(C,1).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import BenchError
from bench.registry import clone_structure
from methods import _experts, _moe, _tokens
from methods._tokens import LearnedGate


# ------------------------------------------------------------------------------------------------ expert FFN
class ActExpertFFN(nn.Module):
    """The FFN as N contiguous experts with a softmax router, top-K_w per token on chosen scales; the unchanged FFN
    elsewhere (and in the teacher-forced masked pass). Shares the FFN's parameters. Records per scale the tokens
    it processed, the (token, expert) pairs run and per-expert use (reset_stats)."""

    def __init__(self, ffn, router: nn.Linear, kept: Dict[int, int], index: int = 0):
        super().__init__()
        self.dense, self.router, self.kept, self.index = ffn, router, dict(kept), index
        H = ffn.fc1.out_features
        self.num_experts = router.out_features
        self.dim, self.expert_size = ffn.fc1.in_features, H // self.num_experts
        self.aux: Optional[list] = None
        self.aux_fn: Optional[Callable] = None    # set with aux by the trainer (as the token gates' in _tokens)
        self.straight_through = False
        self.reset_stats()

    fc1 = property(lambda self: self.dense.fc1)
    fc2 = property(lambda self: self.dense.fc2)
    act_name = property(lambda self: self.dense.act_name)
    expert_execution_key = staticmethod(_experts.execution_key)   # bench/measure.generation_key

    def reset_stats(self):
        self.stats: Dict[int, dict] = {}

    def experts(self):
        """(w1 (N,e,C), b1 (N,e), w2 (N,C,e)) as views of fc1/fc2: contiguous neuron blocks."""
        N, e, C = self.num_experts, self.expert_size, self.dim
        return (self.fc1.weight.view(N, e, C), self.fc1.bias.view(N, e),
                self.fc2.weight.view(C, N, e).permute(1, 0, 2))

    def forward(self, x, si: Optional[int] = None):
        if si is None or si not in self.kept:
            return self.dense(x, si)
        shape, k = x.shape, self.kept[si]
        x2 = x.reshape(-1, shape[-1])
        logits = self.router(x2)
        N = self.num_experts
        top = logits.topk(k, dim=1, sorted=False).indices if k < N else \
            torch.arange(N, device=x.device).expand(x2.shape[0], -1)
        ran = None
        if self.aux is not None or torch.is_grad_enabled():          # training/evaluation: masked dense compute
            gate = torch.zeros_like(logits).scatter_(1, top, 1.0)
            if self.straight_through and torch.is_grad_enabled():
                p = logits.softmax(-1)
                gate = gate * (p / p.detach())
            h = _moe.activation(self.act_name, self.fc1(x2)).view(-1, N, self.expert_size)
            out = F.linear((h * gate.unsqueeze(-1)).view(x2.shape[0], -1), self.fc2.weight, self.fc2.bias)
            if self.aux is not None:
                self._aux(x2, h, logits, top, si)
        else:                                                         # inference: only the selected experts run
            # scatter of a tensor, not of the scalar True: jit tracing (fvcore) cannot take a bool Scalar here
            mask = torch.zeros(logits.shape, dtype=torch.bool, device=x.device).scatter_(
                1, top, torch.ones_like(top, dtype=torch.bool))
            w1, b1, w2 = self.experts()
            out, ran = _experts.execute(x2, mask, w1, b1, w2, self.act_name)
            out = out + self.fc2.bias
        self._record(si, x2.shape[0], top)
        if ran is not None:
            _experts.record(self.stats[si], ran)
        return out.view(shape)

    def _aux(self, x2, h, logits, top, si):
        """Training and validation only: the router's distillation terms (aux_fn: methods/_actvar_train.py's)."""
        if self.aux_fn is not None:
            self.aux.append(self.aux_fn(self, h, logits, top, si))

    @torch.no_grad()
    def _record(self, si, tokens, top):
        with _tokens.untraced():
            self._record_untraced(si, tokens, top)

    def _record_untraced(self, si, tokens, top):
        st = self.stats.setdefault(si, dict(tokens=0, pairs=0, usage=torch.zeros(self.num_experts, dtype=torch.long)))
        st["tokens"] += tokens
        st["pairs"] += tokens * top.shape[1]
        st["usage"] += torch.bincount(top.reshape(-1).cpu(), minlength=self.num_experts)

    def recorded_macs(self, si: int) -> float:
        """MACs of this layer at scale si over the recorded calls: experts 2·C·e per routed pair (per pair that ran
        inside counting_executed()), router C·N per token."""
        st = self.stats.get(si)
        if not st or not st["tokens"]:
            raise BenchError(f"no recorded expert statistics at scale {si}; generate before counting FLOPs")
        pairs = _experts.macs_pairs(st)     # routed, or inside counting_executed() what ran
        return pairs * 2 * self.dim * self.expert_size + st["tokens"] * self.dim * self.num_experts


def expert_layers(net) -> List[ActExpertFFN]:
    return [m for m in net.modules() if isinstance(m, ActExpertFFN)]


# ------------------------------------------------------------------------------------------------ building nets
def attach(var, parts: str, routers, selectors, kept_w: Dict[int, int], kept_t: Dict[int, int]):
    """A clone of `var` (parameters shared) with ActVAR's experts and/or token gates on the given scales."""
    net = clone_structure(var)
    if parts in ("both", "experts"):
        for i, blk in enumerate(net.blocks):
            blk.ffn = ActExpertFFN(blk.ffn, routers[i], kept_w, index=i)
    if parts in ("both", "tokens"):
        _tokens.gate_net(net, lambda i: LearnedGate(selectors[i], kept_t))
    return net


def new_gates(C: int, H: int, depth: int, parts: str, experts: int, seed: int, device):
    """Fresh routers Linear(C,N) and selectors Linear(C,1) (PyTorch's default init, seeded)."""
    if parts in ("both", "experts") and H % experts:
        raise BenchError(f"experts={experts} does not divide the FFN width {H}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        routers = [nn.Linear(C, experts) for _ in range(depth)] if parts in ("both", "experts") else None
        selectors = [nn.Linear(C, 1) for _ in range(depth)] if parts in ("both", "tokens") else None
    mv = lambda ms: None if ms is None else [m.to(device) for m in ms]
    return mv(routers), mv(selectors)
