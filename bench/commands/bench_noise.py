"""`python -m bench bench-noise`: does paired timing survive a busy machine? One run, two passes.

The same points (dense, DMoE τ=0.6 on the last three scales, and its FLOP-matched Pruned-FFN twin) are timed by
bench.measure.time_paired (the paired ABBA protocol of every row) twice: once on the machine as it is, once while
this command keeps every core busy with its own processes (started before, ended after the pass, and bounded in
time). Printed: the loaded / quiet ratio of absolute batch times (how much the load distorts what unpaired rows
would compare) and, per point, the paired speedup of both passes and their relative difference."""
from __future__ import annotations

from bench.commands._common import add_benchmark_args

ORDER = 92
MAX_LOAD_S = 1800      # the busy processes end by themselves after this, whatever happens to this process
MAX_LOAD_PROCS = 256   # busy processes of the loaded pass (default: one per core)


def register(sub):
    from bench.defaults import DEFAULT_TIMING_ROUNDS
    p = sub.add_parser("bench-noise", help="benchmark: paired speedups on a quiet vs a loaded machine")
    add_benchmark_args(p, samples=200, samples_help="N images per point and pass")
    p.add_argument("--rounds", type=int, default=DEFAULT_TIMING_ROUNDS, help="paired rounds per point")
    p.add_argument("--tau", type=float, default=0.6, help="DMoE τ of the method point (default 0.6)")
    p.add_argument("--load-procs", type=int, default=None, help="busy processes in the loaded pass (default: cores)")
    p.add_argument("--json", default=None, help="write the figures and the environment to this JSON file")
    p.set_defaults(func=run)


def _spin(deadline: float) -> None:
    import time
    x = 1
    while time.time() < deadline:
        for _ in range(100000):
            x = (x * 7 + 3) % 1000003


class CPULoad:
    """`procs` busy processes for the duration of a with-block (each also stops by itself at MAX_LOAD_S)."""

    def __init__(self, procs: int):
        self.procs = procs

    def __enter__(self):
        import multiprocessing as mp
        import time
        ctx = mp.get_context("spawn")
        self.workers = [ctx.Process(target=_spin, args=(time.time() + MAX_LOAD_S,), daemon=True)
                        for _ in range(self.procs)]
        for w in self.workers:
            w.start()
        time.sleep(1.0)   # let them reach full speed
        return self

    def __exit__(self, *exc):
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            w.join(timeout=10)
        return False


