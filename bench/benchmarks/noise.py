"""Does paired timing survive a busy machine? (`python -m bench bench-noise`) One run, two passes.

    from bench.benchmarks.noise import NoiseConfig, run_noise
    report = run_noise(bundle, NoiseConfig(samples=8, batch_size=4, rounds=2))   # report["max_speedup_rel_diff"]

The same points (dense, DMoE τ on the last three scales, and its FLOP-matched Pruned-FFN twin) are timed by
bench.measure.time_paired (the paired ABBA protocol of every row) twice: once on the machine as it is, once while
CPULoad keeps every core busy with its own processes (started before, ended after the pass, and bounded in time).
The report: the loaded / quiet ratio of absolute batch times (how much the load distorts what unpaired rows would
compare) and, per point, the paired speedup of both passes and their relative difference."""
from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from bench.analytic import dense_scale_macs
from bench.defaults import DEFAULT_BATCH_SIZE, DEFAULT_TIMING_ROUNDS, MAX_SEED, MAX_TIMING_ROUNDS
from bench.errors import BenchError
from bench.log import get_logger
from bench.registry import create_method

# torch and the modules that import it load inside the functions: the bench-noise command reads MAX_LOAD_PROCS
# while parsing, which must import no torch (tests/test_cli_instant.py); the load's spawned children import this
# module too.

log = get_logger(__name__)
MAX_LOAD_S = 1800      # the busy processes end by themselves after this, whatever happens to this process
MAX_LOAD_PROCS = 256   # busy processes of the loaded pass (default: one per core)
LOAD_TARGET = 1.3      # loaded / quiet absolute time: the load is real
SPEEDUP_TARGET = 0.10  # largest relative difference of the paired speedups


@dataclass
class NoiseConfig:
    samples: int = 200                  # N images per point and pass
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    rounds: int = DEFAULT_TIMING_ROUNDS  # paired rounds per point
    tau: float = 0.6                    # DMoE τ of the method point
    load_procs: Optional[int] = None    # busy processes in the loaded pass (default: one per core)
    dtype: str = "fp32"
    # more parameters of the DMoE point and of its Pruned-FFN twin (default: theirs), e.g. a shorter fine-tune both
    # start from (finetune_steps): the artifacts they name must be prepared
    dmoe_params: Dict[str, Any] = field(default_factory=dict)
    twin_params: Dict[str, Any] = field(default_factory=dict)


def check_config(c: NoiseConfig) -> None:
    """One line (BenchError) for a setting that cannot run; nothing runs before this passes."""
    for name, low, high in (("samples", 1, None), ("batch_size", 1, None), ("seed", 0, MAX_SEED),
                            ("rounds", 1, MAX_TIMING_ROUNDS), ("load_procs", 1, MAX_LOAD_PROCS)):
        v = getattr(c, name)
        if v is None and name == "load_procs":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise BenchError(f"{name} must be an integer {bound}, got {v!r}")


def _spin(deadline: float) -> None:
    x = 1
    while time.time() < deadline:
        for _ in range(100000):
            x = (x * 7 + 3) % 1000003


class CPULoad:
    """`procs` busy processes for the duration of a with-block (each also stops by itself at MAX_LOAD_S)."""

    def __init__(self, procs: int):
        self.procs = procs

    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
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
    # lazy: pulls torch (see the note at the top)
    from bench.measure import analytic_per_scale, batch_seed, reset_stats
    from bench.sampling import generate   # lazy: pulls torch (see the note at the top)
    reset_stats(net)
    with torch.no_grad():
        generate(net, bundle.vqvae, labels.to(bundle.device), batch_seed(seed, 0), sampling)
    macs = sum(analytic_per_scale(method, net, bundle, len(labels)))
    return macs / sum(x.total for x in dense_scale_macs(bundle.var.cfg, len(labels)))


def _pass_line(label: str, name: str, p: dict) -> str:
    return (f"  [{label}] {name}: speedup {p['speedup']:.3f} [{p['speedup_ci_low']:.3f}, {p['speedup_ci_high']:.3f}]"
            f", {p['time_median_s']:.3f} s/batch, CPU utilization {p['cpu_utilization']:.2f}"
            + (f", noisy: {p['timing_noisy_reason']}" if p["timing_noisy"] else ""))


