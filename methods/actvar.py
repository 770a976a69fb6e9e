"""ActVAR (Zhang et al. 2025): dynamic experts in the FFN + a gated token selector per block, on the last scales.

../shared/METHODS.md §5; paper §3.2-3.4 and supplementary §6. Token machinery in methods/_tokens.py.

Registered methods (each prepared by `python -m bench prepare <name>`; artifacts of kind 'actvar'):
  actvar           both halves (kind weight+token)            Table 2's (α, β; γ)
  actvar-tokens    the token selector only (kind token)       Table 3 "w/o DW"
  actvar-experts   the expert router only (kind weight)       Table 3 "w/o AT"
The halves compose with other methods (methods/compose.py), e.g. dmoe + actvar-tokens.

Inference, per block m on a sparse scale (eq. 4, 8, 9):
  * selector G = Linear(C,1) on the block's adaLN-modulated input, softmax over the scale's n tokens; the top
    K_t = round(rate·n) tokens go through attention and FFN, the others are copied unchanged. The kept tokens'
    keys/values are all that block appends to its KV cache (see methods/_tokens.py).
  * FFN split into N equal contiguous experts (neurons [e·H/N, (e+1)·H/N)); router R = Linear(C,N) -> softmax;
    the top K_w = round(γ·N) experts run (methods/_experts.py: grouped or masked-dense), fc2's bias added once.
  Both linears are the sizes eq. 12's overhead term implies (2·L·H selector + 2·(1-η)·L·H·N router FLOPs).

Training (`prepare`), through `VAR.forward_by_scale` (teacher-forced inputs, scale by scale with KV caches,
which is where the sparse scales act), on real images of the model's dataset:
  stage 1  router + selector only, everything else frozen:
           L = CE + Σ_blocks mean_sparse_scales [0.05·(KL_w + KL_t) + 0.01·(bal_w + bal_t)]
           router label: per token, MSE of each expert's output (+b2) to the full FFN output, top-K_w smallest
           -> softmax; selector label: per token, mean squared change through the full dense block (attention
           over the present cache + all tokens), top-K_t largest -> softmax. KL(p ‖ label) as in eq. 6/11.
           Balance: GShard, M·Σ_i f_i·P_i (f_i: share of the top-K picks, P_i: mean probability; 1 = uniform),
           over experts for the router and over token positions (across the batch rows) for the selector.
           top-k has no gradient: the kept tokens' block update and each kept expert's output are multiplied by
           p/p.detach() (value exactly 1; forward unchanged) so that CE reaches router and selector.
  stage 2  router + selector frozen; attention, FFN (the experts), head fine-tuned with
           L = CE + KL(student ‖ teacher logits) + mean_blocks MSE(student hidden, teacher hidden)
  AdamW β=(0.9, 0.95), wd 0.05, lr 2e-4 (stage 2; stage 1 default 1e-3: see PREPARE_DEFAULTS), warm-up + cosine.
  Reading of the paper where it is loose: the labels' "σ(A)" is one softmax over the top-k entries of the
  per-row z-scored distances (raw MSEs are scale-dependent: ~1e-4 would make every label uniform), smoothed with
  ε=0.01 so that KL(p ‖ label) stays finite; CFG's unconditional rows are trained by dropping 10% of labels.

Artifact (bench/artifacts.py kind 'actvar', key: parts, scales, trained rates, experts, steps, seed):
  gates.safetensors (router/selector per block, float32), weights.safetensors (stage-2 tensors, float16; absent
  when steps2=0: the original weights are used), meta.json (recipe, losses before/after, timings), DONE.
Inference rates may differ from the trained ones (train_token_rate / train_weight_rate pick the artifact).

FLOPs: analytic_macs counts what ran (methods/_tokens.gated_macs): projections and FFN over kept tokens, scores
over the keys actually in each block's cache, K_w experts per kept token (2·C·H/N each) plus the router (C·N),
the selector (C per scored token). Beside it, row_metrics gives eq. 12 literally (`eq12_flops_saved`, the
paper's FLOPs = 2 MACs, per image with both CFG rows, L = the scale's tokens per row, H = C) and
`eq12_saved_fraction` = eq12 ÷ (2 × dense MACs); `macs_saved_fraction` is ours from the recorded counts.
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import BenchError
from bench.registry import Method, Param, clone_structure, register_method
from bench.log import progress as progress_iter
from methods import _experts, _moe, _tokens
from methods._tokens import LearnedGate, TokenGatedBlock, kept_count

KIND = "actvar"
RECIPE_VERSION = 1
STAGE1_KL, STAGE1_BAL = 0.05, 0.01          # eq. 19's α, β
LABEL_EPS = 0.01                            # label smoothing that keeps KL(p ‖ label) finite
# Sized for CPU minutes on the embedded default (d4, C=128). Stage 1 trains two small linears per block from
# scratch in a few hundred steps, hence a larger lr than the paper's 2e-4 (2 epochs of ImageNet); stage 2 keeps it.
PREPARE_DEFAULTS = dict(steps1=150, steps2=300, batch=16, lr1=1e-3, lr2=2e-4, images=1000, eval_images=64, seed=0,
                        uncond_fraction=0.1)
PARTS = {"actvar": "both", "actvar-tokens": "tokens", "actvar-experts": "experts"}


# ------------------------------------------------------------------------------------------------ losses
def pseudo_label(score: torch.Tensor, k: int, eps: float = LABEL_EPS) -> torch.Tensor:
    """σ(top-k(score)): softmax over the k largest (z-scored per row) entries, zero elsewhere, ε-smoothed."""
    M = score.shape[-1]
    z = (score - score.mean(-1, keepdim=True)) / (score.std(-1, unbiased=False, keepdim=True) + 1e-8)
    top = z.topk(min(k, M), dim=-1)
    lab = torch.zeros_like(z).scatter_(-1, top.indices, top.values.softmax(-1))
    return lab * (1 - eps) + eps / M


def kl_to_label(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ label) = Σ p (log p − log label), mean over rows (eq. 6, 11)."""
    logp = logits.log_softmax(-1)
    return (logp.exp() * (logp - label.log())).sum(-1).mean()


