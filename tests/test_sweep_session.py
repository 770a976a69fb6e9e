"""bench/sweep/session.py directly: a sweep planned from a small YAML (nothing written), its options checked in one
line, and run_sweep's outcome with Ray and the trial runner replaced (no Ray sweep starts here)."""
import math
import os

import pytest

from bench.errors import BenchError

SMALL = "models: [tiny]\nsamples: 16\nbatch_size: 8\npoints:\n  dense: {method: dense}\n" \
        "  tome:\n    method: tome\n    grid: {ratio: [0.5, 0.25]}\n"


def test_plan_sweep_lists_the_trials_and_writes_nothing(tmp_path):
    from bench.sweep.session import plan_sweep
    f = tmp_path / "small.yaml"
    f.write_text(SMALL)
    res = tmp_path / "res"
    p = plan_sweep(str(f), str(res), sets=["samples=12"])
    assert p.spec["name"] == "small" and p.spec["samples"] == 12 and list(p.models) == ["tiny"]
    assert [t.method for t in p.trials] == ["dense", "tome", "tome"] and p.pending == p.trials
    assert p.sweep_id.startswith("small-") and p.invocation.resumed is False
    assert not res.exists()


def test_sweep_descriptions_name_every_shipped_sweep():
    from bench.sweep import list_sweeps
    from bench.sweep.session import sweep_descriptions
    d = sweep_descriptions()
    assert [name for name, _, _ in d] == list_sweeps() and all(desc for _, desc, _ in d)


@pytest.mark.parametrize("change,message", [
    (dict(concurrent=0), "--concurrent must be >= 1, got 0"),
    (dict(generation_min_samples=0), "--generation-min-samples must be >= 1"),
    (dict(status_every=math.nan), "--status-every must be a finite number of seconds > 0"),
    (dict(cpus_per_trial=math.inf), "--cpus-per-trial must be a finite number >= 0"),
])
def test_sweep_options_refused_in_one_line(change, message):
    from bench.sweep.session import SweepOptions, check_options
    with pytest.raises(BenchError, match=message):
        check_options(SweepOptions(**change))
    with pytest.raises(BenchError, match=f"^{list(change)[0]} must be"):     # named as the caller names them
        check_options(SweepOptions(**change), label=str)


def test_run_sweep_outcome_with_ray_and_the_runner_replaced(tmp_path, monkeypatch):
    import bench.sweep.session as S
    f = tmp_path / "small.yaml"
    f.write_text(SMALL)
    p = S.plan_sweep(str(f), str(tmp_path / "res"))
    monkeypatch.setattr(S, "connect_ray", lambda address, verbose: dict(
        version="test", address="local", nodes=1, num_cpus=2.0, start_s=0.0, max_node_cpus=2.0, max_node_gpus=0.0))
    made = []

    class Runner:
        def __init__(self, spec, trials, sweep_id, results, info, cpus, gpus, concurrent, verbose, **kw):
            made.append(dict(cpus=cpus, gpus=gpus, concurrent=concurrent, **kw))
            self.failed, self.skipped, self.interrupted = {trials[0].point_id: "boom"}, {}, False

        def run(self):
            return 2, 1
    monkeypatch.setattr(S, "SweepRunner", Runner)
    lines = []
    out = S.run_sweep(p, S.SweepOptions(cpus_per_trial=1.0, status_every=5.0), say=lines.append)
    assert made == [dict(cpus=1.0, gpus=0.0, concurrent=1, status_every_s=5.0, generation_workers=1, tracker=None)]
    assert lines and lines[0].startswith("ray test local: 1 node(s), 2 CPUs") and "1 CPU(s) per trial" in lines[0]
    assert (out.ran, out.bad, out.have, out.total) == (2, 1, 0, 3) and not out.complete
    assert list(out.failed.values()) == ["boom"] and out.interrupted is False
    assert os.listdir(tmp_path / "res" / "sweeps")                   # the manifest written before the trials
