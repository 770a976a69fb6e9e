"""The benchmarks' Python API (bench/benchmarks/), called directly on tiny configurations: bench-moe's timings and
calibration, the raw-vs-harness timing bench-harness and bench-throughput share, bench-noise's two passes. No
timing is asserted (a shared machine), only what each run must produce."""
import json
import math
import os

import pytest

from bench.errors import BenchError


# ------------------------------------------------------------------------------------------------ moe
def test_moe_rows_paths_and_summary_on_one_tiny_shape(tmp_path, monkeypatch):
    from bench.benchmarks import moe
    from bench.benchmarks.jsonfile import json_text
    from methods import _experts
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    started, rows = [], []
    cfg = moe.MoeBenchConfig(shapes=moe.parse_shapes("32:128:3/4"), expert_sizes=[32, 64, 7], fractions=[0.25, 0.5],
                             warmup=0, repeats=2, min_sample_ms=0.0, calibrate=False)
    report = moe.run_moe(cfg, on_start=started.append, on_row=rows.append)
    assert len(started) == 1 and started[0]["repeats"] == 2 and started[0]["dtype"] == "float32"
    # pn 3 and 4 × (e=32: 4 experts, 1 and 2 active; e=64: 2 experts, 1 active (0.25 and 0.5 both round to 1));
    # e=7 does not divide 128 and is left out
    assert [(r["pn"], r["expert_size"], r["active"]) for r in report.results] == \
        [(3, 32, 1), (3, 32, 2), (3, 64, 1), (4, 32, 1), (4, 32, 2), (4, 64, 1)]
    assert rows == report.results and report.calibration == "not updated (--no-calibrate)"
    for r in report.results:
        assert r["tokens"] == 2 * r["pn"] ** 2 * 4 and r["experts"] == 128 // r["expert_size"]
        assert r["path"] in _experts.PATHS and r["flops_saved"] == 1 - r["active"] / r["experts"]
        assert r["ratio"] == pytest.approx(r["time_saved"] / r["flops_saved"])
        assert r["flops_run_saved"] == (r["flops_saved"] if r["path"] == _experts.GROUPED else 0.0)
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("dense_median_s", "grouped_median_s", "masked_median_s"))
    assert [(s["shape"], s["expert_size"], s["configurations"]) for s in report.summary] == \
        [("32:128:3/4", 32, 4), ("32:128:3/4", 64, 2)]
    assert sum(report.summary[0]["paths"].values()) == 4
    doc = json.loads(json_text(report.to_dict()))
    assert len(doc["results"]) == 6 and len(doc["env"]["cost_model"]["coef"]) == 4
    assert not (tmp_path / "cache").exists()                       # calibrate=False writes no calibration


def test_moe_calibrates_into_the_cache(tmp_path, monkeypatch):
    from bench.benchmarks import moe
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    cfg = moe.MoeBenchConfig(shapes=moe.parse_shapes("32:128:3"), expert_sizes=[32], fractions=[0.5], warmup=0,
                             repeats=1, min_sample_ms=0.0)
    report = moe.run_moe(cfg, on_start=lambda env: None, on_row=lambda row: None)
    assert report.calibration.startswith("calibrated on this run's 1 configurations")
    saved = report.calibration.rsplit("saved to ", 1)[1]
    assert os.path.isfile(saved) and saved.startswith(str(tmp_path / "cache"))


@pytest.mark.parametrize("change,message", [
    (dict(fractions=[0.5, float("nan")]), "fractions values must be in (0.0, 1.0]"),
    (dict(expert_sizes=[]), "expert_sizes values must be > 0"),
    (dict(repeats=0), "repeats must be >= 1"),
    (dict(min_sample_ms=math.inf), "min_sample_ms must be >= 0"),
    (dict(dtype="fp64"), "dtype 'fp64': valid: float32, bfloat16, float16"),
    (dict(expert_sizes=[7]), "expert_sizes 7: none divides shape default's FFN width 512"),
])
def test_moe_config_refused_in_one_line_before_any_work(change, message):
    from dataclasses import replace
    from bench.benchmarks import moe
    cfg = replace(moe.MoeBenchConfig(shapes=moe.parse_shapes("default")), **change)
    with pytest.raises(BenchError) as e:
        moe.check_config(cfg, label=str)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BenchError, match="unknown shape 'd99'; valid: official-d16, default, or C:FFN:pn/pn"):
        moe.parse_shapes("default,d99")


# ------------------------------------------------------------------------------------------------ harness
@pytest.mark.slow
def test_raw_vs_harness_on_the_tiny_model(tiny, tmp_path):
    from bench.benchmarks.harness import run_harness
    lines = []
    r = run_harness(tiny, samples=10, batch_size=5, flop_images=0, results_dir=str(tmp_path / "res"),
                    cache_dir=str(tmp_path / "cache"), reference_count=20, say=lines.append)
    assert r["harness_over_raw"] == pytest.approx(r["harness_s"] / r["raw_s"])
    assert 0 < r["harness_cpu_s"] and math.isfinite(r["harness_over_raw_cpu"]) and r["harness_over_raw_cpu"] > 0
    assert r["raw_s"] == pytest.approx((r["raw_s_before"] + r["raw_s_after"]) / 2) and r["raw_s_before"] > 0
    assert r["harness_s"] > 0 and r["one_time_imports_s"] >= 0 and r["timing_rounds"] == 0
    assert {"generate", "quality"} <= set(r["phase_s"]) and r["reference_cached"] is False   # a cold cache
    assert r["environment"]["env_threads"] >= 1
    assert [f for f in os.listdir(tmp_path / "res" / "rows")]                   # the row kept where asked
    assert any(line.startswith("one-time imports") for line in lines)
    assert sum("raw generation" in line for line in lines) == 2