def balance_loss(probs: torch.Tensor, picked: torch.Tensor, k: int) -> torch.Tensor:
    """GShard load balance M·Σ_i f_i·P_i over the last dim (f: share of the picks, no grad; P: mean probability)."""
    M = probs.shape[-1]
    f = picked.float().reshape(-1, M).sum(0) / (picked.reshape(-1, M).shape[0] * k)
    return M * (f * probs.reshape(-1, M).mean(0)).sum()


def overlap(a_idx: torch.Tensor, b_scores: torch.Tensor, k: int) -> float:
    """Share of the picked set a that is also in the top-k of b (diagnostic: selection vs label)."""
    b_idx = b_scores.topk(min(k, b_scores.shape[-1]), dim=-1).indices
    hit = torch.zeros_like(b_scores, dtype=torch.bool).scatter_(-1, b_idx, True).gather(-1, a_idx)
    return float(hit.float().mean())


def token_aux(wrapper: TokenGatedBlock, x, u, mods, cache, si, idx, probs) -> None:
    """Selector distillation terms of one block at one scale (appended to wrapper.aux)."""
    with torch.no_grad():
        y = _tokens.full_block_update(wrapper.block, x, u, mods, cache, si)
        change = (y - x).float().pow(2).mean(-1)                          # (rows, n)
    k = idx.shape[1]
    logits = wrapper.gate.logits(u)
    picked = torch.zeros_like(change, dtype=torch.bool).scatter_(1, idx, True)
    wrapper.aux.append(dict(block=wrapper.index, si=si, part="t", kl=kl_to_label(logits, pseudo_label(change, k)),
                            bal=balance_loss(logits.softmax(-1), picked, k), overlap=overlap(idx, change, k)))


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
        self.straight_through = False
        self.reset_stats()

    fc1 = property(lambda self: self.dense.fc1)
    fc2 = property(lambda self: self.dense.fc2)
    act_name = property(lambda self: self.dense.act_name)

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
        k = top.shape[1]
        with torch.no_grad():
            C, N, e = self.dim, self.num_experts, self.expert_size
            outs = torch.einsum("tne,cne->tnc", h.detach(), self.fc2.weight.detach().view(C, N, e))
            dist = (outs - outs.sum(1, keepdim=True)).float().pow(2).mean(-1)   # MSE(e_j(x)+b2, F(x)), (T, N)
        picked = torch.zeros_like(dist, dtype=torch.bool).scatter_(1, top, True)
        self.aux.append(dict(block=self.index, si=si, part="w", kl=kl_to_label(logits, pseudo_label(-dist, k)),
                             bal=balance_loss(logits.softmax(-1), picked, k), overlap=overlap(top, -dist, k)))

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
        """MACs this layer spent at scale si over the recorded calls: experts 2·C·e per pair, router C·N per token."""
        st = self.stats.get(si)
        if not st or not st["tokens"]:
            raise BenchError(f"no recorded expert statistics at scale {si}; generate before counting FLOPs")
        pairs = st.get("pairs_run", st["pairs"])     # what ran: masked-dense calls run every expert
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


# ------------------------------------------------------------------------------------------------ artifacts
_LOADED: "OrderedDict[tuple, tuple]" = OrderedDict()
TRAINED = re.compile(r"^(blocks\.\d+\.(attn|ffn)\.|head\.|head_nm\.)")


def trained_names(var) -> List[str]:
    """Stage 2's trainable tensors in VAR naming: attention, FFN (the experts), head."""
    return [n for n, _ in var.named_parameters() if TRAINED.match(n)]


