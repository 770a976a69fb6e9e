"""Wall-clock timing of generation batches, per scale and decode, and paired (ABBA) timing against dense.

    timer = BatchTimer(device)
    timer.start(); generate(..., timer=timer); laps = timer.stop()     # {"scale0": s, ..., "decode": s, "total": s}
    summary = summarize(batches, warmup=1)

    paired = PairedRounds(rounds=6, warmup=1, full_size=50)            # PAIRED_PROTOCOL
    out, laps = paired.run(b, run_method, run_dense)                   # one round on batch b's labels and seeds
    row.update(paired_summary(paired.done, num_scales, watch.stop(), cuda=False))

Absolute times of one trial cannot be compared with another trial's on a shared machine (load changes between
them); the paired rounds time the method and dense back to back on the same labels and seeds, alternating which
runs first, so load and drift act on both and cancel in their ratio.

On a GPU each lap records a CUDA event and `stop()` synchronises once, so the laps measure GPU work without
a host sync per scale; on a CPU laps are `time.perf_counter()` readings. `generate` calls `lap("scale{si}")`
after each scale (transformer + sampling + VQ-VAE residual update) and `lap("decode")` after decoding.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

DEFAULT_TIMING_ROUNDS = 6
EXTEND_HALFWIDTH = 0.08    # more rounds while the speedup interval is wider than +-8% ...
EXTEND_FACTOR = 4          # ... up to 4x the rounds asked for
SPEEDUP_RESAMPLES = 2000
PAIRED_PROTOCOL = (
    "paired ABBA: after at least one warm-up batch of each, K rounds (K+1 when K is odd); round r runs one batch of the method and one batch of "
    "dense (the loaded VAR) on the same labels and seeds, the method first in even rounds and dense first in odd "
    "ones; while the interval is wider than +-8% after K rounds, rounds continue in pairs (up to 4K); speedup = "
    "median over rounds of t_dense / t_method (whole batch: transformer, sampling, decode); 95% interval = "
    "percentile bootstrap of that median over rounds (2000 resamples); a dense row times dense against itself "
    "(A/A: speedup_aa) and has speedup 1 by definition")
# the thresholds of timing_noisy (documented in the README and in SCHEMA)
NOISY_CV = 0.15            # coefficient of variation of the method's or dense's round laps
NOISY_UTILIZATION = 0.6    # process CPU time / (wall x threads) over the generation phase (CPU only)
NOISY_LOAD_EXCESS = 1.0    # 1-min load average above cores + this, before or after that phase (CPU only)
NOISY_RULE = (f"timing_noisy: the CV of the method's or dense's round laps > {NOISY_CV}, or (CPU) process CPU "
              f"time / (wall x threads) over the generation phase (which holds the rounds) < {NOISY_UTILIZATION}, or "
              f"(CPU) the 1-min load average before or after that phase > cores + {NOISY_LOAD_EXCESS:g}")


class BatchTimer:
    def __init__(self, device="cpu", clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.kind = "cuda_events" if self.cuda else "perf_counter"
        self.clock = clock
        self._marks: List = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record(torch.cuda.current_stream(self.device))   # the measured GPU's stream, not the current device's
            return e
        return self.clock()

    def start(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._marks = [("start", self._now())]

    def lap(self, name: str):
        self._marks.append((name, self._now()))

    def stop(self) -> Dict[str, float]:
        """Seconds of each lap since the previous one, and 'total' since start()."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            dt = lambda a, b: a.elapsed_time(b) / 1e3
        else:
            dt = lambda a, b: b - a
        out = {}
        for (_, prev), (name, cur) in zip(self._marks, self._marks[1:]):
            out[name] = out.get(name, 0.0) + dt(prev, cur)
        out["total"] = dt(self._marks[0][1], self._marks[-1][1]) if len(self._marks) > 1 else 0.0
        return out


