"""Fixed token pruning: ActVAR's baseline (../shared/METHODS.md §6, paper Table 4).

The same number of kept tokens per scale as ActVAR at the same rates (K = round(rate·n), methods/_tokens.py),
but the subset is chosen once per scale, at the first block, and reused by every block; the unselected tokens
pass through all blocks unchanged (and are never appended to any block's KV cache). Criteria:
  norm      L2 norm of the block-0 input token (needs nothing; the default)
  random    uniform, seeded by `seed` and the scale index (the same draw for every generation of a batch shape)
  selector  block 0's learned ActVAR selector scores (needs an ActVAR artifact: `selector_from` names which,
            identified like that method: train_token_rate, steps1, steps2, prepare_seed, and for 'actvar' also
            experts and train_weight_rate)
weights: 'original' runs the loaded model; 'artifact' the stage-2 fine-tuned weights of that same ActVAR artifact
(standalone only: in a composition the weight method provides the weights).

    create_method("fixed-tokens", token_rate=0.75, criterion="norm")            # last two scales
    create_method("fixed-tokens", token_rate=[0.5, 0.75], scales=[5, 6], criterion="selector")
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from bench.registry import Method, Param, clone_structure, create_method, register_method
from methods import _tokens
from methods._actvar_artifacts import load_artifact
from methods._tokens import FixedGate, FixedState, kept_count
from methods.actvar import RECIPES


@register_method("fixed-tokens")
class FixedTokens(Method):
    kind = "token"
    display_name = "Fixed token pruning"
    family = "fixed-tokens"
    description = "fixed token pruning: one subset per scale chosen at block 0, reused by every block (ActVAR's baseline)"
    params = (
        Param("scales", int, None, "pruned scale indices (default: the last two)", low=0, list_ok=True, nullable=True),
        Param("token_rate", float, 0.75, "kept share of each pruned scale's tokens: one value or one per scale",
              low=0.0, high=1.0, low_open=True, list_ok=True),
        Param("criterion", str, "norm", "how block 0 chooses", choices=("norm", "random", "selector")),
        Param("seed", int, 0, "criterion=random: seed", low=0, high=2 ** 40),   # seed*1000 + scale fits int64
        Param("weights", str, "original", "original model, or the selector artifact's fine-tuned weights",
              choices=("original", "artifact")),
        Param("selector_from", str, "actvar-tokens", "ActVAR artifact giving the selector (criterion=selector) "
              "or the weights (weights=artifact)", choices=("actvar-tokens", "actvar")),
        Param("train_token_rate", float, None, "artifact: token rate it was trained at (default: token_rate)",
              low=0.0, high=1.0, low_open=True, list_ok=True, nullable=True),
        Param("train_weight_rate", float, 0.75, "artifact (selector_from=actvar): weight rate", low=0.0, high=1.0,
              low_open=True, list_ok=True),
        # the ActVAR artifact's settings (selector_from=actvar: experts too), ActVAR's own declarations
        *RECIPES["both"].params("experts", "steps1", "steps2", "prepare_seed"),
    )

    @property
    def needs_artifact(self) -> bool:
        return self.config["criterion"] == "selector" or self.config["weights"] == "artifact"

    def check(self):
        c = self.config
        _tokens.check_scales_and_rates(self.name, c["scales"], c["token_rate"], "token_rate")
        _tokens.check_scales_and_rates(self.name, c["scales"], c["train_token_rate"], "train_token_rate")
        self.artifacts = ("actvar",) if self.needs_artifact else ()

    def source_method(self):
        """The ActVAR method whose artifact provides the selector/weights."""
        c = self.config
        cfg = dict(scales=c["scales"], token_rate=c["token_rate"], train_token_rate=c["train_token_rate"],
                   steps1=c["steps1"], steps2=c["steps2"], prepare_seed=c["prepare_seed"])
        if c["selector_from"] == "actvar":
            cfg.update(experts=c["experts"], weight_rate=c["train_weight_rate"])
        return create_method(c["selector_from"], **cfg)

    def kept_tokens(self, bundle) -> Dict[int, int]:
        c = self.config
        rates = _tokens.rates_by_scale(self.name, c["scales"], c["token_rate"], len(bundle.var.patch_nums),
                                       "token_rate")
        return {s: kept_count(r, bundle.var.patch_nums[s] ** 2) for s, r in rates.items()}

    def check_model(self, bundle):
        self.kept_tokens(bundle)
        if self.needs_artifact:
            self.source_method().check_model(bundle)

    # ------------------------------------------------------------------ build
    def apply_tokens(self, net, bundle):
        """Gate `net`'s blocks in place (net: a clone_structure copy). Also the composition hook."""
        c = self.config
        selector = None
        if c["criterion"] == "selector":
            src = self.source_method()
            _, _, selectors = load_artifact(bundle, src.artifact_dir(bundle), src.parts)
            selector = selectors[0]
        kept, state = self.kept_tokens(bundle), FixedState()
        _tokens.gate_net(net, lambda i: FixedGate(kept, c["criterion"], state, selector if i == 0 else None,
                                                  c["seed"]))
        return net

    def build(self, bundle):
        self.check_model(bundle)
        var = bundle.var
        if self.config["weights"] == "artifact":
            src = self.source_method()
            var, _, _ = load_artifact(bundle, src.artifact_dir(bundle), src.parts)
        return self.apply_tokens(clone_structure(var), bundle)

    # ------------------------------------------------------------------ accounting
    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return _tokens.gated_macs(net, bundle, batch, _tokens.plain_ffn_macs)

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # pruned tokens append no keys/values: each block's cache holds the tokens it kept
        return _tokens.gated_kv_bytes(net, bundle, elem_bytes)

    def row_metrics(self, net, bundle, totals: bool = True) -> Dict[str, Any]:
        c = self.config
        S = len(bundle.var.patch_nums)
        rates = _tokens.rates_by_scale(self.name, c["scales"], c["token_rate"], S, "token_rate")
        out = dict(token_rate_per_scale=[rates.get(s) for s in range(S)], fixed_criterion=c["criterion"],
                   sparse_scales=sorted(rates))
        out.update(_tokens.token_row_metrics(net, bundle))
        if totals:      # not inside a composition, whose FFN is another method's
            out["macs_saved_fraction"] = self.macs_saved_fraction(net, bundle)
        return out

    @property
    def label(self) -> str:
        r = self.config["token_rate"]
        r = ",".join(f"{x:g}" for x in r) if isinstance(r, list) else f"{r:g}"
        return f"fixed-tokens tok={r} {self.config['criterion']}"
