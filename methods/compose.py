"""Composition: one weight method (sparse FFN) + one token method (token gating) in the same run.

    create_method("compose", weight="dmoe", token="actvar-tokens", **{"weight.tau": 0.8, "token.token_rate": 0.5})
    python -m bench ... --method compose weight=pruned-ffn token=fixed-tokens weight.fraction=0.25 token.criterion=norm

`weight` is any registered method of kind 'weight' (dmoe, pruned-ffn, actvar-experts, ...), `token` any of kind
'token' that has the `apply_tokens(net, bundle)` hook (actvar-tokens, fixed-tokens). Their parameters are given
with the prefixes `weight.` / `token.`, validated by the sub-methods, and recorded in full (defaults included) in
the run's config, so the row's param_* columns read e.g. param_weight.tau, param_token.token_rate.

Build: the weight method builds its net (its own weights: e.g. DMoE's fine-tuned ReLU model), a structural clone
of it is taken, and the token method gates every VAR block in it (both halves of DMoE's SwitchNet). A token
method's own fine-tuned weights are not used (actvar-tokens contributes its selectors only; fixed-tokens must
use weights=original): one run has one set of weights, the weight method's. Each half acts on its own scales;
both sets are recorded (compose_weight_scales is what the weight method reports, compose_token_scales the gated
ones). On a gated scale the weight method's FFN simply sees fewer tokens.

FLOPs (analytic_macs): the token gates' recorded counts (projections over kept tokens, scores over the keys
present, selector) as in methods/_tokens.gated_macs, with the FFN term taken from the weight method: its
per-scale MACs minus the dense non-FFN terms is its FFN cost over all tokens (its statistics are means per
processed token), scaled to the tokens each block kept. Exact when a weight method changes only the FFN term
and every block keeps the same number of tokens at a scale (true of every method here).

Incompatible compositions raise one BenchError line: a missing or unknown half, a half of the wrong kind (the
valid names are listed), a weight+token method as either half (compose its halves instead), a token method
without the hook, a token method asked to bring its own weights.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from bench.analytic import dense_scale_macs
from bench.errors import BenchError
from bench.registry import Method, Param, clone_structure, list_methods, method_class, register_method
from methods import _tokens


def _composable_tokens() -> List[str]:
    return [n for n in list_methods(kind="token") if callable(getattr(method_class(n), "apply_tokens", None))]


def _sub_metrics(method, net, bundle) -> Dict[str, Any]:
    """A half's row columns; methods that accept totals=False skip their own whole-run totals (meaningless here)."""
    import inspect
    if "totals" in inspect.signature(method.row_metrics).parameters:
        return method.row_metrics(net, bundle, totals=False)
    return method.row_metrics(net, bundle)


@register_method("compose")
class Compose(Method):
    kind = "weight+token"
    display_name = "Composition"
    family = "composition"
    description = "one weight method + one token method in the same run (weight=..., token=..., weight.X=, token.Y=)"
    params = (Param("weight", str, None, "a weight method (kind 'weight')"),
              Param("token", str, None, "a token method (kind 'token')"))

    def __init__(self, **config):
        weights = list_methods(kind="weight")
        tokens = _composable_tokens()
        wname, tname = config.pop("weight", None), config.pop("token", None)
        if not wname or not tname:
            raise BenchError(f"method compose needs weight=<{'|'.join(weights)}> and token=<{'|'.join(tokens)}>")
        for role, name, valid in (("weight", wname, weights), ("token", tname, tokens)):
            cls = method_class(name)                       # unknown name: error listing every method
            if name not in valid:
                hint = " (compose its halves: actvar-experts + actvar-tokens)" if cls.kind == "weight+token" else ""
                raise BenchError(f"method compose: {role}={name!r} is a {cls.kind!r} method, not a composable "
                                 f"{role} method{hint}; valid: {', '.join(valid)}")
        wcfg, tcfg = {}, {}
        for k, v in config.items():
            role, dot, sub = k.partition(".")
            if not dot or role not in ("weight", "token") or not sub:
                raise BenchError(f"method compose: unknown parameter {k!r}; valid: weight, token, weight.<param of "
                                 f"{wname}>, token.<param of {tname}>")
            (wcfg if role == "weight" else tcfg)[sub] = v
        self.weight_method = method_class(wname)(**wcfg)
        self.token_method = method_class(tname)(**tcfg)
        self.config = dict(weight=wname, token=tname,
                           **{f"weight.{k}": v for k, v in self.weight_method.config.items()},
                           **{f"token.{k}": v for k, v in self.token_method.config.items()})
        self.artifacts = tuple(dict.fromkeys(tuple(getattr(self.weight_method, "artifacts", ())) +
                                             tuple(getattr(self.token_method, "artifacts", ()))))
        self.check()

    def check(self):
        tm = self.token_method
        if tm.config.get("weights", "original") != "original":
            raise BenchError(f"method compose: token.weights={tm.config['weights']!r} brings a second set of weights; "
                             f"in a composition the weight method ({self.config['weight']}) provides them; valid: "
                             f"token.weights=original")

    def check_model(self, bundle):
        self.weight_method.check_model(bundle)
        self.token_method.check_model(bundle)

    def build(self, bundle):
        self.check_model(bundle)
        wnet = self.weight_method.build(bundle)
        net = clone_structure(wnet)        # never gate the weight method's own modules (or bundle.var)
        net = self.token_method.apply_tokens(net, bundle)
        net.compose_info = dict(weight=self.config["weight"], token=self.config["token"])
        return net

    # ------------------------------------------------------------------ accounting
    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        dense = dense_scale_macs(bundle.var.cfg, batch)
        w = self.weight_method.analytic_macs(net, bundle, batch) or [s.total for s in dense]
        depth, rows = bundle.var.cfg.depth, 2 * batch
        per_token = [(wt - (sm.total - sm.ffn)) / (rows * depth * pn * pn)      # weight FFN MACs per (token, block)
                     for wt, sm, pn in zip(w, dense, bundle.var.patch_nums)]
        return _tokens.gated_macs(net, bundle, batch, lambda block, si, st: per_token[si] * st["kept"] / st["rows"])

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # the token method's gated blocks decide what is cached (weight methods leave attention alone)
        return _tokens.gated_kv_bytes(net, bundle, elem_bytes)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        wm, tm = _sub_metrics(self.weight_method, net, bundle), _sub_metrics(self.token_method, net, bundle)
        gated = sorted(tm.get("sparse_scales") or [])
        if "expert_maps" in wm:      # DMoE's per-token maps assume all n tokens: not valid on gated scales
            try:
                em = json.loads(wm["expert_maps"])
                em["maps"] = {k: v for k, v in em.get("maps", {}).items() if int(k) not in gated}
                wm["expert_maps"] = json.dumps(em)
            except (TypeError, ValueError):
                pass
        out: Dict[str, Any] = {}
        for k, v in wm.items():
            out[k if k not in tm else f"weight_{k}"] = v
        for k, v in tm.items():
            out[k if k not in wm else f"token_{k}"] = v
        wscales = wm.get("sparse_scales") or wm.get("moe_scales") or wm.get("pruned_scales")
        out.update(compose_weight=self.config["weight"], compose_token=self.config["token"],
                   compose_weight_scales=wscales, compose_token_scales=gated,
                   compose_token_weights_used=False,
                   macs_saved_fraction=self.macs_saved_fraction(net, bundle))
        for k in ("weight_macs_saved_fraction", "token_macs_saved_fraction"):
            out.pop(k, None)
        return out

    @property
    def label(self) -> str:
        return f"{self.weight_method.label} + {self.token_method.label}"