def percentile(values, q: float) -> Optional[float]:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def summarize(batches: List[Dict[str, float]], sizes: List[int], warmup: int, num_scales: int) -> dict:
    """Statistics over the timed batches (the first `warmup` are excluded).

    Per-batch statistics (median, p10, p90, per scale, decode) use the full-size batches only when there are
    any (a smaller last batch would skew them); images/s uses every timed batch: images / seconds."""
    timed = list(zip(batches[warmup:], sizes[warmup:]))
    full = [t for t, n in timed if n == max(sizes)] or [t for t, _ in timed]
    totals = [t["total"] for t in full]
    per_scale = [percentile([t.get(f"scale{si}", 0.0) for t in full], 50) for si in range(num_scales)]
    secs, imgs = sum(t["total"] for t, _ in timed), sum(n for _, n in timed)
    return dict(
        time_median_s=percentile(totals, 50), time_p10_s=percentile(totals, 10), time_p90_s=percentile(totals, 90),
        time_per_scale_median_s=per_scale, time_decode_median_s=percentile([t.get("decode", 0.0) for t in full], 50),
        images_per_s=imgs / secs if secs > 0 else None, timing_batches=len(timed), timed_images=imgs,
    )


# ---------------------------------------------------------------------------------------------- paired rounds
@dataclass
class PairedRound:
    batch: int                   # the batch whose labels and seeds both ran
    method_first: bool
    method: Dict[str, float]     # BatchTimer laps of the method's batch
    dense: Dict[str, float]      # BatchTimer laps of dense's batch


class PairedRounds:
    """The ABBA schedule of PAIRED_PROTOCOL. `run(b, run_method, run_dense)` runs one round on batch b:
    run_method() -> (output, laps), run_dense() -> laps; dense is warmed up once before the first round.

    After `rounds` rounds, more are run (up to EXTEND_FACTOR x rounds, in pairs so the order stays balanced) while
    the speedup interval is wider than +-EXTEND_HALFWIDTH of the speedup: a busy machine costs time, not accuracy;
    a quiet one costs nothing extra."""

    def __init__(self, rounds: int, warmup: int, full_size: int, max_rounds: Optional[int] = None):
        # at least one batch of the method before the first round, as dense gets one (warmup_batches 0 would pair a
        # cold method with a warm dense)
        self.rounds, self.warmup, self.full_size = rounds, max(1, warmup), full_size
        self.max_rounds = max(rounds, max_rounds if max_rounds is not None else EXTEND_FACTOR * rounds)
        self.done: List[PairedRound] = []
        self.dense_warm = False

    def resolved(self) -> bool:
        """Is the speedup interval within +-EXTEND_HALFWIDTH (relative)?"""
        med, lo, hi = bootstrap_median(_ratios(self.done, "total"), resamples=500)
        return med > 0 and (hi - lo) / 2 <= EXTEND_HALFWIDTH * med

    @property
    def complete(self) -> bool:
        n = len(self.done)
        if n < self.rounds:
            return False
        return n >= self.max_rounds or (n % 2 == 0 and self.resolved())

    def wants(self, b: int, size: int) -> bool:
        """Pair batch b? The first `rounds` full-size batches after the warm-up ones."""
        return not self.complete and b >= self.warmup and size == self.full_size

    def run(self, b: int, run_method: Callable[[], Tuple[object, Dict[str, float]]],
            run_dense: Callable[[], Dict[str, float]]):
        if not self.dense_warm:
            run_dense()
            self.dense_warm = True
        method_first = len(self.done) % 2 == 0
        if method_first:
            out, m = run_method()
            d = run_dense()
        else:
            d = run_dense()
            out, m = run_method()
        self.done.append(PairedRound(b, method_first, m, d))
        return out, m


