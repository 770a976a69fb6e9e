"""The researcher's own route, end to end on an image folder the test generates (left-right-asymmetric classes):
train (short) -> register -> evaluate -> prepare every method -> run -> sweep tau -> report, with no --data or
--reference flag after `train`; and the route's bad input: one line, exit 2, nothing written."""
import json
import os

import pytest

from tests.conftest import run_cli
from tests.imagefolder import make_image_folder


def _ok(r):
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    return r


def _bad(r, needle):
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr[-2000:]


@pytest.fixture(scope="module")
def route(tmp_path_factory):
    """A registered model trained for a few steps on a generated folder; env points home and cache at tmp."""
    tmp = tmp_path_factory.mktemp("route")
    data = make_image_folder(tmp / "data", classes=("a", "b", "c", "d"), per_class=(24, 24, 24, 24))
    env = dict(VARBENCH_HOME=str(tmp / "home"), VARBENCH_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    runs = tmp / "runs"
    common = ("--data", data, "--threads", "1", "--count", "64")
    _ok(run_cli("train", "vqvae", "--out", runs / "vq", "--steps", "3", "--batch", "8", *common, env=env))
    vq = runs / "vq" / "vqvae.safetensors"
    _ok(run_cli("train", "var", "--vqvae", vq, "--out", runs / "var", "--steps", "3", "--batch", "8", "--depth", "2",
                "--width", "64", "--heads", "2", *common, env=env))
    _ok(run_cli("train", "classifier", "--vqvae", vq, "--out", runs / "clf", "--steps", "3", "--batch", "16",
                *common, env=env))
    _ok(run_cli("register", "--name", "mine", "--vqvae", vq, "--var", runs / "var" / "var.safetensors",
                "--classifier", runs / "clf" / "classifier.safetensors", env=env))
    return dict(tmp=tmp, data=data, env=env, runs=runs)


@pytest.mark.slow
def test_the_whole_route_needs_no_data_or_reference_flags(route):
    tmp, env = route["tmp"], route["env"]
    man = json.load(open(tmp / "home" / "models" / "mine" / "manifest.json"))
    ds = man["dataset"]
    assert ds["name"] == "folder" and ds["path"] == os.path.realpath(route["data"]) and ds["hflip"] is False
    assert ds["classes"] == ["a", "b", "c", "d"] and ds["data_id"].startswith("folder-")
    assert ds["splits"]["var"][0]["split"] == "train" and ds["splits"]["var"][0]["per_class"] == [16] * 4
    assert man["sampling"]["cfg"] == 3.0 and man["code_commit"] and "threads" in man["training"]["var"]
    assert "mine" in _ok(run_cli("models", env=env)).stdout

    cert = tmp / "cert.json"
    _ok(run_cli("evaluate", "--model", "mine", "--samples", "8", "--batch-size", "8", "--bootstrap", "5",
                "--out", cert, env=env))
    rep = json.loads(cert.read_text())
    assert rep["reference_split"]["split"] == "val" and rep["reference_split"]["per_class"] == [5] * 4
    assert rep["rows"]["real_test"]["images"] == 8 and rep["rows"]["dense"]["classifier_accuracy"] is not None

    small = ("--threads", "1")
    _ok(run_cli("prepare", "dmoe", "--model", "mine", "--steps", "2", "--router-steps", "2", "--images", "16",
                "--eval-images", "8", "--router-images", "16", "--batch", "4", *small, env=env))
    _ok(run_cli("prepare", "pruned-ffn", "--model", "mine", "--steps", "2", "--calib-images", "16", *small, env=env))
    _ok(run_cli("prepare", "actvar", "--model", "mine", "--steps1", "2", "--steps2", "2", "--images", "16",
                "--eval-images", "8", "--batch", "4", *small, env=env))
    arts = sorted(os.listdir(tmp / "cache" / "artifacts"))
    assert len(arts) == 4, arts
    for a in arts:
        meta = json.load(open(tmp / "cache" / "artifacts" / a / "meta.json"))
        assert meta["key"].get("data", meta["key"].get("finetune", {}).get("data")) == ds["data_id"], a
        assert {s["split"] for s in meta["data_splits"]} <= {"train", "val"} and meta["data_splits"]
        for s in meta["data_splits"]:
            assert max(s["per_class"]) - min(s["per_class"]) <= 1 and s["data_id"] == ds["data_id"]

    res = tmp / "results"
    _ok(run_cli("run", "--model", "mine", "--method", "dmoe", "--set", "tau=0.8", "--set", "router_steps=2",
                "--set", "finetune_steps=2", "--samples", "12", "--batch-size", "4", "--timing-rounds", "0",
                "--results", res, env=env))
    from bench.results import load_results
    row = load_results(str(res)).iloc[0]
    assert row["model"] == "mine" and row["model_source"] == "user"
    assert json.loads(row["reference_split"])["data_id"] == ds["data_id"]
    assert 0 <= row["class_accuracy"] <= 1 and row["class_accuracy_delta_ci_low"] <= row["class_accuracy_delta"]

    _ok(run_cli("sweep", "tau", "--quick", "--model", "mine", "--set", "points.dmoe.params.router_steps=2",
                "--set", "points.dmoe.params.finetune_steps=2", "--set", "points.dmoe.twins.static.params.finetune_steps=2",
                "--set", "points.dmoe.twins.static.params.calib_images=16", "--set", "measure.timing_rounds=0",
                "--results", res, env=env))
    df = load_results(str(res), sweep="tau")
    assert len(df) == 3 and set(df["model"]) == {"mine"} and df["class_accuracy"].notna().all()
    _ok(run_cli("report", "--sweep", "tau", "--results", res, "--out", tmp / "report", env=env))
    assert os.listdir(tmp / "report")


@pytest.mark.slow
def test_bad_input_on_the_route(route, tmp_path):
    env, runs = route["env"], route["runs"]
    one = make_image_folder(tmp_path / "one", classes=("only",), per_class=(10,))
    _bad(run_cli("train", "vqvae", "--out", tmp_path / "o", "--steps", "1", "--data", one, env=env),
         "has one class (only); a class-conditional model needs >= 2 classes")
    other = make_image_folder(tmp_path / "other", classes=("x", "y"), per_class=(4, 4))
    reg = ("--vqvae", runs / "vq" / "vqvae.safetensors", "--var", runs / "var" / "var.safetensors")
    _bad(run_cli("register", "--name", "mine2", *reg, "--reference", other, env=env),
         "reference folder")
    _bad(run_cli("run", "--model", "mine", "--method", "dense", "--samples", "4", "--reference", other,
                 "--results", tmp_path / "res", env=env), "has classes x, y but model mine was trained on a, b, c, d")
    _bad(run_cli("register", "--name", "default", *reg, env=env), "model name 'default' is taken by a shipped model")
    _bad(run_cli("register", "--name", "mine", *reg, env=env), "already registered")
    assert sorted(os.listdir(tmp_path)) == ["one", "other"]
