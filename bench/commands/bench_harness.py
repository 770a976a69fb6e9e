"""`python -m bench bench-harness`: the measurement path's overhead, as one ratio measured in one run.

Side by side on the same machine, same N samples, same batches, labels and seeds (bench.measure.SEED_SCHEME):
  raw      plain `generate` calls, nothing else (timed before and after the harness; their mean is used, so slow
           drift of a noisy machine affects both sides alike)
  harness  `measure(bundle, dense, ...)`: fvcore FLOP count, the same generation timed batch by batch with memory
           probes, quality metrics, same-seed fidelity + dense cache, the atomic row write
ratio = harness / raw (target <= 1.2). The row goes to a temporary results directory unless --results is given.
The paired timing rounds against dense (bench.timing.PAIRED_PROTOCOL) are measurement, not overhead: they are off
here unless --timing-rounds asks for them (their cost on a sweep is stated in the README, "Sweeps").
"""
from __future__ import annotations

from bench.commands._common import add_benchmark_args

ORDER = 90


def register(sub):
    from bench.defaults import DEFAULT_FLOP_IMAGES
    p = sub.add_parser("bench-harness", help="benchmark: harness wall time / raw generation time (target <= 1.2)")
    add_benchmark_args(p, samples=1000)
    p.add_argument("--flop-images", type=int, default=DEFAULT_FLOP_IMAGES)
    p.add_argument("--timing-rounds", type=int, default=0,
                   help="paired rounds against dense inside the harness (default 0: overhead only)")
    p.add_argument("--results", default=None, help="keep the harness row here (default: a temporary directory)")
    p.add_argument("--cache-dir", default=None, help="cache root (default VARBENCH_CACHE or ~/.cache/var-bench)")
    p.add_argument("--reference-count", type=int, default=None, help="reference images (default: the quality default)")
    p.add_argument("--classifier", default=None, help="classifier .safetensors (default: the model's shipped one)")
    p.set_defaults(func=run)


def run(a):
    import json
    import shutil
    import tempfile
    import time
    from bench.commands._common import bundle_from_args, check_benchmark_args, sampling_from_args
    from bench.throughput import raw_generation_s
    from bench.env import describe, environment
    from bench.measure import measure, sample_labels
    from bench.precision import generation_dtype
    from bench.registry import create_method
    from bench.results import check_results_dir
    check_benchmark_args(a, timing_rounds=(0,))
    if a.results is not None:
        check_results_dir(a.results)
    t = time.perf_counter()
    import bench.flops, bench.quality, pyarrow.parquet  # noqa: F401,E401  one-time imports of a process
    bench.flops._fvcore()
    create_method("dense")
    imports = time.perf_counter() - t
    bundle = bundle_from_args(a)
    sampling = sampling_from_args(a, bundle)
    labels = sample_labels(a.samples, bundle.num_classes)
    env = environment(bundle.device)
    print(f"bench-harness: {bundle.name} ({bundle.model_id}), N={a.samples}, batch {a.batch_size}, seed {a.seed}, "
          f"{a.dtype}")
    print(f"machine: {describe(env, bundle.device)}")
    print(f"one-time imports (fvcore, torch-fidelity, pyarrow, methods): {imports:.2f} s, outside both timings")
    # warm-up: one batch, so that neither side pays first-call costs (thread pools, allocator)
    with generation_dtype(a.dtype):
        raw_generation_s(bundle, labels[:min(a.batch_size, a.samples)], a.seed, sampling, a.batch_size)
    results = a.results or tempfile.mkdtemp(prefix="varbench-harness-")
    try:
        with generation_dtype(a.dtype):
            raw1 = raw_generation_s(bundle, labels, a.seed, sampling, a.batch_size)
        print(f"raw generation (before): {raw1:.3f} s")
        t = time.perf_counter()
        row = measure(bundle, create_method("dense"), samples=a.samples, seed=a.seed, sampling=sampling,
                      batch_size=a.batch_size, results_dir=results, flop_images=a.flop_images,
                      cache_dir=a.cache_dir, classifier=a.classifier, reference_count=a.reference_count,
                      timing_rounds=a.timing_rounds, dtype=a.dtype)
        harness = time.perf_counter() - t
        with generation_dtype(a.dtype):
            raw2 = raw_generation_s(bundle, labels, a.seed, sampling, a.batch_size)
        print(f"raw generation (after): {raw2:.3f} s")
    finally:
        if a.results is None:
            shutil.rmtree(results, ignore_errors=True)
    raw = (raw1 + raw2) / 2
    phases = json.loads(row["phase_s"])
    print("harness phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
          + f"; reference statistics {'from cache' if row['reference_cached'] else 'computed (cold cache)'}, "
            f"dense outputs {row['dense_cache']}")
    print(f"{'':<26}{'seconds':>10}{'images/s':>11}")
    print(f"{'raw generate (mean)':<26}{raw:>10.3f}{a.samples / raw:>11.2f}")
    print(f"{'harness (measure dense)':<26}{harness:>10.3f}{a.samples / harness:>11.2f}")
    ratio = harness / raw
    print(f"ratio harness / raw = {ratio:.3f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'}); "
          f"N={a.samples}, {env['env_threads']} threads, {bundle.device}, {env['env_device_name']}, paired timing "
          f"rounds {a.timing_rounds}")
    if not row["reference_cached"]:
        print("note: the reference statistics were computed in this run; a second run reads them from the cache")
    return 0
