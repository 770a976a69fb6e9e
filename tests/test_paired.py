"""Paired comparisons against dense (bench.timing paired rounds, bench.quality.paired_fid_bootstrap): exact
outcomes on constructed inputs; no timed assertions (the clock is fake)."""
import math

import numpy as np
import pytest
import torch

from bench.timing import (BatchTimer, MachineWatch, PairedRounds, bootstrap_median, noisy_reasons, paired_summary,
                          time_flop_efficiency)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_runner(clock, timer, cost, load, scales=3):
    """A 'batch' that advances the fake clock by cost x load() per scale and once more for the decode."""
    def run():
        timer.start()
        for si in range(scales):
            clock.now += cost * load()
            timer.lap(f"scale{si}")
        clock.now += cost * load()
        timer.lap("decode")
        return timer.stop()
    return run


@pytest.mark.parametrize("rounds", [6, 7])
def test_abba_rounds_recover_the_ratio_when_load_doubles_mid_run(rounds):
    """Method batches cost 1, dense 3 (speedup 3). From the second half of the laps on, a fake load doubles
    everything. Absolute times across the halves differ 2x; the paired speedup is still exactly 3."""
    clock = FakeClock()
    timer = BatchTimer("cpu", clock=clock)
    laps = {"n": 0}
    total_laps = 2 * rounds + 1                              # + dense's warm-up

    def load():
        return 2.0 if laps["n"] >= total_laps // 2 else 1.0

    def counted(run):
        def f():
            out = run()
            laps["n"] += 1
            return out
        return f

    method = counted(fake_runner(clock, timer, 1.0, load))
    dense = counted(fake_runner(clock, timer, 3.0, load))
    paired = PairedRounds(rounds, warmup=1, full_size=4, max_rounds=rounds)
    assert not paired.wants(0, 4) and not paired.wants(1, 3) and paired.wants(1, 4)   # warm-up / short batch
    for b in range(1, rounds + 1):
        out, lap = paired.run(b, lambda: ("images", method()), dense)
        assert out == "images" and lap["total"] > 0
    assert paired.complete and not paired.wants(rounds + 1, 4)
    assert [r.method_first for r in paired.done] == [i % 2 == 0 for i in range(rounds)]   # ABBA
    totals = [r.method["total"] for r in paired.done]
    assert max(totals) == 2 * min(totals)                    # the load is visible in absolute times...
    s = paired_summary(paired.done, 3, dict(load_avg_before=0.1, load_avg_after=0.1, cpu_utilization=1.0, cores=2),
                       cuda=False)
    # ...not in the paired ratios: every round but the one the load change falls inside measures exactly 3
    ratios = sorted(r.dense["total"] / r.method["total"] for r in paired.done)
    assert sum(x == pytest.approx(3.0) for x in ratios) >= rounds - 1
    assert s["speedup"] == pytest.approx(3.0) and s["speedup_ci_low"] <= 3.0 <= s["speedup_ci_high"]
    assert s["speedup_per_scale"] == pytest.approx([3.0] * 3)
    assert s["timing_rounds"] == rounds and s["timing_noisy"] and "CV" in s["timing_noisy_reason"]
    aa = paired_summary(paired.done, 3, {"cores": 2}, cuda=False, self_paired=True)
    assert (aa["speedup"], aa["speedup_ci_low"], aa["speedup_ci_high"]) == (1.0, 1.0, 1.0)
    assert aa["speedup_aa"] == pytest.approx(3.0)


def test_the_method_is_warmed_up_even_with_no_warmup_batches():
    """Dense is warmed once before the first round; the method's first batch is its warm-up, also with
    warmup_batches 0 (a cold method against a warm dense measured 0.67 for a true 2.0)."""
    paired = PairedRounds(2, warmup=0, full_size=4)
    assert not paired.wants(0, 4) and paired.wants(1, 4)