def bootstrap_median(values: Sequence[float], resamples: int = SPEEDUP_RESAMPLES, seed: int = 0,
                     level: float = 0.95) -> Tuple[float, float, float]:
    """(median, low, high): the median and its percentile-bootstrap interval."""
    v = np.asarray(values, dtype=float)
    med = float(np.median(v))
    if len(v) < 2:
        return med, med, med
    rng = np.random.default_rng(seed)
    boot = np.median(v[rng.integers(0, len(v), (resamples, len(v)))], axis=1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return med, float(lo), float(hi)


def coefficient_of_variation(values: Sequence[float]) -> Optional[float]:
    v = np.asarray(values, dtype=float)
    if len(v) < 2 or v.mean() <= 0:
        return None
    return float(v.std(ddof=1) / v.mean())


class MachineWatch:
    """What the timing saw of the machine: load average before/after, and how much CPU the process got."""

    def __init__(self, threads: Optional[int] = None):
        self.threads = threads or torch.get_num_threads()

    @staticmethod
    def _load() -> Optional[float]:
        try:
            return float(os.getloadavg()[0])
        except (OSError, AttributeError):
            return None

    def start(self) -> "MachineWatch":
        self.load_before, self.cpu0, self.wall0 = self._load(), time.process_time(), time.perf_counter()
        return self

    def stop(self) -> dict:
        wall, cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0
        return dict(load_avg_before=self.load_before, load_avg_after=self._load(),
                    cpu_utilization=cpu / (wall * self.threads) if wall > 0 else None,
                    cores=os.cpu_count() or 1, threads=self.threads)


def noisy_reasons(cv: Optional[float], machine: dict, cuda: bool) -> List[str]:
    """Why the timing of a trial is flagged noisy (NOISY_RULE); empty when it is not."""
    out = []
    if cv is not None and cv > NOISY_CV:
        out.append(f"lap CV {cv:.2f} > {NOISY_CV}")
    if not cuda:
        util = machine.get("cpu_utilization")
        if util is not None and util < NOISY_UTILIZATION:
            out.append(f"CPU utilization {util:.2f} < {NOISY_UTILIZATION}")
        limit = machine.get("cores", 1) + NOISY_LOAD_EXCESS
        loads = [x for x in (machine.get("load_avg_before"), machine.get("load_avg_after")) if x is not None]
        if loads and max(loads) > limit:
            out.append(f"load average {max(loads):.1f} > {limit:g}")
    return out


def _ratios(rounds: Sequence[PairedRound], key: str) -> List[float]:
    return [r.dense[key] / r.method[key] for r in rounds
            if r.method.get(key, 0) > 0 and r.dense.get(key) is not None]


def paired_summary(rounds: Sequence[PairedRound], num_scales: int, machine: dict, cuda: bool,
                   self_paired: bool = False, seed: int = 0) -> dict:
    """Row columns of the paired rounds. self_paired: the method IS dense (A/A): speedup is 1 by definition and
    the measured ratio goes to speedup_aa*."""
    if not rounds:
        raise ValueError("paired_summary needs at least one round")
    med, lo, hi = bootstrap_median(_ratios(rounds, "total"), seed=seed)
    per_scale = [float(np.median(r)) if (r := _ratios(rounds, f"scale{si}")) else None for si in range(num_scales)]
    t_m, t_d = [r.method["total"] for r in rounds], [r.dense["total"] for r in rounds]
    cvs = [c for c in (coefficient_of_variation(t_m), coefficient_of_variation(t_d)) if c is not None]
    cv = max(cvs) if cvs else None
    reasons = noisy_reasons(cv, machine, cuda)
    out = dict(speedup=med, speedup_ci_low=lo, speedup_ci_high=hi, speedup_per_scale=per_scale,
               speedup_aa=None, speedup_aa_ci_low=None, speedup_aa_ci_high=None,
               timing_rounds=len(rounds), timing_protocol=PAIRED_PROTOCOL,
               time_paired_method_median_s=float(np.median(t_m)), time_paired_dense_median_s=float(np.median(t_d)),
               timing_cv=cv, load_avg_before=machine.get("load_avg_before"),
               load_avg_after=machine.get("load_avg_after"), cpu_utilization=machine.get("cpu_utilization"),
               timing_noisy=bool(reasons), timing_noisy_reason="; ".join(reasons))
    if self_paired:
        out.update(speedup=1.0, speedup_ci_low=1.0, speedup_ci_high=1.0, speedup_per_scale=[1.0] * num_scales,
                   speedup_aa=med, speedup_aa_ci_low=lo, speedup_aa_ci_high=hi)
    return out


EFFICIENCY_MIN_MACS_CHANGE = 0.01   # below 1% of FLOPs saved (or added) the ratio is noise over ~0


def time_flop_efficiency(speedup: Optional[float], macs_ratio: Optional[float]) -> Optional[float]:
    """Time saved / FLOPs saved = (1 - 1/speedup) / (1 - macs_ratio); None where the MACs change by less than
    EFFICIENCY_MIN_MACS_CHANGE (the quotient would divide timing noise by ~0)."""
    if speedup is None or macs_ratio is None or speedup <= 0 or abs(1 - macs_ratio) < EFFICIENCY_MIN_MACS_CHANGE:
        return None
    return (1 - 1 / speedup) / (1 - macs_ratio)
