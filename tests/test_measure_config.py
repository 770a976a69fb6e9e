"""Issue 25, item 1: one typed MeasureConfig declares each measurement setting once; `run`'s flags, the sweep YAML's
keys, their validation and a sweep trial's job are derived from it. Issue 22: a dense point reads the dense batches a
method point made instead of generating them again."""
import os

import pytest

from bench.errors import BenchError
from bench.measure_config import SETTINGS, MeasureConfig, flag_name, sweep_settings


def _cli(args, capsys):
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err.strip()


def test_every_setting_is_a_run_flag_and_a_sweep_key():
    from bench.cli import build_parser
    from bench.sweep.spec import MEASURE_KEYS, TOP_DEFAULTS, valid_keys
    run = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "run" in a.choices)
    flags = {s for a in run.choices["run"]._actions for s in a.option_strings}
    assert {flag_name(k) for k in SETTINGS} <= flags
    assert set(MEASURE_KEYS) == set(sweep_settings("measure"))
    assert all(TOP_DEFAULTS[k] == SETTINGS[k].default for k in sweep_settings("top"))
    sweepable = set(sweep_settings("top")) | set(sweep_settings("measure"))
    assert sweepable == set(SETTINGS) - {"threads"}        # a sweep gives each trial one thread per CPU instead
    assert {f"measure.{k}" for k in MEASURE_KEYS} <= set(valid_keys(dict(points={})))


@pytest.mark.parametrize("values,message", [
    (dict(samples=0), "--samples must be >= 1, got 0"),
    (dict(seed=-1), f"--seed must be in 0..{2 ** 40}, got -1"),
    (dict(warmup_batches=1001), "--warmup-batches must be in 0..1000, got 1001"),
    (dict(threads=513), "--threads must be in 1..512, got 513"),
    (dict(reference_count=0), "--reference-count must be in 1..1000000, got 0"),
    (dict(resolve=0.0), "--resolve must be in (0, 100], got 0"),
    (dict(resolve=float("inf")), "--resolve must be a finite number in (0, 100]"),
    (dict(metrics="fid,nope"), "--metrics: unknown quality metric 'nope'; valid: fid, isc, prc, kid"),
    (dict(dtype="fp64"), "--dtype 'fp64' is not a valid dtype; valid: fp32, bf16, fp16"),
    (dict(samples="x"), "--samples must be an integer >= 1, got 'x'"),
    (dict(max_samples=10), "--max-samples is the budget of --resolve; give --resolve too"),
    (dict(resolve=1.0, bootstrap=0), "it needs the fid metric and --bootstrap >= 1"),
    (dict(resolve=1.0, samples=30, batch_size=20, max_samples=100), "must be a multiple of the batch size"),
])
def test_bad_values_name_the_setting_and_its_range(values, message):
    with pytest.raises(BenchError) as e:
        MeasureConfig.from_values(values, flag_name)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_values_are_normalised_and_survive_the_job_round_trip():
    c = MeasureConfig(samples=16.0, dtype="bfloat16", metrics="fid,kid,fid", resolve=2, max_samples=64,
                      batch_size=8)
    assert (c.samples, c.dtype, c.metrics, c.resolve) == (16, "bf16", ("fid", "kid"), 2.0)
    assert c.resolve_plan().looks == (16, 32, 64)
    assert MeasureConfig.from_dict(c.as_dict()) == c
    with pytest.raises(TypeError):
        MeasureConfig(sampels=3)                          # a misspelt setting is a programming error


def test_run_and_sweep_refuse_the_same_bad_value_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    res = tmp_path / "res"
    code, err = _cli(["run", "--model", "tiny", "--timing-rounds", "1001", "--results", res], capsys)
    assert code == 2 and err == "error: --timing-rounds must be in 0..1000, got 1001"
    code, err = _cli(["sweep", "tau", "--dry-run", "--set", "measure.timing_rounds=1001", "--results", res], capsys)
    assert code == 2 and "measure.timing_rounds must be in 0..1000, got 1001" in err and "\n" not in err
    code, err = _cli(["sweep", "tau", "--dry-run", "--set", "measure.max_samples=64", "--results", res], capsys)
    assert code == 2 and "measure.max_samples is the budget of measure.resolve" in err and "\n" not in err
    assert os.listdir(tmp_path) == []


def test_a_sweep_trial_job_carries_the_config(tmp_path):
    from bench.sweep.runner import SweepRunner
    from bench.sweep.spec import load_spec
    from bench.sweep.trials import expand
    y = tmp_path / "s.yaml"
    y.write_text("models: [tiny]\nsamples: 40\nbatch_size: 8\nseed: 3\n"
                 "measure: {bootstrap: 7, dtype: bfloat16, resolve: 1}\npoints:\n  dense: {method: dense}\n")
    spec = load_spec(str(y))
    assert spec["measure"] == dict(bootstrap=7, dtype="bf16", resolve=1.0)   # the spec itself stays plain
    t = expand(spec)[0]
    info = dict(address="local", version="test", num_cpus=2, nodes=1)
    job = SweepRunner(spec, [t], "s-test", str(tmp_path), info, cpus=2, gpus=0).job(t, t.params)
    c = MeasureConfig.from_dict(job["config"])
    assert (c.samples, c.seed, c.bootstrap, c.dtype, c.resolve, c.threads) == (40, 3, 7, "bf16", 1.0, 2)
    assert job["sweep_record"]["sweep_point"] == "tiny/dense" and job["sweep_record"]["ray_num_cpus"] == 2