def run(a):
    import json
    import os
    from bench.atomic import atomic_write_text
    from bench.commands._common import bundle_from_args, check_benchmark_args, check_writable_file, sampling_from_args
    from bench.env import describe, environment
    from bench.measure import MAX_TIMING_ROUNDS, sample_labels, time_paired
    from bench.precision import generation_dtype
    from bench.registry import create_method
    if a.json:   # before any work: the whole benchmark used to run, then fail on the write
        check_writable_file(a.json, (".json",), "--json")
    check_benchmark_args(a, rounds=(1, MAX_TIMING_ROUNDS), load_procs=(1, MAX_LOAD_PROCS))
    bundle = bundle_from_args(a)
    sampling = sampling_from_args(a, bundle)
    last3 = list(range(len(bundle.var.patch_nums) - 3, len(bundle.var.patch_nums)))
    dmoe = create_method("dmoe", tau=a.tau, moe_scales=last3)
    dmoe.check_model(bundle)
    labels = sample_labels(a.samples, bundle.num_classes)
    env = environment(bundle.device)
    procs = a.load_procs or os.cpu_count() or 1
    print(f"bench-noise: {bundle.name}, N={a.samples} per point and pass, batch {a.batch_size}, {a.rounds} paired "
          f"rounds, seed {a.seed}, {a.dtype}; machine: {describe(env, bundle.device)}")
    points = {"dense": create_method("dense"), f"dmoe tau={a.tau:g}": dmoe}
    nets = {n: m.build(bundle).eval() for n, m in points.items()}
    with generation_dtype(a.dtype):
        ratio = dmoe_macs_ratio(dmoe, nets[f"dmoe tau={a.tau:g}"], bundle, labels[:a.batch_size], a.seed, sampling)
    points["pruned-ffn twin"] = create_method("pruned-ffn", scales=last3, match_fraction=min(ratio, 1.0))
    nets["pruned-ffn twin"] = points["pruned-ffn twin"].build(bundle).eval()
    print(f"points: dense (A/A), DMoE τ={a.tau:g} on scales {last3} (MACs ratio {ratio:.3f} on the first batch), "
          f"its Pruned-FFN twin at that ratio")

    def one_pass(label):
        out = {}
        for name, m in points.items():
            with generation_dtype(a.dtype):
                r = time_paired(m, nets[name], bundle, labels, a.seed, sampling, a.batch_size, a.rounds)
            out[name] = point_result(r, m.name == "dense")
            p = out[name]
            print(f"  [{label}] {name}: speedup {p['speedup']:.3f} [{p['speedup_ci_low']:.3f}, "
                  f"{p['speedup_ci_high']:.3f}], {p['time_median_s']:.3f} s/batch, CPU utilization "
                  f"{p['cpu_utilization']:.2f}" + (f", noisy: {p['timing_noisy_reason']}" if p["timing_noisy"] else ""))
        return out

    quiet = one_pass("quiet")
    print(f"loaded pass: {procs} busy process(es) on {os.cpu_count()} core(s)")
    with CPULoad(procs):
        loaded = one_pass("loaded")
    abs_ratio = [loaded[n]["time_median_s"] / quiet[n]["time_median_s"] for n in points]
    loaded_over_quiet = sum(abs_ratio) / len(abs_ratio)
    detail, rel = {}, []
    print(f"{'point':<22}{'speedup quiet':>22}{'speedup loaded':>22}{'rel. diff':>11}{'abs. time loaded/quiet':>24}")
    for n, r in zip(points, abs_ratio):
        q, l = quiet[n], loaded[n]
        d = abs(l["speedup"] - q["speedup"]) / q["speedup"]
        rel.append(d)
        detail[n] = dict(quiet=q, loaded=l, speedup_rel_diff=d, abs_time_loaded_over_quiet=r)
        print(f"{n:<22}{q['speedup']:>9.3f} [{q['speedup_ci_low']:.3f}, {q['speedup_ci_high']:.3f}]"
              f"{l['speedup']:>9.3f} [{l['speedup_ci_low']:.3f}, {l['speedup_ci_high']:.3f}]{100 * d:>10.1f}%"
              f"{r:>24.2f}")
    print(f"loaded / quiet absolute time ratio = {loaded_over_quiet:.2f} (the load is real: target >= 1.3); largest "
          f"relative difference of paired speedups = {100 * max(rel):.1f}% (target <= 10%)")
    if a.json:
        atomic_write_text(a.json, json.dumps(dict(
            loaded_over_quiet=loaded_over_quiet, max_speedup_rel_diff=max(rel), points=detail,
            samples=a.samples, batch_size=a.batch_size, rounds=a.rounds, seed=a.seed, dtype=a.dtype, load_procs=procs,
            model=bundle.model_id, environment=env), indent=1, default=str))
        print(f"wrote {a.json}")
    return 0


def point_result(r: dict, self_paired: bool) -> dict:
    """A point's figures of one pass; dense's speedup is its A/A measurement (dense timed against itself)."""
    key = "speedup_aa" if self_paired else "speedup"
    return dict(speedup=r[key], speedup_ci_low=r[key + "_ci_low"], speedup_ci_high=r[key + "_ci_high"],
                macs_ratio=r["macs_ratio"], time_median_s=r["time_median_s"],
                dense_time_median_s=r["time_paired_dense_median_s"], timing_noisy=r["timing_noisy"],
                timing_noisy_reason=r["timing_noisy_reason"], load_avg_after=r["load_avg_after"],
                cpu_utilization=r["cpu_utilization"])


def dmoe_macs_ratio(method, net, bundle, labels, seed, sampling) -> float:
    """DMoE's analytic MACs / dense MACs on one batch (its router decisions), for the FLOP-matched twin."""
    import torch
    from bench.analytic import dense_scale_macs
    from bench.measure import analytic_per_scale, batch_seed, reset_stats
    from bench.sampling import generate
    reset_stats(net)
    with torch.no_grad():
        generate(net, bundle.vqvae, labels.to(bundle.device), batch_seed(seed, 0), sampling)
    macs = sum(analytic_per_scale(method, net, bundle, len(labels)))
    return macs / sum(x.total for x in dense_scale_macs(bundle.var.cfg, len(labels)))
