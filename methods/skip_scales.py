"""Step skipping (SkipVAR, arXiv 2506.08908, §"step redundancy"; code fakerone-li/SkipVAR): the last k scales are
not run. Their tokens are not generated (recorded as -1) and nothing is added to f_hat there, so the decoder sees
the sum of the computed scales, each already upsampled to the full token-map size by the VQ-VAE — what the
release does when it breaks out of its loop (summed codes, then decode). A skipped scale costs 0 transformer MACs;
the decoder's work is unchanged. skip=0 skips nothing: the dense model, bitwise.

Translation to the embedded default (7 scales, sides 1,2,3,4,5,6,8; 155 tokens): SkipVAR's static strategies skip
the last 1, 2 or 3 of Infinity's 13 steps (39%, 61%, 76% of its tokens); here the last scale alone is 41% of the
tokens, so skip=1 is the comparable mild setting and the default (skip=2 drops 65%).

    create_method("skip-scales", skip=1)
"""
from __future__ import annotations

from bench.registry import Param, register_method
from methods import _steps


@register_method("skip-scales")
class SkipScales(_steps.LastScalesMethod):
    display_name = "Skip scales (SkipVAR static)"
    family = "skip-scales"
    description = "step skipping: the last k scales are not run; f_hat is the upsampled sum of the computed scales (SkipVAR)"
    params = (Param("skip", int, 1, "how many of the last scales are not run (0: the dense model)", low=0),
              _steps.match_saved_param("skip"))
    k_param, allow_all, scales_column = "skip", False, "skipped_scales"

    def plan(self, k, num_scales):
        return num_scales - k, num_scales

    def skip(self, bundle) -> int:
        return self.k(bundle)
