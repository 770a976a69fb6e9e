"""Experiment tracking (bench/tracking.py): `--track mlflow|wandb|tensorboard` on `run` and `sweep` records each
row as one run, read back here with each library's own reader; bad names and missing libraries are one line."""
import glob
import json
import logging
import math
import os
import subprocess
import sys

import pytest

from bench.cli import main
from tests.conftest import ROOT

# the tiny model, few samples, no paired timing, FID only against 64 reference images: a row in a few seconds
FAST = ("--model", "tiny", "--method", "dense", "--samples", "20", "--batch-size", "10", "--reference-count", "64",
        "--timing-rounds", "0", "--metrics", "fid", "--bootstrap", "0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: the reference features and dense outputs are computed once."""
    return str(tmp_path_factory.mktemp("cache"))


def _cli(*argv):
    """bench.cli.main in this process; returns its exit status."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    return e.value.code


def _run(tmp_path, cache, *track):
    """`run` with --track ...: exit status 0 and the stored row."""
    from bench.results import load_results
    res = tmp_path / "r"
    assert _cli("run", *FAST, "--cache-dir", cache, "--results", res, *track) == 0
    df = load_results(str(res))
    assert len(df) == 1
    return res, df.iloc[0].to_dict()


def test_tensorboard_event_files_hold_the_metrics_and_hparams(tmp_path, cache):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    res, row = _run(tmp_path, cache, "--track", "tensorboard")     # default track dir: <results>/tracking
    dirs = glob.glob(str(res / "tracking" / "tensorboard" / f"{row['run_id']}_*"))
    assert len(dirs) == 1
    ea = EventAccumulator(dirs[0])
    ea.Reload()
    assert "fid" in ea.Tags()["scalars"] and "speedup" not in ea.Tags()["scalars"]
    (fid,) = ea.Scalars("fid")
    assert fid.step == 0 and fid.value == pytest.approx(row["fid"], rel=1e-6)    # float32 in the event file
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["method"].string_value == "dense" and start.hparams["samples"].number_value == 20


def test_mlflow_run_holds_the_rows_configuration_and_numbers(tmp_path, cache, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    _, row = _run(tmp_path, cache, "--track", "mlflow")
    from mlflow.tracking import MlflowClient
    client = MlflowClient()                                 # the same database, read back through mlflow
    exp = client.get_experiment_by_name("var-bench")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["var_bench.run_id"] == row["run_id"]
    assert run.data.metrics["fid"] == pytest.approx(row["fid"]) and run.data.metrics["fid_delta"] == 0.0
    assert run.data.metrics["macs_total"] == pytest.approx(row["macs_total"])
    assert "speedup" not in run.data.metrics               # NaN (no paired timing): not a metric
    p = run.data.params
    assert (p["method"], p["model"], p["samples"], p["seed"], p["dtype"]) == ("dense", "tiny", "20", "0", "fp32")
    assert p["run_id"] == row["run_id"] and "fid" not in p and "samples" not in run.data.metrics


def _wandb_records(path):
    """The records of an offline W&B run file (run-<id>.wandb): W&B's header, then LevelDB-log framed protobuf
    records in 32 KiB blocks (7-byte chunk headers: CRC, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:               # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_offline_run_holds_the_config_and_metrics(tmp_path, cache, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    track = tmp_path / "track"
    _, row = _run(tmp_path, cache, "--track", "wandb", "--track-dir", track)
    files = glob.glob(str(track / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    key = lambda item: item.key or "/".join(item.nested_key)   # noqa: E731
    config, history, exit_code = {}, {}, None
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update({key(i): json.loads(i.value_json) for i in r.run.config.update})
            assert r.run.project == "var-bench" and r.run.display_name == "dense on tiny"
        elif kind == "config":
            config.update({key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.update({key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "exit":
            exit_code = r.exit.exit_code
    assert exit_code == 0
    assert (config["method"], config["model"], config["samples"], config["run_id"]) == ("dense", "tiny", 20,
                                                                                          row["run_id"])
    assert history["fid"] == pytest.approx(row["fid"]) and history["fid_delta"] == 0.0
    assert "speedup" not in history and "method" not in history


def test_a_tracking_failure_keeps_the_row_and_warns(tmp_path, cache, monkeypatch, caplog):
    pytest.importorskip("tensorboard")
    from bench.tracking import Tracker

    def broken(self, row, params, metrics):
        raise RuntimeError("the tracking server went away")
    monkeypatch.setattr(Tracker, "_track_tensorboard", broken)
    with caplog.at_level(logging.WARNING, logger="var_bench"):
        _, row = _run(tmp_path, cache, "--track", "tensorboard")     # exit 0, the row stored
    assert f"tensorboard could not record row {row['run_id']}" in caplog.text
    assert "the tracking server went away" in caplog.text and "the row is stored in" in caplog.text


def test_the_sweep_driver_tracks_each_reported_row_tagged_with_the_sweep_id(tmp_path, monkeypatch):
    """The driver's Ray Tune callback stores a reported row and records it as one run, whatever node it ran on."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from bench.log import counter_bar
    from bench.sweep import SweepRunner, Trial, TrialProgress
    from bench.tracking import Tracker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    t = Trial("m/dense", "m", "dense", "dense", {})
    runner = SweepRunner({"name": "x"}, [t], "x-1", str(tmp_path / "r"), {}, 1, 0,
                         tracker=Tracker(("mlflow",), str(tmp_path / "r")))
    row = dict(run_id="r1", sweep="x", sweep_id="x-1", trial_key="x-1/m/dense", sweep_point="m/dense",
               method="dense", model="tiny", fid=1.5, fid_delta=float("nan"), mem_peak_bytes=4096,
               macs_analytic_per_scale=[1.0, 2.0], started_at="2026-01-01T00:00:00+00:00")
    # a worker's row comes back as JSON; the driver stores it (no node shares this store) and then tracks it
    result = dict(status="ok", fid=1.5, trial_s=1.0, row_json=json.dumps(row))
    with counter_bar(1, "x", "trial") as runner.bar:
        TrialProgress(runner, {"m/dense": t}, 0, 1).record("m/dense", result)
    from mlflow.tracking import MlflowClient
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("var-bench/x").experiment_id],
                                filter_string="tags.sweep_id = 'x-1'")
    assert run.info.run_name == "m/dense" and run.data.tags["trial_key"] == "x-1/m/dense"
    assert run.data.metrics == {"fid": 1.5, "mem_peak_bytes": 4096.0}
    assert run.data.params["sweep_point"] == "m/dense" and run.data.params["sweep_id"] == "x-1"
    assert os.listdir(tmp_path / "r" / "rows")


def test_split_row_configuration_as_params_numbers_as_metrics():
    import numpy as np
    from bench.tracking import split_row
    params, metrics = split_row(dict(
        method="dmoe", param_tau=0.8, param_taus="[0.8, 0.7]", model="tiny", samples=np.int64(20), seed=0,
        cfg=1.5, more_smooth=False, dtype="fp32", sweep_id="s-1", ray_nodes=1, env_torch="2.4",
        fid=np.float64(12.5), speedup=float("nan"), fid_delta_ci_low=-0.5, timing_noisy=np.bool_(True),
        mem_peak_bytes=np.int64(10), macs_fvcore_per_scale=[1.0, 2.0], phase_s='{"a": 1}', mem_kind="cpu_rss",
        quality_inf=math.inf, expert_share=0.25, time_median_s="0.25", expert_load="0.5"))
    assert params == dict(method="dmoe", param_tau=0.8, param_taus="[0.8, 0.7]", model="tiny", samples=20, seed=0,
                          cfg=1.5, more_smooth=False, dtype="fp32", sweep_id="s-1", ray_nodes=1, env_torch="2.4")
    # a JSON round trip with default=str makes strings of numpy numbers: numeric columns read back as numbers
    assert metrics == dict(fid=12.5, fid_delta_ci_low=-0.5, timing_noisy=1.0, mem_peak_bytes=10.0,
                           expert_share=0.25, time_median_s=0.25, expert_load=0.5)


@pytest.mark.parametrize("argv", [("run", *FAST, "--track", "mlflow", "--track", "neptune"),
                                  ("run", *FAST, "--track", "tensorboard,,wandb"),
                                  ("sweep", "tau", "--dry-run", "--track", "MLflow,comet")])
def test_an_unknown_backend_is_refused_in_one_line_naming_the_valid_ones(argv, tmp_path, capsys):
    res = tmp_path / "r"
    assert _cli(*argv, "--results", res) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --track")
    assert "valid: mlflow, wandb, tensorboard" in err
    assert not res.exists()


@pytest.mark.parametrize("backend, module", [("mlflow", "mlflow"), ("wandb", "wandb"),
                                             ("tensorboard", "tensorboard")])
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_missing_library_is_one_line_naming_the_extra(backend, module, command, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)          # `import module` now raises ImportError
    res = tmp_path / "r"
    argv = ("run", *FAST) if command == "run" else ("sweep", "tau", "--dry-run")
    assert _cli(*argv, "--track", backend, "--results", res) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --track {backend}: {module} is not installed")
    assert "pip install 'var-bench[tracking]'" in err
    assert not res.exists()


def test_parsing_the_flags_imports_no_tracking_library():
    code = ("import sys\nfrom bench.cli import build_parser\np = build_parser()\n"
            "a = p.parse_args(['run', '--track', 'mlflow,wandb', '--track', 'tensorboard'])\n"
            "assert a.track == ['mlflow,wandb', 'tensorboard'], a.track\n"
            "p.parse_args(['sweep', 'x', '--track', 'wandb', '--track-dir', 'd'])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'wandb', 'tensorboard', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_resume_command_keeps_the_tracking_flags():
    from bench.cli import build_parser
    from bench.commands.sweep import resume_command
    a = build_parser().parse_args(["sweep", "tau", "--track", "mlflow,wandb", "--track-dir", "t d"])
    assert resume_command(a).endswith("--resume --results results --track mlflow,wandb --track-dir 't d'")


def test_only_the_process_that_made_the_tracker_records(tmp_path):
    """Through Ray Client a sweep's callback runs on the cluster with a copy of the tracker, and the driver gets the
    rows afterwards: the copy records nothing, so each row is one run."""
    import pickle
    pytest.importorskip("tensorboard")
    from bench.tracking import Tracker
    tracker = Tracker(("tensorboard",), str(tmp_path / "r"))
    copy = pickle.loads(pickle.dumps(tracker))
    copy._home = ("another-node", 1)
    row = dict(run_id="r1", method="dense", fid=1.5)
    assert copy.track(row) == {} and not (tmp_path / "r").exists()
    assert list(tracker.track(row)) == ["tensorboard"]
    assert len(glob.glob(str(tmp_path / "r" / "tracking" / "tensorboard" / "r1_dense" / "events.*"))) == 1
