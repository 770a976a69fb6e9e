"""`python -m bench bench-noise`: does paired timing survive a busy machine? One run, two passes (quiet, then under a
CPU load of its own); bench/benchmarks/noise.py measures, this command parses the flags and prints the table."""
from __future__ import annotations

from bench.benchmarks.jsonfile import write_json
from bench.benchmarks.noise import LOAD_TARGET, MAX_LOAD_PROCS, NoiseConfig, SPEEDUP_TARGET, run_noise
from bench.commands._common import add_benchmark_args
from bench.commands._common import bundle_from_args, check_benchmark_args, check_writable_file, sampling_from_args
from bench.defaults import DEFAULT_TIMING_ROUNDS, MAX_TIMING_ROUNDS

ORDER = 92


def register(sub):
    p = sub.add_parser("bench-noise", help="benchmark: paired speedups on a quiet vs a loaded machine")
    add_benchmark_args(p, samples=200, samples_help="N images per point and pass")
    p.add_argument("--rounds", type=int, default=DEFAULT_TIMING_ROUNDS, help="paired rounds per point")
    p.add_argument("--tau", type=float, default=0.6, help="DMoE τ of the method point (default 0.6)")
    p.add_argument("--load-procs", type=int, default=None,
                   help=f"busy processes in the loaded pass (default: cores; at most {MAX_LOAD_PROCS})")
    p.add_argument("--json", default=None, help="write the figures and the environment to this JSON file")
    p.set_defaults(func=run)


def run(a):
    if a.json:   # before any work: the whole benchmark used to run, then fail on the write
        check_writable_file(a.json, (".json",), "--json")
    check_benchmark_args(a, rounds=(1, MAX_TIMING_ROUNDS), load_procs=(1, MAX_LOAD_PROCS))
    bundle = bundle_from_args(a)
    sampling = sampling_from_args(a, bundle)
    cfg = NoiseConfig(samples=a.samples, batch_size=a.batch_size, seed=a.seed, rounds=a.rounds, tau=a.tau,
                      load_procs=a.load_procs, dtype=a.dtype)
    r = run_noise(bundle, cfg, sampling, say=lambda s: print(s, flush=True))
    print(f"{'point':<22}{'speedup quiet':>22}{'speedup loaded':>22}{'rel. diff':>11}{'abs. time loaded/quiet':>24}")
    for n, d in r["points"].items():
        q, ld = d["quiet"], d["loaded"]
        print(f"{n:<22}{q['speedup']:>9.3f} [{q['speedup_ci_low']:.3f}, {q['speedup_ci_high']:.3f}]"
              f"{ld['speedup']:>9.3f} [{ld['speedup_ci_low']:.3f}, {ld['speedup_ci_high']:.3f}]"
              f"{100 * d['speedup_rel_diff']:>10.1f}%{d['abs_time_loaded_over_quiet']:>24.2f}")
    print(f"loaded / quiet absolute time ratio = {r['loaded_over_quiet']:.2f} (the load is real: target >= "
          f"{LOAD_TARGET}); largest relative difference of paired speedups = {100 * r['max_speedup_rel_diff']:.1f}% "
          f"(target <= {100 * SPEEDUP_TARGET:.0f}%)")
    if a.json:
        write_json(a.json, r)
        print(f"wrote {a.json}")
    return 0