def test_both_arms_of_a_paired_round_carry_the_memory_probe(monkeypatch):
    """The method's batches run inside the memory probe (on CPU without clear_refs, a sampling thread); dense's
    batches of the same rounds must too, or the probe's cost biases every speedup."""
    from bench import measure, memory
    from bench import sampling as sampling_module
    from bench.registry import create_method
    from bench.zoo import tiny_bundle
    state = dict(active=False, finishing=False)
    calls = []

    class CountingProbe:
        kind = "counting"

        def __init__(self, device):
            pass

        def start(self):
            state["active"] = True

        def stop(self):
            state["active"] = False
            return 0

    real_generate, real_finish = sampling_module.generate, measure.finish_rounds

    def generate(net, *a, **kw):
        calls.append((net is bundle.var, state["active"], state["finishing"]))
        return real_generate(net, *a, **kw)

    def finish_rounds(*a, **kw):
        state["finishing"] = True
        return real_finish(*a, **kw)

    monkeypatch.setattr(memory, "PeakMemory", CountingProbe)
    monkeypatch.setattr(sampling_module, "generate", generate)
    monkeypatch.setattr(measure, "finish_rounds", finish_rounds)
    bundle = tiny_bundle()
    method = create_method("cfg-skip")
    net = method.build(bundle)
    measure.time_paired(method, net, bundle, torch.arange(8) % 10, 0, bundle.sampling, 2, rounds=2)
    dense_in_rounds = [c for c in calls if c[0] and not c[2]]
    assert dense_in_rounds and any(not c[0] for c in calls)
    # inside generate_all every batch of either arm runs inside the probe; finish_rounds' extra rounds in neither
    assert all(active == (not finishing) for _, active, finishing in calls)


def _run_until_complete(paired, method, dense):
    b = 1
    while not paired.complete:
        paired.run(b, lambda: (None, method()), dense)
        b += 1
    return len(paired.done)


def test_rounds_extend_while_the_interval_is_wide_and_only_then():
    clock = FakeClock()
    timer = BatchTimer("cpu", clock=clock)
    steady = PairedRounds(6, warmup=1, full_size=4)
    n = _run_until_complete(steady, fake_runner(clock, timer, 1.0, lambda: 1.0), fake_runner(clock, timer, 2.0,
                                                                                             lambda: 1.0))
    assert n == 6                                              # a quiet machine: exactly the rounds asked for
    noise = iter(np.random.default_rng(0).uniform(0.3, 3.0, 10000))
    noisy = PairedRounds(6, warmup=1, full_size=4)
    n = _run_until_complete(noisy, fake_runner(clock, timer, 1.0, lambda: next(noise)),
                            fake_runner(clock, timer, 2.0, lambda: next(noise)))
    assert n == 24 and noisy.max_rounds == 24                  # a busy one: up to 4x, in balanced pairs


def test_unpaired_comparison_is_what_the_pairing_prevents():
    """The same fake machine, timed the old way (all method batches, then all dense batches): the load that
    arrives during dense's turn makes dense look 2x slower than it is."""
    clock = FakeClock()
    timer = BatchTimer("cpu", clock=clock)
    n = {"laps": 0}

    def load():
        n["laps"] += 1
        return 2.0 if n["laps"] > 24 else 1.0

    m = [fake_runner(clock, timer, 1.0, load)()["total"] for _ in range(6)]
    d = [fake_runner(clock, timer, 3.0, load)()["total"] for _ in range(6)]
    assert np.median(d) / np.median(m) == pytest.approx(6.0)      # vs the true 3.0


def test_bootstrap_median_and_efficiency():
    med, lo, hi = bootstrap_median([1.0, 1.1, 0.9, 1.05, 0.95, 1.0], seed=0)
    assert med == pytest.approx(1.0) and 0.9 <= lo <= med <= hi <= 1.1
    assert bootstrap_median([2.0]) == (2.0, 2.0, 2.0)
    assert time_flop_efficiency(2.0, 0.5) == pytest.approx(1.0)    # half the FLOPs, half the time: the limit
    assert time_flop_efficiency(1.25, 0.5) == pytest.approx(0.4)   # 20% time saved for 50% FLOPs saved
    assert time_flop_efficiency(1.0, 1.0) is None and time_flop_efficiency(None, 0.5) is None
    assert time_flop_efficiency(0.9, 1.0006) is None        # 0.06% more MACs: the quotient would be noise / ~0


def test_noisy_rule_clauses():
    quiet = dict(load_avg_before=1.9, load_avg_after=2.1, cpu_utilization=0.95, cores=2)
    assert noisy_reasons(0.03, quiet, cuda=False) == []
    busy = dict(quiet, load_avg_after=6.5)
    assert noisy_reasons(0.03, busy, cuda=False) == ["load average 6.5 > 3"]
    starved = dict(quiet, cpu_utilization=0.4)
    assert noisy_reasons(0.03, starved, cuda=False) == ["CPU utilization 0.40 < 0.6"]
    assert noisy_reasons(0.03, dict(busy, cpu_utilization=0.4), cuda=True) == []   # host load: not GPU timing
    w = MachineWatch(threads=1).start()
    sum(i * i for i in range(200000))
    m = w.stop()
    assert 0 < m["cpu_utilization"] <= 1.5 and m["threads"] == 1


