"""ActVAR (Zhang et al. 2025): dynamic experts in the FFN + a gated token selector per block, on the last scales.

../shared/METHODS.md §5; paper §3.2-3.4 and supplementary §6. Token machinery in methods/_tokens.py; the expert
layer (ActExpertFFN) and how the nets are built in methods/_actvar_net.py. This module: the three registered
methods.

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

Training (`prepare`): two stages, stage 1 the router and selector, stage 2 the weights (methods/_actvar_train.py);
the settings of all three methods are declared once, in SETTINGS below (prepare's flags, the parameters that pick
an artifact and its key come from them).

Artifact (bench/artifacts.py kind 'actvar', key: parts, scales, trained rates, experts, steps, seed; files in
methods/_actvar_artifacts.py): gates.safetensors (router/selector per block, float32), weights.safetensors
(stage-2 tensors, float16; absent when steps2=0: the original weights are used), meta.json (recipe, losses
before/after, timings), DONE.
Inference rates may differ from the trained ones (train_token_rate / train_weight_rate pick the artifact).

FLOPs: analytic_macs counts the method's work (methods/_tokens.gated_macs): projections and FFN over kept tokens,
scores over the keys actually in each block's cache, K_w experts per kept token (2·C·H/N each, whichever expert
path ran them; inside bench.analytic.counting_executed() what the kernels ran) plus the router (C·N), the selector
(C per scored token). Beside it, row_metrics gives eq. 12 literally (`eq12_flops_saved`, the
paper's FLOPs = 2 MACs, per image with both CFG rows, L = the scale's tokens per row, H = C) and
`eq12_saved_fraction` = eq12 ÷ (2 × dense MACs); `macs_saved_fraction` is ours from the recorded counts. Eq. 12
understates the saving beside ours (embedded default: 6.1% vs 22.3% at the default rates), most of all for the
experts half alone, where η = 0 cancels its μ term (−0.5% vs 8.2%).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from bench.analytic import dense_scale_macs
from bench.artifacts import (artifact_dir_for_writing, provenance, read_meta, require_artifact, reusable,
                             write_artifact)
from bench.errors import BenchError
from bench.recipe import Recipe, Setting, prepare_command
from bench.registry import Method, Param, register_method
from methods import _actvar_train, _moe, _tokens
from methods._actvar_artifacts import load_artifact, save_artifact
from methods._actvar_net import ActExpertFFN, attach, expert_layers
from methods._moe_recipe import log
from methods._tokens import LearnedGate, kept_count

KIND = "actvar"
RECIPE_VERSION = 1
PARTS = {"actvar": "both", "actvar-tokens": "tokens", "actvar-experts": "experts"}


def _rate_param(name, default, help_, nullable=False):
    return Param(name, float, default, help_, low=0.0, high=1.0, low_open=True, list_ok=True, nullable=nullable)


# The prepare recipe of all three methods, declared once (each takes the settings of its parts). Sized for CPU
# minutes on the embedded default (d4, C=128). Stage 1 trains two small linears per block from scratch in a few
# hundred steps, hence a larger lr than the paper's 2e-4 (2 epochs of ImageNet); stage 2 keeps it. Keyed settings
# identify the artifact (the inference rates may differ from the trained ones: train_token_rate /
# train_weight_rate pick the artifact, see artifact_key); the others are recorded in its metadata.
SETTINGS = (
    Setting(Param("scales", int, None, "sparse scale indices (default: the last two)", low=0, list_ok=True,
                  nullable=True), artifacts=(KIND,), key="scales", sweep=True),
    Setting(_rate_param("token_rate", 0.75, "token activation rate per sparse scale (α, β): one value or one per "
                        "scale"), flag="--token-rates", artifacts=(KIND,), key="token_rate", sweep=True),
    Setting(_rate_param("weight_rate", 0.75, "FFN weight activation rate γ: K_w = round(γ·N) experts per token"),
            artifacts=(KIND,), key="weight_rate", sweep=True),
    Setting(Param("experts", int, 16, "N equal contiguous experts (must divide the FFN width)", low=1),
            artifacts=(KIND,), key="experts", sweep=True),
    Setting(Param("steps1", int, 150, "artifact: stage-1 steps (router/selector)", low=0),
            artifacts=(KIND,), key="steps1", sweep=True),
    Setting(Param("steps2", int, 300, "artifact: stage-2 steps (fine-tune; 0 = original weights)", low=0),
            artifacts=(KIND,), key="steps2", sweep=True),
    Setting(Param("prepare_seed", int, 0, "artifact: training seed", low=0), flag="--seed", artifacts=(KIND,),
            key="seed", sweep=True),
    Setting(Param("batch", int, 16, "images per step", low=1), artifacts=(KIND,)),
    Setting(Param("lr1", float, 1e-3, "stage 1 peak lr", low=0.0, low_open=True), artifacts=(KIND,)),
    Setting(Param("lr2", float, 2e-4, "stage 2 peak lr", low=0.0, low_open=True), flag="--lr", artifacts=(KIND,)),
    Setting(Param("images", int, 1000, "training images" + _moe.MIRRORS, low=1), artifacts=(KIND,)),
    Setting(Param("eval_images", int, 64, "validation images for the losses", low=1), artifacts=(KIND,)),
)
_NOT_IN = {"both": (), "tokens": ("weight_rate", "experts"), "experts": ("token_rate",)}
RECIPES = {parts: Recipe(*(s for s in SETTINGS if s.name not in skip),
                         fixed={KIND: dict(recipe=RECIPE_VERSION, parts=parts)})
           for parts, skip in _NOT_IN.items()}
TRAIN_TOKEN_RATE = _rate_param("train_token_rate", None, "artifact: token rate it was trained at (default: "
                               "token_rate)", True)
TRAIN_WEIGHT_RATE = _rate_param("train_weight_rate", None, "artifact: weight rate it was trained at (default: "
                                "weight_rate)", True)


# ------------------------------------------------------------------------------------------------ methods
class _ActVARBase(Method):
    parts: str = "both"
    artifacts = (KIND,)
    recipe = RECIPES["both"]

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

    def trained_at(self, bundle) -> dict:
        """The key entries resolved against the model: the scales, and the rates per scale it was trained at."""
        out = dict(scales=self.scales(bundle))
        if self.has_tokens:
            r = self._rates(bundle, "train_token_rate", "token_rate")
            out["token_rate"] = [r[s] for s in sorted(r)]
        if self.has_experts:
            r = self._rates(bundle, "train_weight_rate", "weight_rate")
            out["weight_rate"] = [r[s] for s in sorted(r)]
        return out

    def artifact_key(self, bundle, data: Optional[str] = None) -> dict:
        """data: prepare's --data (None: the model's own); its identity is part of the key (_moe.data_scope)."""
        return self.recipe.key(KIND, self.config, _moe.data_scope(bundle, data), **self.trained_at(bundle))

    def prepare_hint(self, bundle) -> str:
        return prepare_command(bundle, self.name, self.recipe.flags(self.config, **self.trained_at(bundle)))

    def check_model(self, bundle, need_artifact: bool = True):
        self.scales(bundle)
        self.kept_tokens(bundle), self.kept_tokens(bundle, train=True)
        if self.has_experts:
            H, N = bundle.var.blocks[0].ffn.fc1.out_features, self.config["experts"]
            if H % N:
                raise BenchError(f"method {self.name}: experts={N} does not divide the FFN width {H}; valid: "
                                 f"{', '.join(str(d) for d in range(1, H + 1) if H % d == 0)}")
            self.kept_experts(bundle), self.kept_experts(bundle, train=True)
        if need_artifact:
            self.artifact_dir(bundle)

    def artifact_dir(self, bundle) -> str:
        """The prepared artifact's directory, after the checks of check_model."""
        self.check_model(bundle, need_artifact=False)
        return require_artifact(KIND, bundle, self.artifact_key(bundle), self.prepare_hint(bundle), label=self.name)

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

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # unselected tokens append no keys/values (token gating); expert-only nets keep every token
        if self.has_tokens:
            return _tokens.gated_kv_bytes(net, bundle, elem_bytes)
        return super().kv_cache_bytes(net, bundle, elem_bytes)

    def eq12(self, net, bundle) -> Dict[str, float]:
        """Eq. 12 literally: Σ_scales Σ_blocks [8·η·L·H²·(1+2μ) − 2·L·H·(1 + (1−η)·N)] in the paper's FLOPs,
        with η = 1 − K_t/n, μ = 1 − K_w/N, L = n (tokens of the scale per row: the block input under KV caching),
        H = C, times 2 rows per image (CFG). A half without selector/router drops that overhead term."""
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
        S = len(bundle.var.patch_nums)
        info = getattr(net, self.info_attr, {})
        out: Dict[str, Any] = dict(actvar_parts=self.parts, sparse_scales=self.scales(bundle))
        out[self.name.replace("-", "_") + "_artifact"] = os.path.basename(info.get("artifact", ""))
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
            out["macs_saved_fraction"] = self.macs_saved_fraction(net, bundle)
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
    def prepare(cls, bundle, values: dict, out_root: Optional[str], data: Optional[str] = None,
                force: bool = False) -> str:
        (config,) = cls.recipe.method_configs(values)
        m = cls(**config)
        m.check_model(bundle, need_artifact=False)
        data = data or _moe.default_data(bundle)
        if data is None:
            raise BenchError(f"model {bundle.name} has no built-in dataset; give --data <image folder>")
        key = m.artifact_key(bundle, data)
        recipe = dict(cls.recipe.recorded(KIND, values), data=data, uncond_fraction=_actvar_train.UNCOND_FRACTION,
                      stage1_kl=_actvar_train.STAGE1_KL, stage1_bal=_actvar_train.STAGE1_BAL,
                      label_eps=_actvar_train.LABEL_EPS)
        d = artifact_dir_for_writing(KIND, bundle.model_id, key, out_root)
        if reusable(d, recipe, force):
            log(f"reusing {d}")
            return d

        def write(tmp):
            result = _actvar_train.train_actvar(bundle, m, recipe, progress=True)
            save_artifact(result, tmp)
            return dict(result["meta"], recipe=recipe, model=bundle.name, **provenance(),
                        weights_dtype="float16" if result["weights"] else None)
        return write_artifact(KIND, bundle.model_id, key, out_root, write, force)


