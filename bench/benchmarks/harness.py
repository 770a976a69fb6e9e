"""The measurement path's overhead (`python -m bench bench-harness`), as one ratio measured in one run.

    from bench.benchmarks.harness import run_harness
    report = run_harness(bundle, samples=100)      # a flat dict: report["harness_over_raw"], report["phase_s"] ...

Side by side on the same machine, same N samples, same batches, labels and seeds (bench.measure.SEED_SCHEME):
  raw      plain `generate` calls, nothing else (timed before and after the harness; their mean is used, so slow
           drift of a noisy machine affects both sides alike)
  harness  `measure(bundle, dense, ...)`: fvcore FLOP count, the same generation timed batch by batch with memory
           probes, quality metrics, same-seed fidelity + dense cache, the atomic row write
ratio = harness / raw (target <= HARNESS_TARGET). time_raw_vs_harness is the one timing of both sides that
bench-harness and bench-throughput share. The paired timing rounds against dense (bench.timing.PAIRED_PROTOCOL) are
measurement, not overhead: they are off unless `timing_rounds` asks for them.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from bench.atomic import atomic_path
from bench.defaults import DEFAULT_BATCH_SIZE, DEFAULT_FLOP_IMAGES
from bench.log import get_logger
from bench.registry import create_method

# torch and the modules that import it load inside the functions: importing bench.benchmarks must stay as light as
# the commands that name its constants while parsing (tests/test_cli_instant.py).

HARNESS_TARGET = 1.2
log = get_logger(__name__)


def one_time_imports() -> float:
    """What a process pays once (fvcore, torch-fidelity, torchmetrics' SSIM, pyarrow, the methods), done before any
    timing so that neither side pays it. Returns the seconds."""
    t = time.perf_counter()
    import bench.flops   # lazy: a one-time import, timed here
    import bench.quality  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    bench.flops._fvcore()
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure  # noqa: F401
    except ImportError:
        pass
    create_method("dense")
    return time.perf_counter() - t


def sync(device) -> None:
    """Wait for the device's queued work (CUDA), so that a wall-clock time covers it."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def raw_generation_s(bundle, labels, seed: int, sampling, batch_size: int) -> float:
    """Seconds of plain generate() calls over the same batches as measure() (outputs moved to the CPU, as there),
    under the caller's bench.precision.generation_dtype."""
    import torch
    from bench.measure import batch_ranges, batch_seed   # lazy: pulls torch (see the note at the top)
    from bench.sampling import generate   # lazy: pulls torch (see the note at the top)
    device = bundle.device
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        for b, (s, e) in enumerate(batch_ranges(len(labels), batch_size)):
            gen = generate(bundle.var, bundle.vqvae, labels[s:e].to(device), batch_seed(seed, b), sampling)
            gen.images.cpu()
    sync(device)
    return time.perf_counter() - t


@dataclass
class RawVsHarness:
    """Raw generation timed before and after one harness measurement of dense, on the same samples: wall seconds,
    and the process's CPU seconds (all its threads), which other processes on a busy machine barely move — the
    wall ratio of two runs minutes apart does not survive a load that changes between them (measured: raw 234 s
    before, 525 s after, as other work started)."""
    raw_s_before: float
    raw_s_after: float
    harness_s: float
    row: Dict[str, Any]          # the harness's results row
    raw_cpu_s_before: float = float("nan")
    raw_cpu_s_after: float = float("nan")
    harness_cpu_s: float = float("nan")

    @property
    def raw_s(self) -> float:
        return (self.raw_s_before + self.raw_s_after) / 2

    @property
    def harness_over_raw(self) -> float:
        return self.harness_s / self.raw_s

    @property
    def harness_over_raw_cpu(self) -> float:
        return self.harness_cpu_s / ((self.raw_cpu_s_before + self.raw_cpu_s_after) / 2)


def time_raw_vs_harness(bundle, *, samples: int, seed: int = 0, sampling=None,
                        batch_size: int = DEFAULT_BATCH_SIZE, dtype: str = "fp32", results_dir: Optional[str] = None,
                        profile: Optional[str] = None, say: Optional[Callable[[str], None]] = None,
                        **measure_kwargs) -> RawVsHarness:
    """A warm-up batch (so that neither side pays first-call costs: thread pools, allocator), raw generation, then
    `measure(bundle, "dense", ...)` with `measure_kwargs` (its row to `results_dir`; default a temporary directory,
    removed), then raw generation again. `profile`: write cProfile stats of the harness call to this file."""
    from bench.measure import measure, sample_labels   # lazy: pulls torch (see the note at the top)
    from bench.precision import generation_dtype   # lazy: pulls torch (see the note at the top)
    say = say or log.info
    sampling = sampling or bundle.sampling
    labels = sample_labels(samples, bundle.num_classes)
    with generation_dtype(dtype):
        raw_generation_s(bundle, labels[:min(batch_size, samples)], seed, sampling, batch_size)
    results = results_dir or tempfile.mkdtemp(prefix="varbench-harness-results-")
    try:
        c = time.process_time()
        with generation_dtype(dtype):
            raw1 = raw_generation_s(bundle, labels, seed, sampling, batch_size)
        cpu1 = time.process_time() - c
        say(f"  raw generation (before): {raw1:.3f} s ({cpu1:.3f} CPU s)")
        prof = None
        if profile:
            import cProfile
            prof = cProfile.Profile()
        t, c = time.perf_counter(), time.process_time()
        with (prof if prof is not None else contextlib.nullcontext()):
            row = measure(bundle, create_method("dense"), samples=samples, seed=seed, sampling=sampling,
                          batch_size=batch_size, results_dir=results, dtype=dtype, **measure_kwargs)
        harness, harness_cpu = time.perf_counter() - t, time.process_time() - c
        if prof is not None:
            with atomic_path(profile) as tmp:
                prof.dump_stats(tmp)
        say(f"  harness (measure dense): {harness:.3f} s ({harness_cpu:.3f} CPU s)")
        c = time.process_time()
        with generation_dtype(dtype):
            raw2 = raw_generation_s(bundle, labels, seed, sampling, batch_size)
        cpu2 = time.process_time() - c
        say(f"  raw generation (after): {raw2:.3f} s ({cpu2:.3f} CPU s)")
    finally:
        if results_dir is None:
            shutil.rmtree(results, ignore_errors=True)
    return RawVsHarness(raw_s_before=raw1, raw_s_after=raw2, harness_s=harness, row=row, raw_cpu_s_before=cpu1,
                        raw_cpu_s_after=cpu2, harness_cpu_s=harness_cpu)


def run_harness(bundle, *, samples: int, seed: int = 0, sampling=None, batch_size: int = DEFAULT_BATCH_SIZE,
                dtype: str = "fp32", flop_images: int = DEFAULT_FLOP_IMAGES, timing_rounds: int = 0,
                results_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                reference_count: Optional[int] = None, classifier: Optional[str] = None,
                say: Optional[Callable[[str], None]] = None) -> dict:
    """The bench-harness figures as a flat dict: harness_over_raw, the seconds of both sides, the harness's phases,
    whether the reference statistics came from the cache, and the machine (environment)."""
    from bench.env import environment   # lazy: pulls torch (see the note at the top)
    say = say or log.info
    imports = one_time_imports()
    say(f"one-time imports (fvcore, torch-fidelity, pyarrow, methods): {imports:.2f} s, outside both timings")
    t = time_raw_vs_harness(bundle, samples=samples, seed=seed, sampling=sampling, batch_size=batch_size,
                            dtype=dtype, results_dir=results_dir, say=say, flop_images=flop_images,
                            cache_dir=cache_dir, classifier=classifier, reference_count=reference_count,
                            timing_rounds=timing_rounds)
    return dict(harness_over_raw=t.harness_over_raw, harness_over_raw_cpu=t.harness_over_raw_cpu,
                harness_cpu_s=t.harness_cpu_s, harness_s=t.harness_s, raw_s=t.raw_s,
                raw_s_before=t.raw_s_before, raw_s_after=t.raw_s_after, one_time_imports_s=imports,
                phase_s=json.loads(t.row["phase_s"]), reference_cached=bool(t.row["reference_cached"]),
                dense_cache=t.row["dense_cache"], samples=samples, batch_size=batch_size, seed=seed, dtype=dtype,
                timing_rounds=timing_rounds, target=HARNESS_TARGET, environment=environment(bundle.device))
