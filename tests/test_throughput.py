"""bench-throughput (bench/benchmarks/throughput.py): the report's keys and types end to end on the tiny model, the
--json checks before any work, and the fast paths that fail or compile too long recorded as unavailable (no timings
are asserted)."""
import json
import math
import os
import time

import pytest

from tests.conftest import run_cli

HEADLINE_TYPES = dict(harness_over_raw=float, fast_over_reference=float, fid_reference=float, fid_fast=float,
                      fid_ci_overlap=bool, rss_growth_mb_per_1k=float)


def _no_nan(text):
    def refuse(c):
        raise AssertionError(f"non-JSON constant {c} in the report")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("where", ["dir", "missing", "profile-dir"])
def test_output_path_refused_before_any_work(tmp_path, where):
    target = {"dir": ["--json", str(tmp_path)], "missing": ["--json", str(tmp_path / "no" / "x.json")],
              "profile-dir": ["--profile", str(tmp_path)]}[where]
    t = time.perf_counter()
    r = run_cli("bench-throughput", "--model", "tiny", *target)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and target[0] in lines[0], r.stderr
    assert r.stdout == ""
    assert os.listdir(tmp_path) == []
    assert time.perf_counter() - t < 60   # refused before the model or any measurement


def test_bad_memory_samples_one_line(tmp_path):
    r = run_cli("bench-throughput", "--model", "tiny", "--memory-samples", "20,10", "--json", str(tmp_path / "x.json"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--memory-samples" in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_end_to_end_tiny_json(tmp_path):
    out = tmp_path / "throughput.json"
    r = run_cli("bench-throughput", "--model", "tiny", "--samples", "16", "--speed-samples", "16", "--batch-size", "8",
                "--memory-samples", "12,16", "--reference-count", "50", "--bootstrap", "20", "--no-compile",
                "--json", str(out), env={"VARBENCH_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    rep = _no_nan(out.read_text())
    for k, typ in HEADLINE_TYPES.items():
        assert isinstance(rep[k], typ), (k, rep[k])
        if typ is float:
            assert math.isfinite(rep[k]), (k, rep[k])
    assert rep["harness_over_raw"] > 0 and rep["fast_over_reference"] >= 1.0
    assert rep["harness_over_raw_cpu"] > 0 and rep["harness_cpu_s"] > 0 and all(c > 0 for c in rep["raw_cpu_s"])
    for k in ("fid_reference_ci", "fid_fast_ci"):
        lo, hi = rep[k]
        assert isinstance(lo, float) and isinstance(hi, float) and lo <= hi
    assert rep["fast_path"] in ("fp32", "bf16")
    if rep["fast_path"] == "fp32":
        assert rep["fid_fast"] == rep["fid_reference"] and rep["fid_ci_overlap"] is True
    assert rep["paths"]["compile"]["available"] is False and "--no-compile" in rep["paths"]["compile"]["reason"]
    assert rep["images_per_s"]["fp32"] > 0
    assert set(rep["phase_s"]) >= {"build", "flops", "generate", "dense_reference", "quality", "other"}
    assert rep["samples"] == 16 and rep["batch_size"] == 8 and rep["memory_samples"] == [12, 16]
    assert all(rep["rss_peak_mb"][n] > 0 for n in ("12", "16"))
    for k in ("threads", "machine", "torch_version", "commit", "date", "load_avg_before", "load_avg_after"):
        assert rep[k] not in (None, ""), k
    assert "harness_over_raw" in r.stdout and "wrote" in r.stdout
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")   # temporary caches only


def test_fast_path_failure_and_time_limit_are_unavailable(monkeypatch):
    """A compile path that raises, or takes longer than the limit, is recorded unavailable; fp32 is measured."""
    import bench.benchmarks.throughput as tp
    from bench.zoo import tiny_bundle
    b = tiny_bundle()

    def broken(var):
        def fail(*a, **k):
            raise RuntimeError("backend exploded\nsecond line")
        return tp.NetView(var, fail)

    def slow(var):
        def sleepy(*a, **k):
            time.sleep(0.3)
            return var.scale_forward(*a, **k)
        return tp.NetView(var, sleepy)

    for make, reason in ((broken, "RuntimeError: backend exploded"), (slow, "CompileTimeout")):
        monkeypatch.setattr(tp, "compiled_net", make)
        o = tp.ThroughputOptions(samples=4, batch_size=2, speed_samples=4, compile_limit_s=0.5)
        paths = tp.path_nets(b, o)
        paths["bf16"].update(available=False, reason="left out here")
        sp = tp.speed_paths(b, o, b.sampling, paths, lambda s: None)
        c = sp["paths"]["compile"]
        assert c["available"] is False and c["reason"].startswith(reason) and c["images_per_s"] is None
        assert sp["fast_path"] == "fp32" and sp["fast_over_reference"] == 1.0
        assert sp["paths"]["fp32"]["token_agreement_vs_fp32"] == 1.0


def test_clean_and_overlap():
    import bench.benchmarks.throughput as tp
    from bench.benchmarks.jsonfile import json_text, plain
    assert plain({"a": float("nan"), "b": (1, float("inf")), "c": True}) == {"a": None, "b": [1, None], "c": True}
    assert tp.ci_overlap([1.0, 2.0], [2.0, 3.0]) is True
    assert tp.ci_overlap([1.0, 2.0], [2.5, 3.0]) is False
    assert tp.ci_overlap([None, 2.0], [1.0, 3.0]) is None
    with pytest.raises(ValueError):
        json.dumps(float("nan"), allow_nan=False)
    assert "NaN" not in json_text({"x": float("nan")})
