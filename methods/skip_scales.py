"""Step skipping (SkipVAR, arXiv 2506.08908, §"step redundancy"; code fakerone-li/SkipVAR): the last k scales are
not run. Their tokens are not generated (recorded as -1) and nothing is added to f_hat there, so the decoder sees
the sum of the computed scales, each already upsampled to the full token-map size by the VQ-VAE — what the
release does when it breaks out of its loop (summed codes, then decode). A skipped scale costs 0 transformer MACs;
the decoder's work is unchanged.

Translation to the embedded default (7 scales, sides 1,2,3,4,5,6,8; 155 tokens): SkipVAR's static strategies skip
the last 1, 2 or 3 of Infinity's 13 steps (39%, 61%, 76% of its tokens); here the last scale alone is 41% of the
tokens, so skip=1 is the comparable mild setting and the default (skip=2 drops 65%).

    create_method("skip-scales", skip=1)
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from bench.registry import Method, Param, register_method
from methods import _steps


@register_method("skip-scales")
class SkipScales(Method):
    kind = "token"
    display_name = "Skip scales (SkipVAR static)"
    family = "skip-scales"
    description = "step skipping: the last k scales are not run; f_hat is the upsampled sum of the computed scales (SkipVAR)"
    params = (Param("skip", int, 1, "how many of the last scales are not run", low=1),
              Param("match_saved", float, None, "overrides skip: the k whose saved share of the dense transformer "
                    "MACs is nearest to this", low=0.0, high=1.0, high_open=True, nullable=True))

    def skip(self, bundle) -> int:
        S = len(bundle.var.patch_nums)
        if self.config["match_saved"] is None:
            return self.config["skip"]
        return _steps.nearest_k(bundle.var.cfg, self.config["match_saved"], lambda k: (S - k, S), range(1, S))

    def check_model(self, bundle):
        _steps.check_last(self.name, "skip", self.skip(bundle), len(bundle.var.patch_nums), allow_all=False)

    def build(self, bundle):
        self.check_model(bundle)
        S = len(bundle.var.patch_nums)
        return _steps.StepNet(bundle.var, _steps.FixedPlan(stop=S - self.skip(bundle), nocfg=S))

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return net.analytic_macs(bundle, batch)

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        # the skipped scales append nothing: the largest cache is the one after the last scale run
        from bench.analytic import step_kv_bytes
        S = len(bundle.var.patch_nums)
        return step_kv_bytes(bundle.var.cfg, S - self.skip(bundle), S, elem_bytes)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        S = len(bundle.var.patch_nums)
        return dict(net.row_metrics(bundle), skipped_scales=list(range(S - self.skip(bundle), S)),
                    macs_saved_fraction=self.macs_saved_fraction(net, bundle))

    @property
    def label(self) -> str:
        if self.config["match_saved"] is not None:
            return f"skip-scales match {self.config['match_saved']:g} saved"
        return f"skip-scales k={self.config['skip']}"
