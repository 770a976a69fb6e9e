"""Wall-clock timing of generation batches, per scale and decode (optimum-benchmark style).

    timer = BatchTimer(device)
    timer.start(); generate(..., timer=timer); laps = timer.stop()     # {"scale0": s, ..., "decode": s, "total": s}
    summary = summarize(batches, warmup=1)

On a GPU each lap records a CUDA event and `stop()` synchronises once, so the laps measure GPU work without
a host sync per scale; on a CPU laps are `time.perf_counter()` readings. `generate` calls `lap("scale{si}")`
after each scale (transformer + sampling + VQ-VAE residual update) and `lap("decode")` after decoding.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np
import torch


class BatchTimer:
    def __init__(self, device="cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_events" if self.cuda else "perf_counter"
        self._marks: List = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
        self._marks = [("start", self._now())]

    def lap(self, name: str):
        self._marks.append((name, self._now()))

    def stop(self) -> Dict[str, float]:
        """Seconds of each lap since the previous one, and 'total' since start()."""
        if self.cuda:
            torch.cuda.synchronize()
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