def load_artifact(bundle, directory: str, parts: str):
    """(base VAR, routers, selectors) of an artifact; base is bundle.var when stage 2 was skipped. Cached."""
    from bench.checkpoints import read_state_dict
    done = os.path.join(directory, "DONE")
    key = (os.path.realpath(directory), os.path.getmtime(done) if os.path.exists(done) else 0, str(bundle.device),
           bundle.model_id)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    var = bundle.var
    C, depth, H = var.C, len(var.blocks), var.blocks[0].ffn.fc1.out_features
    gates = read_state_dict(os.path.join(directory, "gates.safetensors"), "ActVAR gates")
    routers = selectors = None

    def linear(prefix, i):
        w, b = gates.get(f"blocks.{i}.{prefix}.weight"), gates.get(f"blocks.{i}.{prefix}.bias")
        if w is None or b is None or w.shape[1] != C:
            raise BenchError(f"ActVAR artifact {directory} does not match the model (block {i} {prefix}); "
                             f"re-run prepare")
        m = nn.Linear(C, w.shape[0])
        m.load_state_dict(dict(weight=w.float(), bias=b.float()))
        return m.to(bundle.device).eval().requires_grad_(False)
    if parts in ("both", "experts"):
        routers = [linear("router", i) for i in range(depth)]
        if H % routers[0].out_features:
            raise BenchError(f"ActVAR artifact {directory}: {routers[0].out_features} experts do not divide the FFN "
                             f"width {H}; re-run prepare")
    if parts in ("both", "tokens"):
        selectors = [linear("selector", i) for i in range(depth)]
    wpath = os.path.join(directory, "weights.safetensors")
    if os.path.isfile(wpath):
        sd = read_state_dict(wpath, "ActVAR fine-tuned weights")
        want = set(trained_names(var))
        own = dict(var.named_parameters())
        bad = sorted(set(sd) ^ want) + [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            raise BenchError(f"ActVAR weights {wpath} do not match the model {bundle.name} (e.g. {bad[0]}); "
                             f"re-run prepare")
        var = copy.deepcopy(bundle.var)
        var.load_state_dict(sd, strict=False)            # float16 on disk, the model's dtype in memory
        var = var.eval().requires_grad_(False)
    out = (var, routers, selectors)
    _LOADED[key] = out
    while len(_LOADED) > 3:
        _LOADED.popitem(last=False)
    return out


def read_meta(directory: str) -> dict:
    return _moe.read_meta(directory)


# ------------------------------------------------------------------------------------------------ methods
def _rate_param(name, default, help_, nullable=False):
    return Param(name, float, default, help_, low=0.0, high=1.0, low_open=True, list_ok=True, nullable=nullable)


COMMON_PARAMS = (
    Param("scales", int, None, "sparse scale indices (default: the last two)", low=0, list_ok=True, nullable=True),
    Param("steps1", int, PREPARE_DEFAULTS["steps1"], "artifact: stage-1 steps (router/selector)", low=0),
    Param("steps2", int, PREPARE_DEFAULTS["steps2"], "artifact: stage-2 steps (fine-tune; 0 = original weights)",
          low=0),
    Param("prepare_seed", int, PREPARE_DEFAULTS["seed"], "artifact: training seed", low=0),
)
TOKEN_PARAMS = (
    _rate_param("token_rate", 0.75, "token activation rate per sparse scale (α, β): one value or one per scale"),
    _rate_param("train_token_rate", None, "artifact: token rate it was trained at (default: token_rate)", True),
)
EXPERT_PARAMS = (
    _rate_param("weight_rate", 0.75, "FFN weight activation rate γ: K_w = round(γ·N) experts per token"),
    Param("experts", int, 16, "N equal contiguous experts (must divide the FFN width)", low=1),
    _rate_param("train_weight_rate", None, "artifact: weight rate it was trained at (default: weight_rate)", True),
)


class _ActVARBase(Method):
    parts: str = "both"
    artifacts = (KIND,)

    @property
    def has_tokens(self):
        return self.parts in ("both", "tokens")

    @property
    def has_experts(self):
        return self.parts in ("both", "experts")

    # ------------------------------------------------------------------ validation
    def check(self):
        c = self.config
        for what in ("token_rate", "train_token_rate", "weight_rate", "train_weight_rate"):
            if what in c:
                _tokens.check_scales_and_rates(self.name, c["scales"], c[what], what)

    def scales(self, bundle) -> List[int]:
        return _tokens.resolve_scales(self.name, self.config["scales"], len(bundle.var.patch_nums))

    def _rates(self, bundle, what: str, fallback: Optional[str] = None) -> Dict[int, float]:
        c = self.config
        value = c[what] if c.get(what) is not None else c[fallback]
        return _tokens.rates_by_scale(self.name, c["scales"], value, len(bundle.var.patch_nums), what)

    def kept_tokens(self, bundle, train: bool = False) -> Dict[int, int]:
        if not self.has_tokens:
            return {}
        rates = self._rates(bundle, "train_token_rate", "token_rate") if train else self._rates(bundle, "token_rate")
        return {s: kept_count(r, bundle.var.patch_nums[s] ** 2) for s, r in rates.items()}

    def kept_experts(self, bundle, train: bool = False) -> Dict[int, int]:
        if not self.has_experts:
            return {}
        rates = self._rates(bundle, "train_weight_rate", "weight_rate") if train else self._rates(bundle, "weight_rate")
        return {s: kept_count(r, self.config["experts"]) for s, r in rates.items()}

    def artifact_key(self, bundle) -> dict:
        c = self.config
        key = dict(recipe=RECIPE_VERSION, parts=self.parts, scales=self.scales(bundle), steps1=c["steps1"],
                   steps2=c["steps2"], seed=c["prepare_seed"])
        if self.has_tokens:
            r = self._rates(bundle, "train_token_rate", "token_rate")
            key["token_rate"] = [r[s] for s in sorted(r)]
        if self.has_experts:
            r = self._rates(bundle, "train_weight_rate", "weight_rate")
            key.update(experts=c["experts"], weight_rate=[r[s] for s in sorted(r)])
        return key

    def prepare_hint(self, bundle) -> str:
        k = self.artifact_key(bundle)
        fmt = lambda v: ",".join(f"{x:g}" for x in v)
        extra = f"--scales {','.join(map(str, k['scales']))}"
        if self.has_tokens:
            extra += f" --token-rates {fmt(k['token_rate'])}"
        if self.has_experts:
            extra += f" --weight-rate {fmt(k['weight_rate'])} --experts {k['experts']}"
        extra += f" --steps1 {k['steps1']} --steps2 {k['steps2']} --seed {k['seed']}"
        return _moe.prepare_command(bundle, self.name, extra)

    def check_model(self, bundle, need_artifact: bool = True):
        from bench.artifacts import find_artifact
        self.scales(bundle)
        self.kept_tokens(bundle), self.kept_tokens(bundle, train=True)
        if self.has_experts:
            H, N = bundle.var.blocks[0].ffn.fc1.out_features, self.config["experts"]
            if H % N:
                raise BenchError(f"method {self.name}: experts={N} does not divide the FFN width {H}; valid: "
                                 f"{', '.join(str(d) for d in range(1, H + 1) if H % d == 0)}")
            self.kept_experts(bundle), self.kept_experts(bundle, train=True)
        if need_artifact and find_artifact(KIND, bundle.model_id, self.artifact_key(bundle)) is None:
            raise BenchError(f"no prepared {self.name} artifact for model {bundle.name} with "
                             f"{json.dumps(self.artifact_key(bundle), sort_keys=True)}; run `{self.prepare_hint(bundle)}`")

    def artifact_dir(self, bundle) -> str:
        from bench.artifacts import find_artifact
        self.check_model(bundle)
        return find_artifact(KIND, bundle.model_id, self.artifact_key(bundle))

    # ------------------------------------------------------------------ build
    def build(self, bundle):
        d = self.artifact_dir(bundle)
        var, routers, selectors = load_artifact(bundle, d, self.parts)
        net = attach(var, self.parts, routers, selectors, self.kept_experts(bundle), self.kept_tokens(bundle))
        setattr(net, self.info_attr, dict(artifact=d, parts=self.parts, kept_tokens=self.kept_tokens(bundle),
                                          kept_experts=self.kept_experts(bundle)))
        return net

    @property
    def info_attr(self) -> str:
        """Where a net records which artifact this method used (one per method: halves may share a net)."""
        return self.name.replace("-", "_") + "_info"

    def apply_tokens(self, net, bundle):
        """Composition hook (methods/compose.py): gate `net`'s blocks with this artifact's selectors only (its
        fine-tuned weights are not used: the weight method provides the weights)."""
        d = self.artifact_dir(bundle)
        _, _, selectors = load_artifact(bundle, d, self.parts)
        kept = self.kept_tokens(bundle)
        net = _tokens.gate_net(net, lambda i: LearnedGate(selectors[i], kept))
        setattr(net, self.info_attr, dict(artifact=d, parts=self.parts))
        return net

    # ------------------------------------------------------------------ accounting
    def ffn_macs_per_row(self, block, si, st) -> float:
        ffn = block.ffn
        if isinstance(ffn, ActExpertFFN) and si in ffn.kept:
            return ffn.recorded_macs(si) / st["rows"]
        return _tokens.plain_ffn_macs(block, si, st)

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        if self.has_tokens:
            return _tokens.gated_macs(net, bundle, batch, self.ffn_macs_per_row)
        return expert_only_macs(net, bundle, batch)

    def eq12(self, net, bundle) -> Dict[str, float]:
        """Eq. 12 literally: Σ_scales Σ_blocks [8·η·L·H²·(1+2μ) − 2·L·H·(1 + (1−η)·N)] in the paper's FLOPs,
        with η = 1 − K_t/n, μ = 1 − K_w/N, L = n (tokens of the scale per row: the block input under KV caching),
        H = C, times 2 rows per image (CFG). A half without selector/router drops that overhead term."""
        from bench.analytic import dense_scale_macs
        cfg = bundle.var.cfg
        C, d, N = cfg.embed_dim, cfg.depth, self.config.get("experts", 0)
        kt, kw = self.kept_tokens(bundle), self.kept_experts(bundle)
        total = 0.0
        for si in sorted(set(kt) | set(kw)):
            n = cfg.patch_nums[si] ** 2
            eta = 1 - kt[si] / n if si in kt else 0.0
            mu = 1 - kw[si] / N if si in kw else 0.0
            overhead = (1 if si in kt else 0) + ((1 - eta) * N if si in kw else 0)
            total += 2 * d * (8 * eta * n * C * C * (1 + 2 * mu) - 2 * n * C * overhead)
        dense = sum(s.total for s in dense_scale_macs(cfg, 1))
        return dict(eq12_flops_saved=total, eq12_saved_fraction=total / (2 * dense))

    def row_metrics(self, net, bundle, totals: bool = True) -> Dict[str, Any]:
        """totals=False (inside a composition): skip the whole-run MAC totals and eq. 12."""
        from bench.analytic import dense_scale_macs
        S = len(bundle.var.patch_nums)
        info = getattr(net, self.info_attr, {})
        out: Dict[str, Any] = dict(actvar_parts=self.parts, sparse_scales=self.scales(bundle))
        out[self.name.replace("-", "_") + "_artifact"] = os.path.basename(info.get("artifact", ""))
        kt, kw = self.kept_tokens(bundle), self.kept_experts(bundle)
        if self.has_tokens:
            rates = self._rates(bundle, "token_rate")
            out["token_rate_per_scale"] = [rates.get(s) for s in range(S)]
            out.update(_tokens.token_row_metrics(net, bundle))
        if self.has_experts:
            rates = self._rates(bundle, "weight_rate")
            out.update(expert_row_metrics(net, bundle, self.config["experts"]))
            out["weight_rate"] = rates[max(rates)] if len(set(rates.values())) == 1 else None
            out["weight_rate_per_scale"] = [rates.get(s) for s in range(S)]
        if totals:
            dense = sum(s.total for s in dense_scale_macs(bundle.var.cfg, 1))
            out["macs_saved_fraction"] = round(1 - sum(self.analytic_macs(net, bundle, 1)) / dense, 6)
            out.update({k: round(v, 6) if "fraction" in k else float(v) for k, v in self.eq12(net, bundle).items()})
        try:
            meta = read_meta(info["artifact"]) if info.get("artifact") else {}
            key = meta.get("key", {})
            out["actvar_trained_token_rate"] = key.get("token_rate")
            out["actvar_trained_weight_rate"] = key.get("weight_rate")
        except (OSError, ValueError):
            pass
        return out

    @property
    def label(self) -> str:
        c = self.config
        fmt = lambda v: ",".join(f"{x:g}" for x in v) if isinstance(v, list) else f"{v:g}"
        parts = []
        if self.has_tokens:
            parts.append(f"tok={fmt(c['token_rate'])}")
        if self.has_experts:
            parts.append(f"w={fmt(c['weight_rate'])} N={c['experts']}")
        return f"{self.name} " + " ".join(parts)

    # ------------------------------------------------------------------ prepare hook (bench/commands/prepare.py)
    @classmethod
    def add_prepare_args(cls, p):
        D = PREPARE_DEFAULTS
        p.add_argument("--scales", default=None, help="sparse scale indices, comma-separated (default: the last two)")
        if cls.parts in ("both", "tokens"):
            p.add_argument("--token-rates", default="0.75", help="token activation rate(s) α,β: one, or one per scale")
        if cls.parts in ("both", "experts"):
            p.add_argument("--weight-rate", default="0.75", help="FFN weight rate γ (one, or one per scale)")
            p.add_argument("--experts", type=int, default=16, help="N experts (must divide the FFN width)")
        p.add_argument("--steps1", type=int, default=D["steps1"], help="stage 1 steps (router/selector)")
        p.add_argument("--steps2", type=int, default=D["steps2"], help="stage 2 steps (fine-tune; 0: keep weights)")
        p.add_argument("--batch", type=int, default=D["batch"], help="images per step (recorded)")
        p.add_argument("--lr1", type=float, default=D["lr1"], help="stage 1 peak lr (recorded)")
        p.add_argument("--lr", type=float, default=D["lr2"], help="stage 2 peak lr (recorded)")
        p.add_argument("--images", type=int, default=D["images"], help="training images (x2 with mirrors; recorded)")
        p.add_argument("--eval-images", type=int, default=D["eval_images"], help="validation images for the losses")
        p.add_argument("--seed", type=int, default=D["seed"])
        p.add_argument("--data", default=None, help="'shapes' or an image folder (default: the model's dataset)")
        p.add_argument("--force", action="store_true", help="redo even if a matching artifact exists")

    @classmethod
    def _from_args(cls, a):
        from bench.registry import create_method
        cfg = dict(steps1=a.steps1, steps2=a.steps2, prepare_seed=a.seed)
        if a.scales is not None:
            cfg["scales"] = _parse_list(a.scales, "--scales")
        if cls.parts in ("both", "tokens"):
            cfg["token_rate"] = _parse_list(a.token_rates, "--token-rates")
        if cls.parts in ("both", "experts"):
            cfg.update(weight_rate=_parse_list(a.weight_rate, "--weight-rate"), experts=a.experts)
        return create_method(cls.name, **cfg)

    @classmethod
    def validate_prepare_args(cls, a):
        m = cls._from_args(a)
        for flag, ok, valid in (("--batch", a.batch >= 1, ">= 1"), ("--lr1", a.lr1 > 0, "> 0"),
                                ("--lr", a.lr > 0, "> 0"), ("--images", a.images >= 1, ">= 1"),
                                ("--eval-images", a.eval_images >= 1, ">= 1"), ("--seed", a.seed >= 0, ">= 0")):
            if not ok:
                raise BenchError(f"{flag} must be {valid}, got {getattr(a, flag[2:].replace('-', '_'))}")
        if a.data is not None and a.data != "shapes" and not os.path.isdir(a.data):
            raise BenchError(f"--data: image folder not found: {a.data}; valid: 'shapes' or an image folder")
        return m

    @classmethod
    def prepare(cls, bundle, a, out_root: Optional[str]) -> str:
        from bench.artifacts import artifact_dir_for_writing
        m = cls.validate_prepare_args(a)
        m.check_model(bundle, need_artifact=False)
        data = a.data or _moe.default_data(bundle)
        if data is None:
            raise BenchError(f"model {bundle.name} has no built-in dataset; give --data <image folder>")
        key = m.artifact_key(bundle)
        recipe = dict(batch=a.batch, lr1=a.lr1, lr2=a.lr, images=a.images, eval_images=a.eval_images, data=data,
                      uncond_fraction=PREPARE_DEFAULTS["uncond_fraction"], stage1_kl=STAGE1_KL, stage1_bal=STAGE1_BAL,
                      label_eps=LABEL_EPS)
        d = artifact_dir_for_writing(KIND, bundle.model_id, key, out_root)
        if os.path.isfile(os.path.join(d, "DONE")) and not a.force:
            old = read_meta(d).get("recipe", {})
            if old != recipe:
                raise BenchError(f"{d} was made with {old}, not {recipe}; pass --force to redo it")
            _moe.log(f"reusing {d}")
            return d

        def write(tmp):
            result = train_actvar(bundle, m, recipe, progress=True)
            save_artifact(result, tmp)
            from methods.dmoe import _command, _env
            return dict(result["meta"], recipe=recipe, model=bundle.name, command=_command(), env=_env(),
                        weights_dtype="float16" if result["weights"] else None)
        return _moe.write_artifact(KIND, bundle.model_id, key, out_root, write, a.force)


def _parse_list(text, flag):
    parts = [s.strip() for s in str(text).split(",") if s.strip()]
    if not parts:
        raise BenchError(f"{flag} is empty")
    return parts if len(parts) > 1 else parts[0]


@register_method("actvar")
class ActVAR(_ActVARBase):
    kind = "weight+token"
    parts = "both"
    description = "ActVAR: router over N contiguous FFN experts + gated token selector per block (two-stage distill)"
    params = COMMON_PARAMS[:1] + TOKEN_PARAMS[:1] + EXPERT_PARAMS[:2] + TOKEN_PARAMS[1:] + EXPERT_PARAMS[2:] + \
        COMMON_PARAMS[1:]


@register_method("actvar-tokens")
class ActVARTokens(_ActVARBase):
    kind = "token"
    parts = "tokens"
    description = "ActVAR's gated token selector alone (Table 3 'w/o DW'); composable as a token method"
    params = COMMON_PARAMS[:1] + TOKEN_PARAMS + COMMON_PARAMS[1:]


@register_method("actvar-experts")
class ActVARExperts(_ActVARBase):
    kind = "weight"
    parts = "experts"
    description = "ActVAR's routed FFN experts alone (Table 3 'w/o AT'); composable as a weight method"
    params = COMMON_PARAMS[:1] + EXPERT_PARAMS + COMMON_PARAMS[1:]


# ------------------------------------------------------------------------------------------------ accounting helpers
def expert_only_macs(net, bundle, batch: int) -> List[float]:
    """Dense formula with each expert scale's FFN term replaced by the recorded Σ_layers (experts + router) per
    token × the scale's tokens (same protocol as DMoE: a weight method changes only the FFN term)."""
    from bench.analytic import dense_scale_macs
    layers = expert_layers(net)
    out = []
    for si, (sm, pn) in enumerate(zip(dense_scale_macs(bundle.var.cfg, batch), bundle.var.patch_nums)):
        total = sm.total
        if si in layers[0].kept:
            per_token = sum(layer.recorded_macs(si) / layer.stats[si]["tokens"] for layer in layers)
            total += per_token * 2 * batch * pn * pn - sm.ffn
        out.append(float(total))
    return out


def expert_row_metrics(net, bundle, num_experts: int) -> Dict[str, Any]:
    S = len(bundle.var.patch_nums)
    layers = expert_layers(net)
    active: List[Optional[int]] = [None] * S
    load: List[Optional[float]] = [None] * S
    for si in sorted(layers[0].kept):
        active[si] = layers[0].kept[si]
        usage = torch.stack([layer.stats[si]["usage"] for layer in layers if si in layer.stats]).float() \
            if any(si in layer.stats for layer in layers) else None
        if usage is not None:   # coefficient of variation of per-expert use, mean over layers (0 = balanced)
            cv = usage.std(1, unbiased=False) / usage.mean(1).clamp_min(1e-9)
            load[si] = round(float(cv.mean()), 4)
    return dict(num_experts=num_experts, active_experts_per_scale=active,
                active_expert_fraction_per_scale=[None if a is None else round(a / num_experts, 5) for a in active],
                expert_load_cv_per_scale=load)


# ------------------------------------------------------------------------------------------------ training
class HiddenCapture:
    """Outputs of every block over the scale-by-scale pass, concatenated per block: (rows, L, C) each."""

    def __init__(self, net):
        self.net, self.parts, self.handles = net, [[] for _ in net.blocks], []

    def __enter__(self):
        for i, blk in enumerate(self.net.blocks):
            self.handles.append(blk.register_forward_hook(lambda m, a, o, i=i: self.parts[i].append(o)))
        return self

    def hidden(self) -> List[torch.Tensor]:
        return [torch.cat(p, dim=1) for p in self.parts]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def scale_by_scale(net, label_B, x_BLCv, frozen_before: int = 0):
    """VAR.forward_by_scale, with scales before `frozen_before` run without autograd (stage 1: nothing trainable
    acts there, and their KV caches do not depend on the gates)."""
    caches, out = net.new_caches(), []
    grad = torch.is_grad_enabled()
    for si in range(len(net.patch_nums)):
        bg, ed = net.begin_ends[si]
        x_in = None if si == 0 else x_BLCv[:, bg - net.first_l:ed - net.first_l]
        with torch.set_grad_enabled(grad and si >= frozen_before):
            out.append(net.scale_forward(si, x_in, label_B, caches))
    return torch.cat(out, dim=1)


def _set(net, aux=None, straight_through=False):
    for mod in net.modules():
        if isinstance(mod, (TokenGatedBlock, ActExpertFFN)):
            mod.aux = aux
            mod.straight_through = straight_through
            if isinstance(mod, TokenGatedBlock):
                mod.aux_fn = token_aux if isinstance(mod.gate, LearnedGate) else None


def stage1_regulariser(aux: List[dict]):
    """Σ_blocks mean over its sparse scales of [0.05·(KL_w + KL_t) + 0.01·(bal_w + bal_t)] (eq. 19)."""
    per_block: Dict[int, Dict[int, list]] = {}
    for a in aux:
        per_block.setdefault(a["block"], {}).setdefault(a["si"], []).append(STAGE1_KL * a["kl"] + STAGE1_BAL * a["bal"])
    terms = [torch.stack([sum(v) for v in scales.values()]).mean() for scales in per_block.values()]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _summ(aux: List[dict]) -> dict:
    out = {}
    for part in ("w", "t"):
        xs = [a for a in aux if a["part"] == part]
        if xs:
            out[f"kl_{part}"] = float(torch.stack([a["kl"].detach() for a in xs]).mean())
            out[f"bal_{part}"] = float(torch.stack([a["bal"].detach() for a in xs]).mean())
            out[f"label_overlap_{part}"] = sum(a["overlap"] for a in xs) / len(xs)
    return out


def kl_student_teacher(s_logits, t_logits):
    """KL(student ‖ teacher) per token (eq. 21's direction), mean over tokens."""
    ls, lt = s_logits.float().log_softmax(-1), t_logits.float().log_softmax(-1)
    return (ls.exp() * (ls - lt)).sum(-1).mean()


@torch.no_grad()
def evaluate(net, teacher, vqvae, toks, labels, batch: int = 32) -> dict:
    """Validation losses of both stages on held-out images (conditional labels), averaged over rows."""
    aux: List[dict] = []
    _set(net, aux=aux)
    net.eval()
    sums: Dict[str, float] = {}
    n = labels.shape[0]
    try:
        for i in range(0, n, batch):
            pick = torch.arange(i, min(n, i + batch), device=labels.device)
            lab, x_in, gt = _moe.teacher_forcing_input(vqvae, toks, labels, pick)
            t_logits, t_hidden = teacher(lab, x_in, return_hidden=True)
            aux.clear()
            with HiddenCapture(net) as cap:
                s_logits = net.forward_by_scale(lab, x_in)
            V = s_logits.shape[-1]
            vals = dict(ce=F.cross_entropy(s_logits.reshape(-1, V), gt.reshape(-1)).item(),
                        teacher_ce=F.cross_entropy(t_logits.reshape(-1, V), gt.reshape(-1)).item(),
                        kl_teacher=kl_student_teacher(s_logits, t_logits).item(),
                        hidden_mse=float(sum(F.mse_loss(s, t) for s, t in zip(cap.hidden(), t_hidden)) / len(t_hidden)),
                        **_summ(aux))
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v * len(pick)
    finally:
        _set(net, aux=None)
    return {k: round(v / n, 6) for k, v in sums.items()}


def _lr_loop(name, net, params, steps, lr, batch, seed, toks, labels, vqvae, uncond, loss_fn, progress):
    from bench.train import lr_at
    history = []
    t0 = time.time()
    if steps == 0:
        return history, 0.0
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for step in (progress_iter(range(steps), desc=f"actvar {name}", unit="step", logger=_moe.logger)
                 if progress else range(steps)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
        pick = torch.randint(0, labels.shape[0], (batch,), generator=gen).to(labels.device)
        lab, x_in, gt = _moe.teacher_forcing_input(vqvae, toks, labels, pick)
        lab = _moe.drop_labels(lab, uncond, net.num_classes, gen)
        loss, logs = loss_fn(lab, x_in, gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            history.append(dict(step=step + 1, loss=round(loss.item(), 5), **{k: round(v, 5) for k, v in logs.items()}))
            if progress:
                _moe.log(f"actvar {name} step {step + 1}/{steps} loss {loss.item():.4f} " +
                         " ".join(f"{k} {v:.4f}" for k, v in logs.items()) +
                         f" ({(time.time() - t0) / (step + 1):.2f}s/step)")
    return history, time.time() - t0


def stage1(net, routers, selectors, steps, lr, batch, seed, toks, labels, vqvae, uncond, progress=False):
    """Train router + selector (everything else frozen): CE + eq. 19's distillation and balance terms."""
    net.requires_grad_(False)
    params = [p for ms in (routers or []) + (selectors or []) for p in ms.parameters()]
    for p in params:
        p.requires_grad_(True)
    aux: List[dict] = []
    _set(net, aux=aux, straight_through=True)
    net.train()
    first = min([s for m in net.modules() if isinstance(m, (ActExpertFFN, LearnedGate)) for s in m.kept], default=0)

    def loss_fn(lab, x_in, gt):
        aux.clear()
        logits = scale_by_scale(net, lab, x_in, frozen_before=first)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
        return ce + stage1_regulariser(aux), dict(ce=ce.item(), **_summ(aux))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _lr_loop("stage 1", net, params, steps, lr, batch, seed, toks, labels, vqvae, uncond, loss_fn,
                            progress)
    finally:
        _set(net, aux=None)
        net.requires_grad_(False).eval()


def stage2(net, base, teacher, steps, lr, batch, seed, toks, labels, vqvae, uncond, progress=False):
    """Router + selector frozen; fine-tune attention, FFN (experts) and head: CE + KL(s‖t) + mean_blocks MSE."""
    net.requires_grad_(False)
    names = set(trained_names(base))
    params = [p for n, p in base.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    _set(net, aux=None, straight_through=False)
    net.train()

    def loss_fn(lab, x_in, gt):
        with torch.no_grad():
            t_logits, t_hidden = teacher(lab, x_in, return_hidden=True)
        with HiddenCapture(net) as cap:
            logits = net.forward_by_scale(lab, x_in)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), gt.reshape(-1))
        kl = kl_student_teacher(logits, t_logits)
        mse = sum(F.mse_loss(s, t) for s, t in zip(cap.hidden(), t_hidden)) / len(t_hidden)
        return ce + kl + mse, dict(ce=ce.item(), kl_teacher=kl.item(), hidden_mse=mse.item())
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            return _lr_loop("stage 2", net, params, steps, lr, batch, seed + 1, toks, labels, vqvae, uncond, loss_fn,
                            progress)
    finally:
        net.requires_grad_(False).eval()


def train_actvar(bundle, method: _ActVARBase, recipe: dict, progress: bool = False) -> dict:
    """Both stages on the model's data. Returns dict(routers, selectors, weights (name -> fp16 tensor, or None),
    meta (losses before/after each stage, timings))."""
    t0 = time.time()
    c = method.config
    teacher = bundle.var.eval()
    base = copy.deepcopy(bundle.var).float().eval()
    C, H, depth = base.C, base.blocks[0].ffn.fc1.out_features, len(base.blocks)
    routers, selectors = new_gates(C, H, depth, method.parts, c.get("experts", 1), c["prepare_seed"], bundle.device)
    kt, kw = method.kept_tokens(bundle, train=True), method.kept_experts(bundle, train=True)
    net = attach(base, method.parts, routers, selectors, kw, kt)
    toks, labels = _moe.token_data(bundle, recipe["images"], "train", recipe["data"])
    vtoks, vlabels = _moe.token_data(bundle, recipe["eval_images"], "val", recipe["data"])
    args = dict(batch=recipe["batch"], seed=c["prepare_seed"], toks=toks, labels=labels, vqvae=bundle.vqvae,
                uncond=recipe["uncond_fraction"], progress=progress)
    before = evaluate(net, teacher, bundle.vqvae, vtoks, vlabels)
    hist1, sec1 = stage1(net, routers, selectors, c["steps1"], recipe["lr1"], **args)
    after1 = evaluate(net, teacher, bundle.vqvae, vtoks, vlabels)
    hist2, sec2 = stage2(net, base, teacher, c["steps2"], recipe["lr2"], **args)
    weights = None
    if c["steps2"] > 0:
        with torch.no_grad():     # what is stored (float16) is what will run from now on
            for n, p in base.named_parameters():
                if TRAINED.match(n):
                    p.copy_(p.half().float())
        weights = {n: p.detach().half().cpu() for n, p in base.named_parameters() if TRAINED.match(n)}
    after2 = evaluate(net, teacher, bundle.vqvae, vtoks, vlabels) if c["steps2"] > 0 else after1
    meta = dict(parts=method.parts, kept_tokens={str(k): v for k, v in kt.items()},
                kept_experts={str(k): v for k, v in kw.items()}, experts=c.get("experts"),
                val_before=before, val_after_stage1=after1, val_after_stage2=after2,
                history_stage1=hist1, history_stage2=hist2, seconds_stage1=round(sec1, 2),
                seconds_stage2=round(sec2, 2), seconds=round(time.time() - t0, 2), train_rows=int(labels.shape[0]),
                eval_rows=int(vlabels.shape[0]), data=recipe["data"])
    return dict(routers=routers, selectors=selectors, weights=weights, meta=meta, net=net)


def save_artifact(result: dict, directory: str) -> None:
    from bench.checkpoints import save_state_dict
    sd = {}
    for name, ms in (("router", result["routers"]), ("selector", result["selectors"])):
        for i, m in enumerate(ms or []):
            for k, v in m.state_dict().items():
                sd[f"blocks.{i}.{name}.{k}"] = v.float().cpu()
    save_state_dict(sd, os.path.join(directory, "gates.safetensors"))
    if result["weights"]:
        save_state_dict(result["weights"], os.path.join(directory, "weights.safetensors"))