@register_method("actvar")
class ActVAR(_ActVARBase):
    kind = "weight+token"
    display_name = "ActVAR"
    family = "actvar"
    paper_names = {"actvar-table-3": "w/ DW & AT", "actvar-table-4": "Dynamic token + weight (ActVAR)",
                   "actvar-table-5": "Dynamic weight + token (ActVAR)"}
    parts = "both"
    description = "ActVAR: router over N contiguous FFN experts + gated token selector per block (two-stage distill)"
    recipe = RECIPES["both"]
    params = (*recipe.params("scales", "token_rate", "weight_rate", "experts"), TRAIN_TOKEN_RATE, TRAIN_WEIGHT_RATE,
              *recipe.params("steps1", "steps2", "prepare_seed"))


@register_method("actvar-tokens")
class ActVARTokens(_ActVARBase):
    kind = "token"
    display_name = "ActVAR w/o DW (tokens only)"
    family = "actvar"
    paper_names = {"actvar-table-3": "w/o DW", "actvar-table-4": "Dynamic activating token"}
    parts = "tokens"
    description = "ActVAR's gated token selector alone (Table 3 'w/o DW'); composable as a token method"
    recipe = RECIPES["tokens"]
    params = (*recipe.params("scales", "token_rate"), TRAIN_TOKEN_RATE, *recipe.params("steps1", "steps2",
                                                                                        "prepare_seed"))


@register_method("actvar-experts")
class ActVARExperts(_ActVARBase):
    kind = "weight"
    display_name = "ActVAR w/o AT (experts only)"
    family = "actvar"
    paper_names = {"actvar-table-3": "w/o AT", "actvar-table-5": "Dynamic weight activation"}
    parts = "experts"
    description = "ActVAR's routed FFN experts alone (Table 3 'w/o AT'); composable as a weight method"
    recipe = RECIPES["experts"]
    params = (*recipe.params("scales", "weight_rate", "experts"), TRAIN_WEIGHT_RATE,
              *recipe.params("steps1", "steps2", "prepare_seed"))


# ------------------------------------------------------------------------------------------------ accounting helpers
def expert_only_macs(net, bundle, batch: int) -> List[float]:
    """Dense formula with each expert scale's FFN term replaced by the recorded Σ_layers (experts + router) per
    token × the scale's tokens (same protocol as DMoE: a weight method changes only the FFN term)."""
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
