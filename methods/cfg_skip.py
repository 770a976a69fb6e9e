"""Unconditional-branch replacement (SkipVAR, arXiv 2506.08908, §"unconditional branch redundancy"; code
fakerone-li/SkipVAR): on the last k scales the unconditional CFG row is not run — the batch is not doubled there —
and its logits are replaced by the conditional ones, so the guided logits (1+t)·cond − t·uncond are the
conditional logits (the release forms cfg·cond + (1−cfg)·cond). The unconditional rows' KV caches are dropped at
the first such scale (they are never read again). A CFG-free scale costs half the dense transformer MACs but for the
word embedding, which the dense model already runs once per image. last=0 keeps the branch everywhere: the dense
model, bitwise.

Translation to the embedded default (7 scales): SkipVAR replaces the branch on the last 1, 2 or 3 of Infinity's 13
steps (39%, 61%, 76% of its tokens); the last 2 of our 7 scales hold 65% of the tokens, the closest match to its
middle setting, which is the default.

    create_method("cfg-skip", last=2)
"""
from __future__ import annotations

from bench.registry import Param, register_method
from methods import _steps


@register_method("cfg-skip")
class CfgSkip(_steps.LastScalesMethod):
    display_name = "CFG-branch skip (SkipVAR static)"
    family = "cfg-skip"
    description = "unconditional-branch replacement: the last k scales run the conditional rows only (SkipVAR)"
    params = (Param("last", int, 2, "how many of the last scales run without the unconditional branch (0: the "
                    "dense model)", low=0),
              _steps.match_saved_param("last"))
    k_param, allow_all, scales_column = "last", True, "cfg_free_scales"

    def plan(self, k, num_scales):
        return num_scales, num_scales - k

    def last(self, bundle) -> int:
        return self.k(bundle)
