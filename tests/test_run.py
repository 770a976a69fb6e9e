"""`python -m bench run` / bench.measure.measure on the tiny model: the row contract, caches, bad input."""
import json
import logging
import math
import os

import pytest
import torch

from bench.errors import BenchError
from bench.results import NULLABLE, SCHEMA, load_results
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A random-weight quality classifier (tiny ships none until the default model is shipped)."""
    from safetensors.torch import save_file
    from bench.models.classifier import ShapesClassifier
    torch.manual_seed(0)
    net = ShapesClassifier(num_classes=10, width=8, feature_dim=16, image_size=32)
    path = tmp_path_factory.mktemp("cls") / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


def _check_contract_types(row, num_scales):
    for col, (dtype, _) in SCHEMA.items():
        if dtype == "any":
            continue
        assert col in row, f"missing column {col}"
        v = row[col]
        if col in NULLABLE and (v is None or (isinstance(v, float) and math.isnan(v))):
            continue
        if dtype == "string":
            assert isinstance(v, str), (col, v)
        elif dtype == "json":
            json.loads(v)
        elif dtype == "int64":
            assert isinstance(v, (int,)) or (hasattr(v, "dtype") and v.dtype.kind == "i"), (col, v)
        elif dtype == "bool":
            assert isinstance(v, (bool,)) or (hasattr(v, "dtype") and v.dtype.kind == "b"), (col, v)
        elif dtype == "float64":
            assert isinstance(v, float) and math.isfinite(v), (col, v)
        elif dtype.startswith("list"):
            assert isinstance(v, list) and len(v) == num_scales, (col, v)
            assert all(isinstance(x, float) and math.isfinite(x) for x in v), (col, v)


def test_cli_run_fills_every_column_then_reuses_the_caches(tmp_path, classifier):
    res, cache = tmp_path / "results", tmp_path / "cache"
    args = ("run", "--model", "tiny", "--samples", 12, "--batch-size", 4, "--seed", 3, "--results", res,
            "--classifier", classifier, "--reference-count", 64, "--threads", 1)
    env = {"VARBENCH_CACHE": str(cache)}
    first = run_cli(*args, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    df = load_results(str(res))
    assert len(df) == 1
    row = df.iloc[0].to_dict()
    _check_contract_types(row, num_scales=7)
    assert row["method"] == "dense" and row["samples"] == 12 and row["batch_size"] == 4 and row["seed"] == 3
    assert row["model"] == "tiny" and row["model_depth"] == 2 and row["flop_images"] == 1
    assert abs(row["macs_fvcore"] / row["macs_analytic"] - 1) < 0.02
    assert all(abs(a / b - 1) < 0.02 for a, b in zip(row["macs_fvcore_per_scale"], row["macs_analytic_per_scale"]))
    assert row["macs_decoder"] > 0 and row["macs_total"] == pytest.approx(row["macs_fvcore"] + row["macs_decoder"])
    assert row["timing_batches"] == 2 and row["warmup_batches"] == 1 and row["timer"] == "perf_counter"
    assert row["env_threads"] == 1 and row["mem_peak_bytes"] >= 0 and row["mem_kind"].startswith("cpu_rss")
    assert row["fidelity_token_agreement"] == 1.0 and row["dense_cache"] == "stored"  # dense is its own reference
    assert row["reference_cached"] == False and row["reference_count"] == 64  # noqa: E712 (numpy bool)
    assert "i % num_classes" in row["seed_scheme"]
    # paired with itself: speedup 1 by definition, the A/A ratio measured; the same images: ΔFID exactly 0
    assert (row["speedup"], row["speedup_ci_low"], row["speedup_ci_high"]) == (1.0, 1.0, 1.0)
    assert 6 <= row["timing_rounds"] <= 24 and row["speedup_aa_ci_low"] <= row["speedup_aa"] <= row["speedup_aa_ci_high"]
    assert (row["fid_delta"], row["fid_delta_ci_low"], row["fid_delta_ci_high"]) == (0.0, 0.0, 0.0)
    assert 0.0 <= row["class_accuracy"] <= 1.0 and row["class_accuracy_delta"] == 0.0
    assert row["class_accuracy_delta_ci_low"] == row["class_accuracy_delta_ci_high"] == 0.0
    assert json.loads(row["reference_split"]) == dict(data="shapes", data_id="shapes", split="val", count=64,
                                                      seed=2000, per_class=[7, 7, 7, 7, 6, 6, 6, 6, 6, 6])
    assert row["macs_ratio"] == pytest.approx(1.0, rel=1e-9) and math.isnan(row["time_flop_efficiency"])

    second = run_cli(*args, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    log = second.stdout + second.stderr
    assert "dense reference: reused cached outputs" in log and "reference from cache" in log
    df = load_results(str(res))
    assert len(df) == 2 and df["run_id"].is_unique
    again = df.iloc[1]
    assert again["dense_cache"] == "reused" and again["reference_cached"] == True  # noqa: E712
    assert again["fidelity_token_agreement"] == 1.0  # same seeds, same tokens as the cached dense outputs
    assert again["fid"] == pytest.approx(row["fid"])


# ---------------------------------------------------------------------------------------------- a dynamic method
@pytest.fixture
def skip_ffn_method():
    """A test method: the last block skips its FFN on the last scale (fewer MACs, different samples) and counts
    skipped tokens with the reset_stats protocol."""
    from bench import registry
    from bench.analytic import dense_scale_macs
    from bench.registry import Method, Param, clone_structure

    class SkipFFN(torch.nn.Module):
        def __init__(self, ffn, scale):
            super().__init__()
            self.ffn, self.scale = ffn, scale
            self.reset_stats()

        def reset_stats(self):
            self.skipped = 0

        def forward(self, x, si=None):
            if si == self.scale:
                self.skipped += x.shape[0] * x.shape[1]
                return torch.zeros_like(x)
            return self.ffn(x, si)

    class SkipLastFFN(Method):
        kind = "weight"
        display_name, family = "Skip last FFN (test)", "test"
        params = (Param("fail_check", bool, False),)

        def check_model(self, bundle):
            if self.config["fail_check"]:
                raise BenchError("method skip-last-ffn: fail_check=true refuses every model")

        def build(self, bundle):
            net = clone_structure(bundle.var)
            net.blocks[-1].ffn = SkipFFN(net.blocks[-1].ffn, len(net.patch_nums) - 1)
            return net

        def analytic_macs(self, net, bundle, batch):
            m = [s.total for s in dense_scale_macs(bundle.var.cfg, batch)]
            m[-1] -= dense_scale_macs(bundle.var.cfg, batch)[-1].ffn / bundle.var.cfg.depth
            return m

        def row_metrics(self, net, bundle):
            return dict(skipped_tokens=net.blocks[-1].ffn.skipped)

    registry.register_method("test-skip-last-ffn")(SkipLastFFN)
    yield "test-skip-last-ffn"
    registry._REGISTRY.pop("test-skip-last-ffn", None)


def test_measure_dynamic_method_fidelity_stats_and_trial_key(tmp_path, monkeypatch, tiny, classifier,
                                                             skip_ffn_method, caplog):
    from bench.measure import measure
    from bench.registry import create_method
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="var_bench")
    kw = dict(samples=8, batch_size=4, results_dir=str(tmp_path / "res"), classifier=classifier,
              reference_count=32, metrics=("fid", "kid"), trial_key="skip", sweep="t")
    row = measure(tiny, create_method(skip_ffn_method), **kw)
    assert row["dense_cache"] == "generated"            # dense outputs made for the comparison, then cached
    assert 0 < row["fidelity_token_agreement"] < 1     # the method changes the last scale's tokens...
    assert row["fidelity_token_agreement_per_scale"][:-1] == [1.0] * 6   # ...and only those
    assert row["fidelity_psnr_db"] < 100
    dense = [s.total for s in __import__("bench.analytic").analytic.dense_scale_macs(tiny.var.cfg, 1)]
    assert row["macs_fvcore"] < sum(dense)               # the trace saw the skipped FFN
    assert abs(row["macs_fvcore"] / row["macs_analytic"] - 1) < 0.02   # and the method's formula agrees
    # statistics were reset before the N-sample run: 2 batches x 4 images x 2 CFG rows x 64 tokens (the extra
    # paired-timing rounds run after the statistics were read)
    assert row["skipped_tokens"] == 8 * 2 * 64
    assert 6 <= row["timing_rounds"] <= 24 and row["speedup_ci_low"] <= row["speedup"] <= row["speedup_ci_high"]
    assert row["macs_ratio"] == pytest.approx(row["macs_analytic_all"] / sum(dense))
    assert row["macs_executed_all"] == row["macs_analytic_all"] and row["macs_executed_ratio"] == row["macs_ratio"]
    assert row["fid_delta_ci_low"] <= row["fid_delta"] <= row["fid_delta_ci_high"]
    dense_row = measure(tiny, "dense", **dict(kw, trial_key="dense", results_dir=str(tmp_path / "dense-res")))
    assert row["fid"] - row["fid_delta"] == pytest.approx(dense_row["fid"])
    assert row["class_accuracy"] - row["class_accuracy_delta"] == pytest.approx(dense_row["class_accuracy"])
    assert row["class_accuracy_delta_ci_low"] <= row["class_accuracy_delta"] <= row["class_accuracy_delta_ci_high"]
    row2 = measure(tiny, create_method(skip_ffn_method), **kw)
    assert row2["dense_cache"] == "reused" and any("reused cached outputs" in m for m in caplog.messages)
    assert row2["fidelity_token_agreement"] == row["fidelity_token_agreement"]
    df = load_results(str(tmp_path / "res"))
    assert len(df) == 1 and df["run_id"][0] == row2["run_id"]   # the trial's row was replaced, not duplicated


# ---------------------------------------------------------------------------------------------- bad input
def _bad(argv, capsys):
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, classifier,
                                                              skip_ffn_method):
    cache = tmp_path / "cache"
    monkeypatch.setenv("VARBENCH_CACHE", str(cache))
    res = tmp_path / "results"
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["run", "--model", "tiny", "--results", str(res), "--classifier", classifier, "--samples", "12",
            "--reference-count", "64"]
    cases = {
        "samples": (["--samples", "0"], "--samples"),
        "seed": (["--seed", "-1"], "--seed"),
        "batch": (["--batch-size", "0"], "--batch-size"),
        "method": (["--method", "nope"], "unknown method 'nope'; valid:"),
        "param": (["--set", "tau=0.5"], "unknown parameter 'tau'"),
        "set": (["--set", "novalue"], "expected key=value"),
        "value": (["--method", skip_ffn_method, "--set", "fail_check=maybe"], "fail_check='maybe' is not a valid bool"),
        "check_model": (["--method", skip_ffn_method, "--set", "fail_check=true"], "refuses every model"),
        "results": (["--results", str(afile / "results")], "is not a directory"),
        "top_k": (["--top-k", "100000"], "--top-k must be in [0, 64]"),
        "metric": (["--metrics", "fid,nope"], "unknown quality metric"),
        "reference_small": (["--reference-count", "2"], "reference images"),
        "samples_small": (["--samples", "5"], "IS needs >= 10 samples"),
        "classifier": (["--classifier", str(tmp_path / "none.safetensors")], "not found"),
        "model": (["--model", "nope"], "unknown model 'nope'"),
    }
    if not torch.cuda.is_available():
        cases["device"] = (["--device", "cuda"], "not available")
    for name, (extra, msg) in cases.items():
        code, err = _bad(base + extra, capsys)
        assert code == 2, (name, err)
        assert err.startswith("error:") and "\n" not in err and msg in err, (name, err)
        assert not res.exists(), name
        assert not (cache / "dense-outputs").exists() and not (cache / "quality").exists(), name


def test_bad_input_through_the_real_cli(tmp_path):
    res = tmp_path / "results"
    p = run_cli("run", "--model", "tiny", "--samples", "-3", "--results", res)
    assert p.returncode == 2 and p.stderr.strip().startswith("error:") and "\n" not in p.stderr.strip()
    assert not res.exists()
