"""Each shipped sweep's `--quick` form, end to end on the embedded default with its shipped artifacts, exactly as a
user runs it: `python -m bench sweep NAME --quick`. One row per expanded trial, every row measured (MACs by fvcore
and by formula agreeing within 2%, FID within its interval), and FLOP-matched twins at their parent's MACs.

The reference statistics and the dense outputs are cached in one directory shared by the runs, as they are
for a user (so only the first run builds them)."""
import math

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow    # each run takes 15-30 s (minutes on a busy 2-core machine)

SHIPPED = ["tau", "activation", "scales", "experts", "depth", "field"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from bench.zoo import list_models
    assert "default" in list_models(), "the embedded default is missing from bench/assets/manifest.json"
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("name", SHIPPED)
def test_quick_form_runs_on_the_embedded_default(name, cache, tmp_path):
    from bench.results import load_results
    from bench.sweep import expand, load_spec
    spec = load_spec(name, quick=True)
    trials = expand(spec)
    res = tmp_path / "res"
    r = run_cli("sweep", name, "--quick", "--results", res, env=dict(VARBENCH_CACHE=cache))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = load_results(str(res))
    sid = df["sweep_id"].iloc[0]
    assert sorted(df["trial_key"]) == sorted(t.key(sid) for t in trials)          # every trial, once
    assert (df["samples"] == spec["samples"]).all() and df["sweep_quick"].all()
    for _, row in df.iterrows():
        assert math.isfinite(row["fid"]) and row["fid_ci_low"] <= row["fid"] <= row["fid_ci_high"], row["trial_key"]
        assert row["macs_fvcore"] > 0 and abs(row["macs_fvcore_over_analytic"] - 1) <= 0.02, row["trial_key"]
    for model, g in df.groupby("model"):
        dense = g[g["method"] == "dense"]
        assert len(dense) == 1, model
        for _, row in g[g["method"] != "dense"].iterrows():
            # every method changes the computation (a DMoE point may cost more than dense: its router), except a
            # FLOP-matched twin whose target was out of reach (the unpruned model)
            if not row.get("match_clamped"):
                assert row["macs_analytic_all"] != dense["macs_analytic_all"].iloc[0], row["trial_key"]
            assert 0 <= row["fidelity_token_agreement"] <= 1
    by_point = {k.split("/", 1)[1]: row for k, row in zip(df["trial_key"], df.to_dict("records"))}
    for t in trials:
        if t.parent and t.from_parent.get("match_macs"):
            parent, twin = by_point[t.parent], by_point[t.point_id]
            assert twin["param_match_macs"] == parent["macs_analytic_all"]
            if twin.get("match_clamped"):                 # the parent costs more than dense: the twin is unpruned
                assert twin["prune_fraction_effective"] == 0 and twin["match_gap_macs"] < 0
                continue
            assert abs(twin["macs_analytic_all"] - parent["macs_analytic_all"]) <= 0.05 * parent["macs_analytic_all"]
