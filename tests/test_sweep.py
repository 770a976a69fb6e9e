"""The sweep runner: YAML + --set/--quick expansion against the registry, bad input (one line, exit 2, nothing
written), a killed sweep resuming to the full grid without duplicates (local Ray), and a Ray cluster started with
`ray start --head` on loopback reached through --address.

The end-to-end tests run a small sweep of the tiny model with a stand-in method (tests/sweep_standins.py) and a
FLOP-matched Pruned-FFN twin (real method, original weights: no prepared artifacts needed)."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from bench.errors import BenchError
from tests.conftest import ROOT, run_cli

SHIPPED = ["activation", "depth", "experts", "scales", "tau"]


# ---------------------------------------------------------------------------------------------- spec and expansion
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_expand_against_the_registry(name):
    from bench.registry import create_method, method_class
    from bench.sweep import expand, load_spec, validate_trials
    full, quick = load_spec(name), load_spec(name, quick=True)
    for spec in (full, quick):
        trials = expand(spec)
        keys = [t.key("sid") for t in trials]
        assert len(keys) == len(set(keys)) and trials
        validate_trials(spec, trials, models="skip")     # every config valid for its method
        for t in trials:
            create_method(t.method, **t.params)
            assert set(t.from_parent) <= {p.name for p in method_class(t.method).params}
            if t.parent:                                     # twins come after their parent
                assert t.phase == 1 and [x.point_id for x in trials].index(t.parent) < trials.index(t)
    assert len(expand(quick)) < len(expand(full)) and quick["samples"] < full["samples"]
    assert expand(quick)[0].method == "dense" and expand(full)[0].method == "dense"


def test_tau_sweep_has_a_flop_matched_twin_per_dmoe_point():
    from bench.sweep import expand, load_spec
    trials = expand(load_spec("tau"))
    dmoe = [t for t in trials if t.method == "dmoe"]
    twins = [t for t in trials if t.parent]
    assert sorted(t.params["tau"] for t in dmoe) == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert {t.parent for t in twins} == {t.point_id for t in dmoe}
    assert all(t.method == "pruned-ffn" and t.from_parent == {"match_macs": "macs_analytic_all"} for t in twins)


def test_set_overrides():
    from bench.sweep import expand, load_spec
    spec = load_spec("tau", sets=["samples=7", "points.dmoe.grid.tau=0.9,0.6", "sampling.cfg=2",
                                  "points.dmoe.twins.static.params.calib_images=8", "models=tiny",
                                  "points.dense.enabled=false"])
    assert spec["samples"] == 7 and spec["sampling"] == {"cfg": 2.0} and spec["models"] == ["tiny"]
    trials = expand(spec)
    assert [t.point_id for t in trials] == ["tiny/dmoe/tau=0.9", "tiny/dmoe/tau=0.9/static", "tiny/dmoe/tau=0.6",
                                            "tiny/dmoe/tau=0.6/static"]
    assert trials[1].params["calib_images"] == 8
    # a fixed parameter and an axis are exclusive: setting one replaces the other
    spec = load_spec("tau", sets=["points.dmoe.params.tau=0.75"])
    assert {t.params["tau"] for t in expand(spec) if t.method == "dmoe"} == {0.75}
    # an explicit list of points, and --quick then --set (quick's values are overridden)
    spec = load_spec("activation", quick=True, sets=["samples=9", "points.rates.grid=[{token_rate: 0.5, "
                                                                   "weight_rate: 0.5}]"])
    rates = [t for t in expand(spec) if t.entry == "rates"]
    assert spec["samples"] == 9 and [t.params["token_rate"] for t in rates] == [0.5]


@pytest.mark.parametrize("sets,expect", [
    (["point.dmoe.grid.tau=1"], "unknown key 'point.dmoe.grid.tau'"),
    (["points.dmoe.grid.taux=1"], "unknown key"),
    (["samples=abc"], "samples must be an integer"),
    (["samples=0"], "samples must be >= 1"),
    (["points.dmoe.grid.tau=0.5,0.5"], "lists a value twice"),
    (["noequals"], "KEY=VALUE"),
])
def test_set_rejects_bad_keys_and_values(sets, expect):
    from bench.sweep import load_spec
    with pytest.raises(BenchError) as e:
        load_spec("tau", sets=sets)
    assert expect in str(e.value) and "\n" not in str(e.value)
    if "unknown key" in expect:
        assert "valid:" in str(e.value) and "samples" in str(e.value) and "points.dmoe.grid.{" in str(e.value)


def test_bad_method_values_fail_before_running():
    from bench.sweep import expand, load_spec, validate_trials
    spec = load_spec("tau", sets=["points.dmoe.grid.tau=0.5,1.5"])
    with pytest.raises(BenchError, match=r"tau=1.5 is out of range; valid: float in \[0.0, 1.0\]"):
        validate_trials(spec, expand(spec), models="skip")


def test_points_the_method_sees_as_one_and_a_fixed_parameter_on_a_list_grid():
    from bench.sweep import expand, load_spec, validate_trials
    spec = load_spec("tau", sets=["points.dmoe.grid.tau=[1, 1.0]"])     # distinct as text, one config
    with pytest.raises(BenchError, match="tau=1.0 .*run the same configuration of dmoe|run the same configuration"):
        validate_trials(spec, expand(spec), models="skip")
    # fixing a parameter on an explicit list of points keeps every point with what else it sets
    spec = load_spec("activation", quick=True, sets=[
        "points.rates.grid=[{token_rate: 0.5}, {token_rate: 0.6, weight_rate: 0.5}]",
        "points.rates.params.token_rate=0.7"])
    rates = [t for t in expand(spec) if t.entry == "rates"]
    assert [(t.params["token_rate"], t.params.get("weight_rate")) for t in rates] == [(0.7, None), (0.7, 0.5)]


def test_modules_of_the_wrong_type_are_one_line(tmp_path, monkeypatch):
    from bench.sweep import load_spec
    for value in ("5", "[5]"):
        f = tmp_path / "m.yaml"
        f.write_text(f"models: [tiny]\nmodules: {value}\npoints: {{d: {{method: dense}}}}\n")
        with pytest.raises(BenchError, match="modules must be a list of module names") as e:
            load_spec(str(f))
        assert "\n" not in str(e.value)
    f.write_text("models: [tiny]\nmodules: tests.sweep_standins\npoints: {d: {method: dense}}\n")
    assert load_spec(str(f))["modules"] == ["tests.sweep_standins"]           # one name: a list of one


def test_resume_from_rows_alone_refuses_rows_of_other_settings(tmp_path):
    """Without a manifest the rows are all --resume has: trials run with another cfg or other parameters under
    the same keys are not taken as done."""
    from bench.results import append_row
    from bench.sweep import expand, load_spec
    from bench.sweep.store import latest_sweep_id_in_rows
    spec = load_spec("tau", quick=True)
    sid = "tau-rowsonly"
    dmoe = next(t for t in expand(spec) if t.method == "dmoe" and not t.parent)
    from bench.registry import create_method
    config = create_method("dmoe", **dmoe.params).config
    base = dict(sweep="tau", sweep_id=sid, trial_key=dmoe.key(sid), method="dmoe", samples=spec["samples"],
                seed=spec["seed"], batch_size=spec["batch_size"], cfg=1.5, started_at="2026-01-01T00:00:00+00:00")
    append_row(str(tmp_path), dict(base, run_id="r1", method_config=json.dumps(config, sort_keys=True)))
    assert latest_sweep_id_in_rows(str(tmp_path), spec) == sid
    with pytest.raises(BenchError, match="has cfg=.*not 4"):
        latest_sweep_id_in_rows(str(tmp_path), load_spec("tau", quick=True, sets=["sampling.cfg=4"]))
    with pytest.raises(BenchError, match="row of .*tau=0.7 was run with other settings \\(moe_scales="):
        latest_sweep_id_in_rows(str(tmp_path), load_spec("tau", quick=True, sets=["points.dmoe.params.moe_scales=[6]"]))


def _cli(capsys, *args):
    """The CLI in-process (bad input stops before anything heavy): (exit status, stdout, stderr)."""
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys):
    res = tmp_path / "res"
    cases = [("sweep", "nope"), ("sweep", "tau", "--set", "nope=1"), ("sweep", "tau", "--set", "samples=x"),
             ("sweep", "tau", "--address", "127.0.0.1:1"), ("sweep", "tau", "--address", "nohostport"),
             ("sweep", "depth", "--set", "models=tiny,shapes-d99"), ("sweep", "tau", "--cpus-per-trial", "-1"),
             ("sweep", "tau", "--quick", "--set", "points.dmoe.params.expert_size=0"),
             ("sweep", "tau", "--set", "measure.timing_rounds=-1"), ("sweep", "tau", "--set", "measure.bootstrap=-2"),
             # what each trial's measurement would refuse: refused before the manifest and the first trial
             ("sweep", "tau", "--quick", "--set", "measure.metrics=bogus"),
             ("sweep", "tau", "--quick", "--set", f"reference={tmp_path / 'none.npz'}"),
             ("sweep", "tau", "--quick", "--set", "seed=4294967296000")]
    for args in cases:
        code, out, err = _cli(capsys, *args, "--results", res)
        err = err.strip()
        assert code == 2, (args, out, err)
        assert err.startswith("error:") and "\n" not in err and ("valid" in err or "must be" in err), (args, err)
        assert not res.exists(), args
    assert "shapes-d99" in _cli(capsys, "sweep", "depth", "--set", "models=tiny,shapes-d99")[2]
    code, out, err = _cli(capsys, "sweep", "nope")
    assert all(n in err for n in SHIPPED)
    code, out, err = _cli(capsys, "sweep", "--list")
    assert code == 0 and all(n in out for n in SHIPPED)
    r = run_cli("sweep", "tau", "--set", "nope=1", "--results", str(res))     # the real entry point too
    assert r.returncode == 2 and r.stderr.startswith("error:") and not res.exists()


# ---------------------------------------------------------------------------------------------- end to end (tiny)
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A 3-trial sweep on the tiny model: dense, one stand-in point, its FLOP-matched Pruned-FFN twin."""
    import torch
    from bench.checkpoints import save_state_dict
    from bench.models.classifier import ShapesClassifier
    d = tmp_path_factory.mktemp("sweep")
    torch.manual_seed(0)
    save_state_dict(ShapesClassifier(width=8, feature_dim=16).state_dict(), str(d / "clf.safetensors"))
    (d / "t.yaml").write_text(f"""
description: test sweep (tiny model, stand-in method)
models: [tiny]
samples: 4
batch_size: 2
modules: [tests.sweep_standins]
measure: {{classifier: {d / 'clf.safetensors'}, reference_count: 64, bootstrap: 5, metrics: [fid]}}
points:
  dense: {{method: dense}}
  budget:
    method: standin-budget
    grid: {{keep: [0.5]}}
    twins:
      static:
        method: pruned-ffn
        params: {{weights: original, calib_images: 8}}
        from_parent: {{match_macs: macs_analytic_all}}
quick: {{samples: 2}}
""")
    env = dict(VARBENCH_CACHE=str(d / "cache"), PYTHONPATH=ROOT)
    return str(d / "t.yaml"), env


