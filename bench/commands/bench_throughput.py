"""`python -m bench bench-throughput`: large N without waste, printed in one run (bench/benchmarks/throughput.py
measures).

harness_over_raw (measure() of dense vs plain generate, same N, warm quality reference; its phase times),
rss_growth_mb_per_1k (peak RSS of `bench run` children at two sizes), fast_over_reference (images/s of fp32, bf16
autocast and torch.compile, interleaved; FID of the fastest path against fp32 when it is not fp32). --json FILE
writes every figure with the facts of the run (atomically; checked before any work).
"""
from __future__ import annotations

from bench.benchmarks.jsonfile import write_json
from bench.benchmarks.throughput import KEYS, ThroughputOptions, check_options, run_throughput
from bench.commands._common import (add_benchmark_args, bundle_from_args, check_benchmark_args, check_writable_file,
                                    sampling_from_args)
from bench.errors import BenchError

ORDER = 93


def register(sub):
    p = sub.add_parser("bench-throughput", help="benchmark: harness / raw at large N, peak RSS growth per 1000 "
                       "samples, fast generation paths (bf16, torch.compile) and their FID")
    add_benchmark_args(p, samples=5000, samples_help="N images of the harness / raw comparison")
    p.add_argument("--flop-images", type=int, default=1, help="the harness's FLOP-count images (default 1)")
    p.add_argument("--speed-samples", type=int, default=1000,
                   help="images per path in the fast-path comparison, in full batches (default 1000)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile path")
    p.add_argument("--compile-limit-s", type=float, default=300.0,
                   help="the torch.compile path is unavailable when compiling takes longer (default 300)")
    p.add_argument("--memory-samples", default=None, metavar="SMALL,BIG",
                   help="N of the two peak-RSS children (default N/5,N/2)")
    p.add_argument("--fid-samples", type=int, default=None, help="N of the fast path's FID (default: --samples)")
    p.add_argument("--bootstrap", type=int, default=100, help="FID interval resamples (default 100)")
    p.add_argument("--reference-count", type=int, default=None, help="reference images (default: the quality default)")
    p.add_argument("--classifier", default=None, help="classifier .safetensors (default: the model's shipped one)")
    p.add_argument("--profile", default=None, metavar="FILE", help="write cProfile stats of the harness measurement")
    p.add_argument("--json", default=None, metavar="FILE", help="write the figures and the facts of the run here")
    p.set_defaults(func=run)


def parse_pair(text, flag: str):
    try:
        small, big = (int(x) for x in str(text).split(","))
    except ValueError:
        raise BenchError(f"{flag} must be two integers SMALL,BIG, got {text!r}") from None
    if not 1 <= small < big:
        raise BenchError(f"{flag} must be two integers 1 <= SMALL < BIG, got {text!r}")
    return small, big


def run(a):
    # the output first: a bad path costs nothing
    for flag, path, exts in (("--json", a.json, (".json",)), ("--profile", a.profile, None)):
        if path is not None:
            check_writable_file(path, exts, flag)
    from bench.measure import MAX_BOOTSTRAP   # lazy: --help stays instant (no torch)
    check_benchmark_args(a, flop_images=(0,), speed_samples=(1,), fid_samples=(2,),
                         bootstrap=(1, MAX_BOOTSTRAP))
    import math
    if not (a.compile_limit_s > 0 and math.isfinite(a.compile_limit_s)):
        raise BenchError(f"--compile-limit-s must be a number of seconds > 0, got {a.compile_limit_s}")
    memory = parse_pair(a.memory_samples, "--memory-samples") if a.memory_samples is not None else None
    o = ThroughputOptions(samples=a.samples, batch_size=a.batch_size, seed=a.seed, dtype=a.dtype,
                          flop_images=a.flop_images, speed_samples=a.speed_samples, compile=not a.no_compile,
                          compile_limit_s=a.compile_limit_s, memory_samples=memory, fid_samples=a.fid_samples,
                          bootstrap=a.bootstrap, reference_count=a.reference_count, classifier=a.classifier,
                          profile=a.profile)
    check_options(o)
    bundle = bundle_from_args(a)
    o.sampling = sampling_from_args(a, bundle)
    o.child_model_args = _model_argv(a)
    report = run_throughput(bundle, o, say=lambda s: print(s, flush=True))
    print("summary: " + ", ".join(f"{k} {report[k]:.4g}" if isinstance(report[k], float) else f"{k} {report[k]}"
                                  for k in KEYS) + f"; fast path {report['fast_path']}; {report['wall_s']:.0f} s")
    if a.json:
        write_json(a.json, report)
        print(f"wrote {a.json}")
    return 0


def _model_argv(a):
    """The model options as given, for the `bench run` children."""
    out = []
    for flag, v in (("--model", a.model), ("--var-ckpt", a.var_ckpt), ("--vae-ckpt", a.vae_ckpt),
                    ("--depth", a.depth), ("--patch-nums", a.patch_nums), ("--device", a.device)):
        if v is not None:
            out += [flag, str(v)]
    return out