def run_noise(bundle, cfg: Optional[NoiseConfig] = None, sampling=None,
              say: Optional[Callable[[str], None]] = None) -> dict:
    """Both passes over the three points; returns the figures (a flat dict: loaded_over_quiet, max_speedup_rel_diff,
    points {name: {quiet, loaded, speedup_rel_diff, abs_time_loaded_over_quiet}}, the settings and the environment).
    `say` gets the progress lines (default: logged)."""
    from bench.env import describe, environment   # lazy: pulls torch (see the note at the top)
    from bench.measure import sample_labels, time_paired   # lazy: pulls torch (see the note at the top)
    from bench.precision import check_dtype, generation_dtype   # lazy: pulls torch (see the note at the top)
    cfg = cfg or NoiseConfig()
    check_config(cfg)
    say = say or log.info
    dtype = check_dtype(cfg.dtype, bundle.device)
    sampling = sampling or bundle.sampling
    last3 = list(range(len(bundle.var.patch_nums) - 3, len(bundle.var.patch_nums)))
    dmoe = create_method("dmoe", **{**cfg.dmoe_params, "tau": cfg.tau, "moe_scales": last3})
    dmoe.check_model(bundle)
    labels = sample_labels(cfg.samples, bundle.num_classes)
    env = environment(bundle.device)
    procs = cfg.load_procs or os.cpu_count() or 1
    say(f"bench-noise: {bundle.name}, N={cfg.samples} per point and pass, batch {cfg.batch_size}, {cfg.rounds} paired "
        f"rounds, seed {cfg.seed}, {dtype}; machine: {describe(env, bundle.device)}")
    dmoe_name = f"dmoe tau={cfg.tau:g}"
    points = {"dense": create_method("dense"), dmoe_name: dmoe}
    nets = {n: m.build(bundle).eval() for n, m in points.items()}
    with generation_dtype(dtype):
        ratio = dmoe_macs_ratio(dmoe, nets[dmoe_name], bundle, labels[:cfg.batch_size], cfg.seed, sampling)
    points["pruned-ffn twin"] = create_method("pruned-ffn", **{**cfg.twin_params, "scales": last3,
                                                               "match_fraction": min(ratio, 1.0)})
    nets["pruned-ffn twin"] = points["pruned-ffn twin"].build(bundle).eval()
    say(f"points: dense (A/A), DMoE τ={cfg.tau:g} on scales {last3} (MACs ratio {ratio:.3f} on the first batch), "
        f"its Pruned-FFN twin at that ratio")

    def one_pass(label: str) -> Dict[str, dict]:
        out = {}
        for name, m in points.items():
            with generation_dtype(dtype):
                r = time_paired(m, nets[name], bundle, labels, cfg.seed, sampling, cfg.batch_size, cfg.rounds)
            out[name] = point_result(r, m.name == "dense")
            say(_pass_line(label, name, out[name]))
        return out

    quiet = one_pass("quiet")
    say(f"loaded pass: {procs} busy process(es) on {os.cpu_count()} core(s)")
    with CPULoad(procs):
        loaded = one_pass("loaded")
    detail = {}
    for n in points:
        q, ld = quiet[n], loaded[n]
        detail[n] = dict(quiet=q, loaded=ld, speedup_rel_diff=abs(ld["speedup"] - q["speedup"]) / q["speedup"],
                         abs_time_loaded_over_quiet=ld["time_median_s"] / q["time_median_s"])
    return dict(loaded_over_quiet=sum(d["abs_time_loaded_over_quiet"] for d in detail.values()) / len(detail),
                max_speedup_rel_diff=max(d["speedup_rel_diff"] for d in detail.values()), points=detail,
                dmoe_macs_ratio=ratio, samples=cfg.samples, batch_size=cfg.batch_size, rounds=cfg.rounds,
                seed=cfg.seed, tau=cfg.tau, dmoe_params=cfg.dmoe_params, twin_params=cfg.twin_params,
                dtype=dtype, load_procs=procs,
                model=bundle.model_id, environment=env)
