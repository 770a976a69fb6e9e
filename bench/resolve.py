"""Sample size as a target (`--resolve PCT`): a fixed schedule of looks, the per-look confidence level that keeps
the stated coverage over all of them, and the stopping rule.

    plan = make_plan(samples=10000, max_samples=60000, batch_size=50, target_pct=1)
    plan.looks            # (10000, 20000, 40000, 60000): each look doubles, the last is the budget
    plan.level            # 1 - 0.05/4 = 0.9875 for every look's interval
    outcome = run_looks(plan, evaluate)   # evaluate(n, level) -> Look; stops at the first look that decides

The looks are fixed before the first sample (they depend only on samples, max_samples and the batch size), so the
number of intervals that can be looked at is known: K. Each look's interval is computed at level 1 - α/K (α = 0.05,
Bonferroni); by the union bound the probability that ANY of the K intervals misses the true ΔFID is at most α, so
the interval reported at whichever look stops — whatever the stopping rule made of the earlier ones — covers with
probability >= 1 - α. (An uncorrected 95% interval re-examined after each round and stopped as soon as it excludes
0 covers less: tests/test_resolve.py measures both on synthetic features with a known ΔFID.)

At such levels the tails hold under 1% of the bootstrap resamples, which percentile intervals estimate poorly from
a few hundred of them; each look's interval is therefore the normal bootstrap interval ΔFID ± z·sd(resampled ΔFID)
(bench.quality.paired_fid_bootstrap, interval="normal").

A look stops the rounds when (in this order):
  halfwidth      the interval's half-width is <= target_pct % of dense FID (resolved: the difference is known to
                 within the target; the interval may still contain 0);
  excludes_zero  the interval excludes 0 (resolved: method and dense differ, in the interval's direction);
  max_samples    the last look was reached without either (not resolved).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from bench.defaults import MAX_RESOLVE_PCT as MAX_TARGET_PCT
from bench.errors import BenchError

ALPHA = 0.05
STOP_REASONS = ("halfwidth", "excludes_zero", "max_samples")
MAX_LOOKS = 20


@dataclass(frozen=True)
class ResolvePlan:
    target_pct: float                 # target half-width, % of dense FID
    looks: Tuple[int, ...]            # sample counts of the looks, increasing; the last is the budget
    alpha: float = ALPHA

    @property
    def level(self) -> float:
        """Confidence level of every look's interval (Bonferroni over the planned looks)."""
        return 1 - self.alpha / len(self.looks)

    @property
    def max_samples(self) -> int:
        return self.looks[-1]


@dataclass
class Look:
    """One look: ΔFID with its interval at the plan's level, and dense FID (the target's base)."""
    samples: int
    delta: float
    low: Optional[float]
    high: Optional[float]
    fid_dense: float

    @property
    def halfwidth_pct(self) -> Optional[float]:
        if self.low is None or self.high is None or not self.fid_dense > 0:
            return None
        return 100 * (self.high - self.low) / 2 / self.fid_dense

    def as_dict(self) -> dict:
        return dict(samples=self.samples, fid_delta=self.delta, ci_low=self.low, ci_high=self.high,
                    halfwidth_pct=self.halfwidth_pct)


@dataclass
class Outcome:
    plan: ResolvePlan
    looks: List[Look] = field(default_factory=list)
    reason: str = ""

    @property
    def resolved(self) -> bool:
        return self.reason in ("halfwidth", "excludes_zero")

    def columns(self) -> dict:
        """The ResolveRecord's columns (bench/records.py)."""
        return dict(resolve_target_pct=self.plan.target_pct, resolved=self.resolved, resolve_stop_reason=self.reason,
                    resolve_level=self.plan.level, resolve_looks=json.dumps([lk.as_dict() for lk in self.looks]),
                    max_samples=self.plan.max_samples)


def check_target(target_pct) -> float:
    try:
        t = float(target_pct)
    except (TypeError, ValueError):
        raise BenchError(f"resolve must be a percentage of dense FID (e.g. 1), got {target_pct!r}") from None
    if not (math.isfinite(t) and 0 < t <= MAX_TARGET_PCT):
        raise BenchError(f"resolve must be a percentage in (0, {MAX_TARGET_PCT:g}], got {target_pct!r}")
    return t


def make_plan(samples: int, max_samples: Optional[int], batch_size: int, target_pct) -> ResolvePlan:
    """Looks at samples, 2·samples, 4·samples, ... and max_samples (the budget; default 20·samples). Every look but
    the last is a whole number of batches, so that each look's samples are the first ones of the next look's
    (bench.measure.SEED_SCHEME: batch b has the same labels and seed whatever N is)."""
    target = check_target(target_pct)
    if max_samples is None:
        max_samples = 20 * samples
    if isinstance(max_samples, bool) or not isinstance(max_samples, int):
        raise BenchError(f"max samples must be an integer, got {max_samples!r}")
    if max_samples < samples:
        raise BenchError(f"max samples ({max_samples}) must be >= samples ({samples}), the first look")
    if samples % batch_size and max_samples > samples:
        raise BenchError(f"with resolve, samples ({samples}) must be a multiple of the batch size ({batch_size}): "
                         f"each look's batches are the first ones of the next look's")
    looks = [samples]
    while looks[-1] < max_samples:
        looks.append(min(2 * looks[-1], max_samples))
    if len(looks) > MAX_LOOKS:
        raise BenchError(f"resolve: samples {samples} to max samples {max_samples} takes {len(looks)} doubling looks; "
                         f"at most {MAX_LOOKS} (raise samples or lower max samples)")
    return ResolvePlan(target, tuple(looks))


def stop_reason(look: Look, plan: ResolvePlan, last: bool) -> Optional[str]:
    """Why this look ends the rounds, or None to go on (see the module docstring)."""
    hw = look.halfwidth_pct
    if hw is not None and hw <= plan.target_pct:
        return "halfwidth"
    if look.low is not None and look.high is not None and (look.low > 0 or look.high < 0):
        return "excludes_zero"
    return "max_samples" if last else None


def run_looks(plan: ResolvePlan, evaluate: Callable[[int, float], Look],
              on_look: Optional[Callable[[Look, Optional[str]], None]] = None) -> Outcome:
    """Evaluate the looks in order until one stops the rounds; evaluate(n, level) measures the first n samples."""
    out = Outcome(plan)
    for k, n in enumerate(plan.looks):
        look = evaluate(n, plan.level)
        out.looks.append(look)
        reason = stop_reason(look, plan, last=k == len(plan.looks) - 1)
        if on_look is not None:
            on_look(look, reason)
        if reason is not None:
            out.reason = reason
            break
    return out