# ---------------------------------------------------------------------------------------------- paired quality
def _features(n=200, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    centres = torch.randn(10, d, generator=g) * 3
    return centres[labels] + torch.randn(n, d, generator=g), labels


def _ref_stats(d=8, seed=1):
    from bench.quality import fid_statistics
    f, _ = _features(2000, d, seed)
    return fid_statistics(f)


def test_paired_bootstrap_is_exactly_zero_for_identical_sets():
    from bench.quality import paired_fid_bootstrap
    f, labels = _features()
    delta, lo, hi, boot = paired_fid_bootstrap(f, f.clone(), _ref_stats(), 50, 0, labels)
    assert (delta, lo, hi) == (0.0, 0.0, 0.0) and not boot.any()


def test_paired_bootstrap_excludes_zero_for_a_known_shift_and_is_narrower_than_unpaired():
    from bench.quality import fid_bootstrap, fid_from_statistics, fid_statistics, paired_fid_bootstrap
    f, labels = _features()
    ref = _ref_stats()
    shifted = f + 0.15                                     # every sample moved by 0.15 in each dimension
    delta, lo, hi, _ = paired_fid_bootstrap(shifted, f, ref, 100, 0, labels)
    fid_f = fid_from_statistics(fid_statistics(f), ref)
    fid_s = fid_from_statistics(fid_statistics(shifted), ref)
    assert delta == pytest.approx(fid_s - fid_f) and 0 < lo <= delta <= hi
    # the unpaired intervals of the two FIDs overlap although the shift is real; the paired one resolves it
    lo_f, hi_f, _ = fid_bootstrap(f, ref, fid_f, 100, 0, labels)
    lo_s, hi_s, _ = fid_bootstrap(shifted, ref, fid_s, 100, 0, labels)
    assert lo_s <= hi_f and (hi - lo) < (hi_f - lo_f) / 3


def test_paired_bootstraps_without_resamples_give_no_interval():
    """--bootstrap 0: the estimates, and no interval (not a one-resample 'interval' of zero width)."""
    from bench.quality import paired_accuracy_bootstrap, paired_fid_bootstrap
    f, labels = _features()
    delta, lo, hi, boot = paired_fid_bootstrap(f + 0.3, f, _ref_stats(), 0, 0, labels)
    assert delta > 0 and math.isnan(lo) and math.isnan(hi) and len(boot) == 0
    assert paired_fid_bootstrap(f, f.clone(), _ref_stats(), 0, 0, labels)[:3] == (0.0, 0.0, 0.0)
    dense = torch.nn.functional.one_hot(labels, 10).float()
    worse = dense.clone()
    worse[:40] = worse[:40].roll(1, dims=1)                 # 40 of 200 samples misclassified
    assert paired_accuracy_bootstrap(worse, dense, labels, 0, 0) == (pytest.approx(-0.2), None, None)
    from bench.records import PairedQualityRecord
    line = PairedQualityRecord(fid_delta=delta, class_accuracy_delta=-0.2).summary()   # the run's log line
    assert line.count("(no interval)") == 2 and f"{delta:+.4g}" in line


def test_sample_size_guidance():
    from bench.quality import samples_for_halfwidth
    assert samples_for_halfwidth(500, 2.0, 1.0) == 2000          # halve the width: 4x the samples
    assert samples_for_halfwidth(500, 0.0, 1.0) is None and samples_for_halfwidth(500, 1.0, 0.0) is None
    assert samples_for_halfwidth(100, 0.5, 1.0) == 25
    assert samples_for_halfwidth(10, 3.0, 1.0) == 90 and samples_for_halfwidth(10, math.nan, 1.0) is None


def test_bad_input_one_line_exit_2(tmp_path):
    from tests.conftest import run_cli
    for args, msg in ((["bench-noise", "--samples", "0"], "--samples"),
                      (["bench-noise", "--tau", "2"], "tau"),
                      (["bench-noise", "--json", str(tmp_path / "x.txt")], ".json"),
                      (["run", "--model", "tiny", "--timing-rounds", "-1", "--results", str(tmp_path / "r")],
                       "--timing-rounds")):
        p = run_cli(*args)
        err = p.stderr.strip()
        assert p.returncode == 2 and err.startswith("error:") and "\n" not in err and msg in err, (args, err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.txt").exists()