# ------------------------------------------------------------------------------------------------ noise
def test_noise_config_refused_in_one_line():
    from bench.benchmarks.noise import MAX_LOAD_PROCS, NoiseConfig, check_config
    for change, message in ((dict(rounds=0), "rounds must be an integer in 1..1000"),
                            (dict(load_procs=MAX_LOAD_PROCS + 1),
                             f"load_procs must be an integer in 1..{MAX_LOAD_PROCS}"),
                            (dict(samples=2.5), "samples must be an integer >= 1")):
        with pytest.raises(BenchError, match=message.replace(".", r"\.")):
            check_config(NoiseConfig(**change))


@pytest.mark.slow
def test_noise_two_passes_on_the_tiny_model(tmp_path, monkeypatch):
    """DMoE's artifacts prepared tiny (3 fine-tune steps, 40 router steps) in a private cache; one batch per point
    and pass (minutes on a loaded 2-core machine: the paired protocol's laps and the loaded pass)."""
    from bench.benchmarks.noise import NoiseConfig, run_noise
    from bench.registry import create_method
    from bench.zoo import tiny_bundle
    from methods import _moe_artifacts
    from methods.dmoe import write_experts, write_finetune
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    b = tiny_bundle()
    params = dict(expert_size=8, finetune_steps=3, router_steps=40)
    dmoe = create_method("dmoe", **params)
    ft_dir = write_finetune(b, dmoe.finetune_key(), dict(batch=4, lr=1e-3, images=8, eval_images=4, data="shapes"),
                            None, False)
    write_experts(b, _moe_artifacts.load_finetuned_var(b, ft_dir), dmoe.experts_key(), 8, 40, 0, "shapes", None,
                  False, router_images=8)
    lines = []
    r = run_noise(b, NoiseConfig(samples=2, batch_size=2, rounds=1, load_procs=1, dmoe_params=params,
                                 twin_params=dict(finetune_steps=3)), say=lines.append)
    assert list(r["points"]) == ["dense", "dmoe tau=0.6", "pruned-ffn twin"]
    for name, d in r["points"].items():
        for p in (d["quiet"], d["loaded"]):
            assert p["speedup"] > 0 and p["time_median_s"] > 0
        assert d["speedup_rel_diff"] == pytest.approx(abs(d["loaded"]["speedup"] - d["quiet"]["speedup"])
                                                      / d["quiet"]["speedup"])
    assert r["max_speedup_rel_diff"] == max(d["speedup_rel_diff"] for d in r["points"].values())
    assert r["dmoe_macs_ratio"] > 0 and r["load_procs"] == 1 and r["samples"] == 2
    assert sum(line.startswith("  [quiet]") for line in lines) == 3 == sum(line.startswith("  [loaded]")
                                                                           for line in lines)


# ------------------------------------------------------------------------------------------------ certificate
@pytest.mark.slow
def test_quality_certificate_on_the_tiny_model(tiny, classifier, tmp_path, monkeypatch):
    """bench.certificate directly: the three sets scored against one reference, strict JSON."""
    from bench.benchmarks.jsonfile import json_text
    from bench.certificate import quality_certificate
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    cert = quality_certificate(tiny, samples=10, batch_size=5, reference_count=30, bootstrap=5,
                               classifier=classifier)
    assert list(cert["rows"]) == ["dense", "real_test", "untrained"]
    for row in cert["rows"].values():
        assert row["images"] == 10 and row["fid"] > 0 and 0 <= row["classifier_accuracy"] <= 1
        assert row["fid_ci_low"] <= row["fid_ci_high"]
    assert cert["samples"] == 10 and cert["reference_count"] == 30 and cert["env_device"] == "cpu"
    assert cert["started_at"] <= cert["finished_at"] and "fid" in cert["metrics"]
    assert json.loads(json_text(cert))["rows"]["dense"]["images"] == 10


@pytest.mark.parametrize("kw,message", [(dict(samples=1), "samples must be an integer >= 2 (FID needs a covariance)"),
                                        (dict(bootstrap=-1), "bootstrap must be an integer in 0..")])
def test_quality_certificate_refuses_before_generating(tiny, kw, message, monkeypatch):
    import bench.certificate
    from bench.certificate import quality_certificate

    def generate(*a, **k):
        raise AssertionError("generation started")
    monkeypatch.setattr(bench.certificate, "generate", generate)
    with pytest.raises(BenchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quality_certificate(tiny, **{"samples": 10, **kw})
