"""`sweep NAME --resume --rerun POINT`: points of a finished sweep run again as the sweep file defines them now,
under the same sweep id, their earlier rows kept under rows/superseded/ and the rerun recorded in the manifest."""
import json
import os

import pytest

from bench.errors import BenchError


def _spec(tmp_path, token_rate):
    from bench.sweep import load_spec
    f = tmp_path / "pts.yaml"
    f.write_text(f"models: [tiny]\nsamples: 4\nbatch_size: 2\nmeasure: {{metrics: [fid]}}\npoints:\n"
                 f"  dense: {{method: dense}}\n"
                 f"  pruning: {{method: fixed-tokens, params: {{token_rate: {token_rate}}}}}\n")
    return load_spec(str(f))


def _store_rows(res, invocation):
    from bench.results import append_row
    for i, t in enumerate(invocation.trials):
        append_row(res, dict(sweep="pts", sweep_id=invocation.sweep_id, trial_key=t.key(invocation.sweep_id),
                             method=t.method, samples=4, seed=0, batch_size=2, run_id=f"r{i}",
                             method_config=json.dumps(t.params, sort_keys=True),
                             started_at=f"2026-01-01T00:00:0{i}+00:00"))


def test_rerun_supersedes_the_point_and_keeps_its_row(tmp_path):
    from bench.results import load_results
    from bench.sweep.store import ensure_manifest, plan, read_manifests, resolve_invocation
    res = str(tmp_path / "res")
    first = resolve_invocation(_spec(tmp_path, 0.7), res, resume=False)
    ensure_manifest(res, first, {})
    _store_rows(res, first)
    sid = first.sweep_id
    assert plan(first.spec, first.trials, sid, res) == []

    changed = _spec(tmp_path, 0.5)
    plain = resolve_invocation(changed, res, resume=True)            # as recorded: nothing to run, says --rerun
    assert plan(plain.spec, plain.trials, sid, res, plain.rerun_keys) == [] and "--rerun" in plain.note

    again = resolve_invocation(changed, res, resume=True, rerun=["pruning"])
    assert again.sweep_id == sid and again.resumed
    todo = plan(again.spec, again.trials, sid, res, again.rerun_keys)
    assert [(t.entry, t.params["token_rate"]) for t in todo] == [("pruning", 0.5)]
    assert len(load_results(res)) == 2 and not os.path.exists(os.path.join(res, "rows", "superseded"))  # not yet
    ensure_manifest(res, again, {})                                   # after every check: applied
    kept = os.listdir(os.path.join(res, "rows", "superseded"))
    assert len(kept) == 1
    assert load_results(res)["method"].tolist() == ["dense"]           # the superseded row is not read
    m = read_manifests(res, "pts")[-1]
    assert m["sweep_id"] == sid and m["spec"]["points"]["pruning"]["params"]["token_rate"] == 0.5
    assert m["reruns"][0]["entries"] == ["pruning"] and m["reruns"][0]["superseded_rows"] == [f"superseded/{kept[0]}"]
    assert m["reruns"][0]["previous_points"]["pruning"]["params"]["token_rate"] == 0.7
    later = resolve_invocation(changed, res, resume=True)             # a killed rerun: plain --resume finishes it
    assert [t.params["token_rate"] for t in plan(later.spec, later.trials, sid, res) if t.entry == "pruning"] == [0.5]
    assert later.note == ""                                           # the manifest now matches the file


def test_rerun_refusals_write_nothing(tmp_path):
    from bench.sweep.store import ensure_manifest, resolve_invocation
    res = str(tmp_path / "res")
    with pytest.raises(BenchError, match="--rerun needs --resume"):
        resolve_invocation(_spec(tmp_path, 0.7), res, resume=False, rerun=["pruning"])
    with pytest.raises(BenchError, match="no manifest of an earlier pts sweep"):
        resolve_invocation(_spec(tmp_path, 0.7), res, resume=True, rerun=["pruning"])
    first = resolve_invocation(_spec(tmp_path, 0.7), res, resume=False)
    ensure_manifest(res, first, {})
    _store_rows(res, first)
    before = sorted(os.listdir(os.path.join(res, "rows"))), sorted(os.listdir(os.path.join(res, "sweeps")))
    with pytest.raises(BenchError, match="no point 'nope' in the sweep file pts; valid: dense, pruning"):
        resolve_invocation(_spec(tmp_path, 0.5), res, resume=True, rerun=["nope"])
    assert (sorted(os.listdir(os.path.join(res, "rows"))), sorted(os.listdir(os.path.join(res, "sweeps")))) == before


def test_rerun_cli_dry_run_lists_the_point_and_writes_nothing(tmp_path, capsys):
    from bench.cli import main
    from bench.sweep.store import ensure_manifest, resolve_invocation
    res = str(tmp_path / "res")
    first = resolve_invocation(_spec(tmp_path, 0.7), res, resume=False)
    ensure_manifest(res, first, {})
    _store_rows(res, first)
    before = sorted(os.listdir(os.path.join(res, "rows"))), sorted(os.listdir(os.path.join(res, "sweeps")))
    _spec(tmp_path, 0.5)
    f = str(tmp_path / "pts.yaml")
    for args, code in (([f, "--rerun", "pruning", "--results", res], 2),
                       ([f, "--resume", "--rerun", "nope", "--results", res], 2),
                       ([f, "--resume", "--rerun", "pruning", "--results", res, "--dry-run"], 0)):
        with pytest.raises(SystemExit) as e:
            main(["sweep", *args])
        out, err = capsys.readouterr()
        assert e.value.code == code, (args, out, err)
        if code == 2:
            assert len(err.strip().splitlines()) == 1 and "--rerun" in err
    assert "pruning  [to run]  fixed-tokens" in out and "dense  [has a row]" in out
    assert (sorted(os.listdir(os.path.join(res, "rows"))), sorted(os.listdir(os.path.join(res, "sweeps")))) == before