def _rows(results):
    from bench.results import load_results
    return load_results(results)


@pytest.mark.slow
def test_killed_sweep_resumes_to_the_full_grid_without_duplicates(tiny_sweep, tmp_path):
    yaml_path, env = tiny_sweep
    res = tmp_path / "res"
    rows_dir = res / "rows"
    e = dict(os.environ, **env)
    p = subprocess.Popen([sys.executable, "-m", "bench", "sweep", yaml_path, "--results", str(res)], cwd=ROOT, env=e,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None:
            if rows_dir.is_dir() and any(f.endswith(".parquet") and not f.startswith(".") for f in
                                         os.listdir(rows_dir)):
                break
            time.sleep(0.5)
        assert p.poll() is None, "the sweep ended before it could be killed:\n" + p.stdout.read()
        os.killpg(p.pid, signal.SIGKILL)          # the driver, its local Ray and the running trial
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(60)
    first = _rows(str(res))
    assert 1 <= len(first) < 3
    sid = first["sweep_id"].iloc[0]
    done_before = dict(zip(first["trial_key"], first["run_id"]))
    r = run_cli("sweep", yaml_path, "--results", str(res), "--resume", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{sid} (resumed)" in r.stdout and "3/3 trials have rows" in r.stdout
    df = _rows(str(res))
    keys = df["trial_key"].tolist()
    expected = [f"{sid}/tiny/dense", f"{sid}/tiny/budget/keep=0.5", f"{sid}/tiny/budget/keep=0.5/static"]
    assert sorted(keys) == sorted(expected)                  # every trial exactly once
    # ...and the trials finished before the kill were not run again (a rerun would replace its row, same key)
    assert {k: v for k, v in zip(df["trial_key"], df["run_id"]) if k in done_before} == done_before
    assert set(df["sweep_id"]) == {sid}
    parent = df[df["trial_key"] == expected[1]].iloc[0]
    twin = df[df["trial_key"] == expected[2]].iloc[0]
    assert twin["param_match_macs"] == parent["macs_analytic_all"]      # FLOP-matched to the parent's row
    assert abs(twin["macs_analytic_all"] - parent["macs_analytic_all"]) <= 0.05 * parent["macs_analytic_all"]
    assert twin["sweep_parent"] == "tiny/budget/keep=0.5" and parent["ray_address"] == "local"
    assert parent["ray_num_cpus"] == os.cpu_count() and parent["ray_cpus_per_trial"] == os.cpu_count()
    # a complete sweep resumes to nothing; resuming with other settings is refused
    r = run_cli("sweep", yaml_path, "--results", str(res), "--resume", env=env)
    assert r.returncode == 0 and "nothing to do" in r.stdout
    r = run_cli("sweep", yaml_path, "--results", str(res), "--resume", "--set", "samples=3", env=env)
    assert r.returncode == 2 and "other settings" in r.stderr
    assert len(_rows(str(res))) == 3
    # the report draws from this store
    r = run_cli("report", "--results", str(res), "--out", str(tmp_path / "rep"), env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "rep" / "t" / "pareto_fid_vs_flops.png").stat().st_size > 0


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on loopback with a per-test auth token; stopped (its process group) afterwards."""
    import shutil
    import tempfile
    d = tmp_path_factory.mktemp("ray")
    # its own short temp dir: `ray start` records the head there (not in /tmp/ray, where a stale record would
    # make other programs' ray.init() try to join a stopped cluster); short because Ray's socket paths live in it
    temp_dir = tempfile.mkdtemp(prefix="vbray", dir="/tmp")
    port, client_port = _free_port(), _free_port()
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PYTHONPATH=ROOT,
               RAY_USAGE_STATS_ENABLED="0")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    log = open(d / "head.log", "w")
    p = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                          f"--ray-client-server-port={client_port}", f"--num-cpus={os.cpu_count()}",
                          "--include-dashboard=false", "--disable-usage-stats",
                          f"--temp-dir={temp_dir}"],
                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(d))
    try:
        deadline = time.time() + 120
        up = False
        while time.time() < deadline and p.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                up = True
                break
            except OSError:
                time.sleep(0.5)
        if not up:
            tail = (d / "head.log").read_text()[-500:].replace("\n", " | ")
            pytest.skip(f"Ray cannot start a head node here (`ray start --head` exited {p.poll()} or did not open "
                        f"its port in 120 s): {tail}")
        yield ({"gcs": f"127.0.0.1:{port}", "client": f"ray://127.0.0.1:{client_port}"},
               {k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)      # `ray start --block` stops every process it started ...
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:     # ... but takes its time: the rest of the group goes now
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gcs", "client"])
def test_sweep_on_a_ray_cluster(ray_head, tiny_sweep, tmp_path, kind):
    """HOST:PORT joins the cluster as a driver; ray://HOST:PORT goes through Ray Client, where the Tune loop runs on
    the cluster: every trial, the twin included, must still be reported here and stored once."""
    addresses, auth = ray_head
    address = addresses[kind]
    yaml_path, env = tiny_sweep
    res = tmp_path / "res"
    r = run_cli("sweep", yaml_path, "--quick", "--results", str(res), "--address", address, env=dict(env, **auth))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ray " in r.stdout and address in r.stdout and "[1/3] tiny/dense: FID" in r.stderr   # trial lines: the log
    assert "[3/3] tiny/budget/keep=0.5/static: FID" in r.stderr and "3/3 trials have rows (3 reported now" in r.stdout
    df = _rows(str(res))
    assert len(df) == 3 and set(df["ray_address"]) == {address} and set(df["samples"]) == {2}
    assert df["sweep_quick"].all() and set(df["ray_nodes"]) == {1}


def test_driver_stores_a_row_written_on_another_node(tmp_path, monkeypatch):
    """A trial's row comes back with its result; the driver stores it when its own store lacks it (a worker on
    another machine without shared storage) and never twice."""
    from bench import results
    from bench.results import load_results
    from bench.sweep import SweepRunner
    runner = SweepRunner({"name": "x"}, [], "x-1", str(tmp_path), {}, 1, 0)
    row = dict(run_id="r1", sweep="x", sweep_id="x-1", trial_key="x-1/m/dense", method="dense", fid=1.5,
               macs_analytic_per_scale=[1.0, 2.0], started_at="2026-01-01T00:00:00+00:00")
    writes = []
    real_append = results.append_row
    monkeypatch.setattr(results, "append_row", lambda d, r: writes.append(r) or real_append(d, r))
    for _ in range(2):
        runner.ensure_row(json.dumps(row))
    assert len(writes) == 1                  # a same-named file would hide a second write: count them
    df = load_results(str(tmp_path))
    assert df["trial_key"].tolist() == ["x-1/m/dense"] and df["macs_analytic_per_scale"].iloc[0] == [1.0, 2.0]


def test_a_trial_ended_by_ctrl_c_is_reported_interrupted_not_failed(tmp_path, caplog):
    """After a Ctrl-C Ray Tune has put back the default SIGINT handler: a trial without a result is then
    'interrupted' (and the sweep says how to resume), while the same outcome otherwise is a dead worker."""
    import logging
    import signal
    from bench.sweep import SweepRunner, Trial, TrialProgress
    from bench.log import counter_bar
    t = Trial("m/dense", "m", "dense", "dense", {})
    for handler, word in ((signal.default_int_handler, "FAILED: the trial's worker died"), (signal.SIG_DFL,
                                                                                           "interrupted (Ctrl-C)")):
        runner = SweepRunner({"name": "x"}, [t], "x-1", str(tmp_path), {}, 1, 0)
        previous = signal.signal(signal.SIGINT, handler)
        try:
            with counter_bar(1, "x", "trial") as runner.bar, caplog.at_level(logging.INFO, logger="var_bench"):
                caplog.clear()
                TrialProgress(runner, {"m/dense": t}, 0, 1).record("m/dense", None)
        finally:
            signal.signal(signal.SIGINT, previous)
        assert word in caplog.text
        assert runner.interrupted == (handler is signal.SIG_DFL)
        assert ("m/dense" in runner.failed) == (handler is not signal.SIG_DFL)


def test_twin_parameters_come_from_the_parent_row():
    from bench.sweep import Trial, derive_twin_params
    t = Trial("m/a/x=1/tw", "m", "a", "fixed-tokens", {"criterion": "norm"}, parent="m/a/x=1",
              from_parent={"token_rate": "param_token_rate", "scales": "param_scales"}, phase=1)
    assert derive_twin_params(t, {"param_token_rate": "[0.5, 0.75]", "param_scales": None}) == \
        {"criterion": "norm", "token_rate": [0.5, 0.75], "scales": None}           # lists decoded, null = default
    t2 = Trial("m/a/tw", "m", "a", "pruned-ffn", {}, parent="m/a", from_parent={"match_macs": "macs_analytic_all"},
               phase=1)
    assert derive_twin_params(t2, {"macs_analytic_all": 1.5e9}) == {"match_macs": 1.5e9}
    for row in ({"macs_analytic_all": float("nan")}, {}):
        with pytest.raises(BenchError, match="parent"):
            derive_twin_params(t2, row)
