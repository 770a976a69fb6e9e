"""--resolve: the schedule of looks, its corrected level, the stopping rule, its coverage on synthetic features with a
known ΔFID, and measure() stopping for each of its three reasons on the embedded default."""
import math

import numpy as np
import pytest
import torch

from bench.errors import BenchError
from bench.quality import FIDAgainst, paired_fid_bootstrap
from bench.resolve import Look, make_plan, run_looks, stop_reason


def test_plan_doubles_to_the_budget_and_corrects_the_level():
    plan = make_plan(10000, 60000, 50, 1)
    assert plan.looks == (10000, 20000, 40000, 60000)
    assert plan.level == pytest.approx(1 - 0.05 / 4)
    assert make_plan(1000, 1000, 50, 2).looks == (1000,)
    assert make_plan(1000, 1000, 50, 2).level == pytest.approx(0.95)
    assert make_plan(100, None, 50, 2).max_samples == 2000


@pytest.mark.parametrize("args, text", [
    ((100, 50, 50, 1), "must be >= samples"),
    ((120, 1000, 50, 1), "multiple of the batch size"),
    ((100, 1000, 50, 0), "percentage"),
    ((100, 1000, 50, float("nan")), "percentage"),
    ((100, 1000, 50, "x"), "percentage"),
    ((1, 10 ** 9, 1, 1), "at most"),
])
def test_plan_refuses_bad_input(args, text):
    with pytest.raises(BenchError, match=text):
        make_plan(*args)


def test_stop_reasons():
    plan = make_plan(100, 400, 50, 1)
    assert stop_reason(Look(100, 0.1, -0.4, 0.6, 100.0), plan, last=False) == "halfwidth"      # ±0.5%
    assert stop_reason(Look(100, 5.0, 2.0, 8.0, 100.0), plan, last=False) == "excludes_zero"
    assert stop_reason(Look(100, -5.0, -8.0, -2.0, 100.0), plan, last=False) == "excludes_zero"
    assert stop_reason(Look(100, 1.0, -2.0, 4.0, 100.0), plan, last=False) is None
    assert stop_reason(Look(100, 1.0, -2.0, 4.0, 100.0), plan, last=True) == "max_samples"
    assert stop_reason(Look(100, 1.0, None, None, 100.0), plan, last=True) == "max_samples"


def test_run_looks_stops_at_the_first_deciding_look():
    plan = make_plan(100, 800, 50, 1)
    seen = []

    def evaluate(n, level):   # an interval that narrows as 1/sqrt(n) around 0
        seen.append((n, level))
        half = 28 / math.sqrt(n)      # 2.8, 1.98, 1.4, 0.99 (% of dense FID 100)
        return Look(n, 0.0, -half, half, 100.0)
    out = run_looks(plan, evaluate)
    assert [n for n, _ in seen] == [100, 200, 400, 800] and out.reason == "halfwidth" and out.resolved
    assert all(level == plan.level for _, level in seen)
    out = run_looks(make_plan(100, 200, 50, 0.01), evaluate)
    assert out.reason == "max_samples" and not out.resolved and len(out.looks) == 2
    cols = out.columns()
    assert cols["resolved"] is False and cols["max_samples"] == 200 and cols["resolve_stop_reason"] == "max_samples"


def _true_fid(mu: np.ndarray, var: float) -> float:
    """FID of N(mu, var·I) against N(0, I)."""
    return float(mu @ mu) + len(mu) * (var + 1 - 2 * math.sqrt(var))


def _coverage(level_of, reps: int, delta: float, noise: float, seed: int = 0):
    """Share of sequential experiments whose interval at the stopping look covers the true ΔFID. Dense features
    ~ N(m, I), the method's = dense's + (delta, 0, ...) + N(0, noise²·I) (paired, as same-seed samples are); the
    reference is N(0, I), known exactly."""
    d, n_max = 4, 1600
    m = np.zeros(d)
    m[0] = 1.0
    shift = m.copy()
    shift[0] += delta
    true = _true_fid(shift, 1 + noise ** 2) - _true_fid(m, 1.0)
    ref = dict(mu=np.zeros(d), sigma=np.eye(d))
    fid_of = FIDAgainst(ref)
    rng = np.random.default_rng(seed)
    covered, reasons = 0, {}
    for r in range(reps):
        g = torch.from_numpy(rng.standard_normal((n_max, d)) + m)
        f = g + torch.from_numpy(np.r_[delta, np.zeros(d - 1)] + noise * rng.standard_normal((n_max, d)))
        plan = make_plan(200, n_max, 50, 1.0)

        def evaluate(n, _level):
            dl, lo, hi, _ = paired_fid_bootstrap(f[:n], g[:n], ref, 60, seed=r, level=level_of(plan),
                                                 interval="normal")
            return Look(n, dl, lo, hi, fid_of(g[:n]))
        out = run_looks(plan, evaluate)
        last = out.looks[-1]
        covered += last.low <= true <= last.high
        reasons[out.reason] = reasons.get(out.reason, 0) + 1
    return covered / reps, reasons


