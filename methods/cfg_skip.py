"""Unconditional-branch replacement (SkipVAR, arXiv 2506.08908, §"unconditional branch redundancy"; code
fakerone-li/SkipVAR): on the last k scales the unconditional CFG row is not run — the batch is not doubled there —
and its logits are replaced by the conditional ones, so the guided logits (1+t)·cond − t·uncond are the
conditional logits (the release forms cfg·cond + (1−cfg)·cond). The unconditional rows' KV caches are dropped at
the first such scale (they are never read again). A CFG-free scale costs half the dense transformer MACs but for the
word embedding, which the dense model already runs once per image.

Translation to the embedded default (7 scales): SkipVAR replaces the branch on the last 1, 2 or 3 of Infinity's 13
steps (39%, 61%, 76% of its tokens); the last 2 of our 7 scales hold 65% of the tokens, the closest match to its
middle setting, which is the default.

    create_method("cfg-skip", last=2)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from bench.registry import Method, Param, register_method
from methods import _steps


@register_method("cfg-skip")
class CfgSkip(Method):
    kind = "token"
    display_name = "CFG-branch skip (SkipVAR static)"
    family = "cfg-skip"
    description = "unconditional-branch replacement: the last k scales run the conditional rows only (SkipVAR)"
    params = (Param("last", int, 2, "how many of the last scales run without the unconditional branch", low=1),
              Param("match_saved", float, None, "overrides last: the k whose saved share of the dense transformer "
                    "MACs is nearest to this", low=0.0, high=1.0, high_open=True, nullable=True))

    def last(self, bundle) -> int:
        S = len(bundle.var.patch_nums)
        if self.config["match_saved"] is None:
            return self.config["last"]
        return _steps.nearest_k(bundle.var.cfg, self.config["match_saved"], lambda k: (S, S - k), range(1, S + 1))

    def check_model(self, bundle):
        _steps.check_last(self.name, "last", self.last(bundle), len(bundle.var.patch_nums), allow_all=True)

    def build(self, bundle):
        self.check_model(bundle)
        S = len(bundle.var.patch_nums)
        return _steps.StepNet(bundle.var, _steps.FixedPlan(stop=S, nocfg=S - self.last(bundle)))

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return net.analytic_macs(bundle, batch)

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # the unconditional rows leave the caches at the first CFG-free scale: one row per image at the last
        from bench.analytic import step_kv_bytes
        S = len(bundle.var.patch_nums)
        return step_kv_bytes(bundle.var.cfg, S, S - self.last(bundle), elem_bytes)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        S = len(bundle.var.patch_nums)
        return dict(net.row_metrics(bundle), cfg_free_scales=list(range(S - self.last(bundle), S)),
                    macs_saved_fraction=self.macs_saved_fraction(net, bundle))

    @property
    def label(self) -> str:
        if self.config["match_saved"] is not None:
            return f"cfg-skip match {self.config['match_saved']:g} saved"
        return f"cfg-skip k={self.config['last']}"