# ------------------------------------------------------------------------------------- issue 22: the dense point
def _counting_generate(monkeypatch):
    from bench import sampling
    calls = []
    real = sampling.generate

    def generate(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(sampling, "generate", generate)
    return calls


@pytest.mark.parametrize("resolve", [None, 1.0], ids=["plain", "resolve"])
def test_a_dense_point_after_a_method_point_generates_nothing_new(tmp_path, tiny, classifier, monkeypatch, resolve):
    """The method point made dense's samples (its dense reference); the dense point reads them (from dense's batch
    store under --resolve, from the dense cache otherwise): bitwise the same samples, and the only generate calls
    are its timing batch (outputs discarded)."""
    from bench.measure import measure
    from bench.registry import create_method
    kw = dict(samples=8, batch_size=4, classifier=classifier, reference_count=32, metrics=("fid",), bootstrap=20,
              timing_rounds=0, warmup_batches=0, flop_images=0, cache_dir=str(tmp_path / "cache"))
    if resolve:
        kw.update(resolve=resolve, max_samples=16)
    method_row = measure(tiny, create_method("cfg-skip", last=1), results_dir=str(tmp_path / "r1"), **kw)
    assert method_row["dense_cache"] == "generated"
    calls = _counting_generate(monkeypatch)
    dense_row = measure(tiny, create_method("dense"), results_dir=str(tmp_path / "r2"), **kw)
    assert dense_row["resumed_batches"] == 2 and dense_row["timing_extra_batches"] == 1
    assert len(calls) == 1                                  # the timing batch; none of the 8 samples
    assert dense_row["dense_cache"] == "reused" and dense_row["fidelity_token_agreement"] == 1.0
    assert dense_row["samples"] == 8                        # dense against itself resolves at its first look
    if method_row["samples"] == 8:                          # always without resolve
        assert dense_row["fid"] == pytest.approx(method_row["fid"] - method_row["fid_delta"])


def test_a_dense_point_without_a_method_point_generates_its_samples(tmp_path, tiny, classifier, monkeypatch):
    from bench.measure import measure
    from bench.registry import create_method
    calls = _counting_generate(monkeypatch)
    row = measure(tiny, create_method("dense"), samples=8, batch_size=4, classifier=classifier, reference_count=32,
                  metrics=("fid",), bootstrap=0, timing_rounds=0, warmup_batches=0, flop_images=0,
                  cache_dir=str(tmp_path / "cache"), results_dir=str(tmp_path / "r"))
    assert row["resumed_batches"] == 0 and len(calls) == 2 and row["dense_cache"] == "stored"


# ------------------------------------------------------------------------------------- the sweep trial's record
def test_sweep_columns_are_typed_in_the_schema_and_null_outside_a_sweep():
    from dataclasses import fields
    from bench.records import SweepRecord
    from bench.results import NULLABLE, SCHEMA
    names = [f.name for f in fields(SweepRecord)]
    assert len(names) == 15 and all(n.startswith(("sweep_", "ray_")) for n in names)
    assert all(n in SCHEMA and n in NULLABLE for n in names)
    assert SCHEMA["sweep_quick"][0] == "bool" and SCHEMA["ray_nodes"][0] == "int64"
    assert set(SweepRecord().row().values()) == {None}


def test_a_trial_returns_its_row_as_strict_json(monkeypatch, tmp_path):
    """A NaN in the row (a method extra) travels to the driver as null: bare NaN is not JSON."""
    import json

    import bench.measure
    from bench.sweep import runner
    seen = {}

    def fake_measure(bundle, method, config, **kw):
        seen.update(config=config, sweep_trial=kw["sweep_trial"])
        return dict(run_id="r", method="dense", fid=1.0, method_extra=float("nan"))
    monkeypatch.setattr(runner, "trial_setup", lambda job: ("cpu", None, "dense", None))
    monkeypatch.setattr(bench.measure, "measure", fake_measure)
    job = dict(config=MeasureConfig(samples=4).as_dict(), results_dir=str(tmp_path), sweep="s", sweep_id="s-1",
               trial_key="s-1/p", sweep_record=dict(sweep_point="p"))
    out = runner.run_trial(job)
    assert out["status"] == "ok", out

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the row JSON")
    assert json.loads(out["row_json"], parse_constant=refuse)["method_extra"] is None
    assert seen["config"].samples == 4 and seen["sweep_trial"].sweep_point == "p" and seen["sweep_trial"].ray_node