def test_sequential_rule_keeps_its_coverage_on_synthetic_features():
    """Four looks (200..1600) at the Bonferroni level 1 - 0.05/4: the interval where the rounds stop covers the
    known ΔFID in at least 95% of experiments in expectation; 150 experiments, asserted >= 0.9 (a true 0.95 falls
    below 0.9 with probability < 1%). Both a null effect (stops at the budget or on precision) and a real one
    (stops early on excludes_zero) are covered."""
    for delta, noise in ((0.0, 0.3), (0.15, 0.3)):
        cov, reasons = _coverage(lambda p: p.level, 150, delta, noise)
        assert cov >= 0.9, (delta, cov, reasons)
    assert reasons.get("excludes_zero", 0) > 0      # the real effect is found before the budget


# ------------------------------------------------------------------------------------- measure() on the default
@pytest.fixture(scope="module")
def default_bundle():
    from bench.zoo import load_model
    return load_model("default")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for the module: the reference statistics and dense's batches are made once."""
    return str(tmp_path_factory.mktemp("resolve-cache"))


def _measure(bundle, method, tmp_path, cache=None, **kw):
    from bench.measure import measure
    from bench.registry import create_method
    return measure(bundle, create_method(method, **kw.pop("params", {})), results_dir=str(tmp_path / "results"),
                   cache_dir=cache or str(tmp_path / "cache"), flop_images=0, timing_rounds=0, warmup_batches=0,
                   metrics=("fid",), bootstrap=40, reference_count=200, batch_size=8, **kw)


def test_measure_resolve_stops_for_each_reason(default_bundle, tmp_path, shared_cache):
    # dense against itself: ΔFID exactly 0 with a zero-width interval -> the target at the first look
    row = _measure(default_bundle, "dense", tmp_path, shared_cache, samples=16, resolve=5, max_samples=64)
    assert row["resolve_stop_reason"] == "halfwidth" and row["resolved"] is True and row["samples"] == 16
    # the last scale not run: images far from dense's -> the interval excludes 0 at the first look
    row = _measure(default_bundle, "skip-scales", tmp_path, shared_cache, samples=32, resolve=0.001, max_samples=64)
    assert row["resolve_stop_reason"] == "excludes_zero" and row["resolved"] is True and row["samples"] == 32
    assert row["fid_delta_ci_low"] > 0
    # a small change, an unreachable target: every look taken, the budget spent, not resolved
    row = _measure(default_bundle, "cfg-skip", tmp_path, shared_cache, samples=16, resolve=0.001, max_samples=32,
                   params=dict(last=1))
    assert row["resolve_stop_reason"] == "max_samples" and row["resolved"] is False and row["samples"] == 32
    import json
    looks = json.loads(row["resolve_looks"])
    assert [lk["samples"] for lk in looks] == [16, 32] and looks[0]["ci_low"] < 0 < looks[-1]["ci_high"]
    assert row["resolve_level"] == pytest.approx(1 - 0.05 / 2) and row["max_samples"] == 32


def test_measure_without_resolve_leaves_the_columns_null(default_bundle, tmp_path, shared_cache):
    row = _measure(default_bundle, "dense", tmp_path, shared_cache, samples=8)
    assert row["resolve_target_pct"] is None and row["resolved"] is None and row["samples"] == 8


def test_measure_resolve_refusals(default_bundle, tmp_path):
    with pytest.raises(BenchError, match="give resolve too"):
        _measure(default_bundle, "dense", tmp_path, samples=8, max_samples=16)
    with pytest.raises(BenchError, match="bootstrap >= 1"):
        from bench.measure import measure
        from bench.registry import create_method
        measure(default_bundle, create_method("dense"), samples=8, resolve=1, bootstrap=0, metrics=("fid",),
                results_dir=str(tmp_path / "r"), cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "results").exists() and not (tmp_path / "r").exists()
