"""`python -m bench bench-harness`: the measurement path's overhead, harness / raw generation time, in one run
(bench/benchmarks/harness.py measures; the row goes to a temporary results directory unless --results is given)."""
from __future__ import annotations

from bench.benchmarks.harness import run_harness
from bench.commands._common import add_benchmark_args, bundle_from_args, check_benchmark_args, sampling_from_args
from bench.defaults import DEFAULT_FLOP_IMAGES
from bench.results import check_results_dir

ORDER = 90


def register(sub):
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
    from bench.env import describe, environment   # lazy: --help stays instant (no torch)
    check_benchmark_args(a, timing_rounds=(0,))
    if a.results is not None:
        check_results_dir(a.results)
    bundle = bundle_from_args(a)
    sampling = sampling_from_args(a, bundle)
    print(f"bench-harness: {bundle.name} ({bundle.model_id}), N={a.samples}, batch {a.batch_size}, seed {a.seed}, "
          f"{a.dtype}")
    print(f"machine: {describe(environment(bundle.device), bundle.device)}")
    r = run_harness(bundle, samples=a.samples, seed=a.seed, sampling=sampling, batch_size=a.batch_size,
                    dtype=a.dtype, flop_images=a.flop_images, timing_rounds=a.timing_rounds, results_dir=a.results,
                    cache_dir=a.cache_dir, reference_count=a.reference_count, classifier=a.classifier,
                    say=lambda s: print(s, flush=True))
    env = r["environment"]
    print("harness phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["phase_s"].items())
          + f"; reference statistics {'from cache' if r['reference_cached'] else 'computed (cold cache)'}, "
            f"dense outputs {r['dense_cache']}")
    print(f"{'':<26}{'seconds':>10}{'images/s':>11}")
    print(f"{'raw generate (mean)':<26}{r['raw_s']:>10.3f}{a.samples / r['raw_s']:>11.2f}")
    print(f"{'harness (measure dense)':<26}{r['harness_s']:>10.3f}{a.samples / r['harness_s']:>11.2f}")
    ratio = r["harness_over_raw"]
    print(f"ratio harness / raw = {ratio:.3f} (target <= {r['target']}: {'met' if ratio <= r['target'] else 'NOT met'}"
          f"); N={a.samples}, {env['env_threads']} threads, {bundle.device}, {env['env_device_name']}, paired timing "
          f"rounds {a.timing_rounds}; in CPU time {r['harness_over_raw_cpu']:.3f}")
    if not r["reference_cached"]:
        print("note: the reference statistics were computed in this run; a second run reads them from the cache")
    return 0
