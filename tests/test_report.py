"""Reports from a synthetic results table (contract columns), built in the test: every expected file exists and is
non-empty, the Pareto front is the right one, and bad input is one line with exit status 2."""
import json
import os
import re

import numpy as np
import pytest

from tests.conftest import run_cli

S = 7                       # scales of the embedded default
DENSE_MACS = 1.0e9


def _row(sweep, sid, point, method, macs, fid, *, model="shapes-d4", depth=4, parent="", twin="", entry=None,
         ips=10.0, params=None, extra=None, quick=False):
    params = params or {}
    row = dict(run_id=f"r-{sid}-{point}".replace("/", "_"), sweep=sweep, sweep_id=sid, trial_key=f"{sid}/{point}",
               method=method, method_kind="weight", method_label=f"{method} {json.dumps(params, sort_keys=True)}",
               method_config=json.dumps(params), model=model, model_id=model + "-abc", model_depth=depth,
               model_source="embedded", samples=64, seed=0, seed_scheme="s", batch_size=16, cfg=1.5, top_k=0,
               top_p=0.0, more_smooth=False, device="cpu", macs_fvcore=macs, macs_analytic=macs,
               macs_analytic_all=macs, macs_analytic_per_scale=[macs / S] * S, macs_decoder=1e8,
               time_median_s=16 / ips, time_p10_s=16 / ips, time_p90_s=16 / ips, images_per_s=ips,
               time_per_scale_median_s=[0.1] * S, fid=fid, fid_ci_low=fid * 0.9, fid_ci_high=fid * 1.1,
               isc_mean=5.0, isc_std=0.1, extractor="var-bench-classifier@1234", reference="shapes:val",
               reference_count=1000, env_device_name="Test CPU", env_threads=2, env_host="h",
               started_at=f"2026-01-01T00:00:{len(point) % 60:02d}+00:00", sweep_point=point, sweep_parent=parent,
               sweep_twin=twin, sweep_entry=entry or method, sweep_quick=quick)
    for k, v in params.items():
        row[f"param_{k}"] = json.dumps(v) if isinstance(v, list) else v
    row.update(extra or {})
    return row


def dmoe_extra(tau, E=16):
    active = [None] * 4 + [E * tau, E * tau * 0.7, E * tau * 0.5]
    maps = {str(si): [[[round(E * tau * ((r + c) % 3) / 3, 3) for c in range(p)] for r in range(p)]
                      for _ in range(2)] for si, p in ((4, 5), (5, 6), (6, 8))}
    return dict(num_experts=E, active_experts_per_scale=active,
                expert_maps=json.dumps(dict(samples=2, value="active experts", maps=maps)))


# the tau sweep: (tau, GMACs, FID); the Pareto front (cost, FID minimised) is known by construction
TAU_POINTS = [(1.0, 0.95, 10.0), (0.8, 0.80, 10.2), (0.6, 0.70, 11.0), (0.4, 0.60, 14.0)]
TWIN_FIDS = [10.5, 11.5, 16.0, 25.0]   # static twins at the same MACs: all dominated


def synthetic_rows():
    rows = [_row("tau", "tau-1", "m/dense", "dense", DENSE_MACS, 9.9)]
    for (tau, g, fid), tf in zip(TAU_POINTS, TWIN_FIDS):
        p = f"m/dmoe/tau={tau}"
        params = dict(tau=tau, moe_scales=[4, 5, 6], expert_size=32)
        rows.append(_row("tau", "tau-1", p, "dmoe", g * 1e9, fid, params=params, extra=dmoe_extra(tau)))
        rows.append(_row("tau", "tau-1", p + "/static", "pruned-ffn", g * 1e9, tf, parent=p, twin="static",
                         entry="dmoe", params=dict(match_macs=g * 1e9, scales=[4, 5, 6]),
                         extra=dict(prune_fraction_effective=0.3)))
    # an older quick invocation of the same sweep must not be drawn
    rows.append(_row("tau", "tau-0", "m/dense", "dense", DENSE_MACS, 1.0, quick=True))
    # expert sizes (fig. 8a)
    rows.append(_row("experts", "ex-1", "m/dense", "dense", DENSE_MACS, 9.9))
    for e, fid in ((8, 9.9), (32, 10.1), (128, 10.6)):
        rows.append(_row("experts", "ex-1", f"m/dmoe/expert_size={e}", "dmoe", 0.8e9, fid,
                         params=dict(tau=0.8, expert_size=e, moe_scales=[4, 5, 6]), extra=dmoe_extra(0.8, 512 // e)))
    # single-scale sensitivity (fig. 4) + ActVAR scales (table 6)
    rows.append(_row("scales", "sc-1", "m/dense", "dense", DENSE_MACS, 9.9))
    for s in (4, 5, 6):
        for tau in (0.8, 0.5):
            rows.append(_row("scales", "sc-1", f"m/single/moe_scales=[{s}],tau={tau}", "dmoe", (0.9 - 0.1 * (6 - s)
                             * tau) * 1e9, 10 + s * tau, params=dict(tau=tau, moe_scales=[s], expert_size=32)))
    for sc, fid in (([3, 4], 10.8), ([5, 6], 10.4)):
        rows.append(_row("scales", "sc-1", f"m/actvar/scales={sc}", "actvar", 0.85e9, fid,
                         params=dict(scales=sc, token_rate=0.75, weight_rate=0.75)))
    # depth (fig. 5)
    for model, depth, scale in (("shapes-d4", 4, 1.0), ("shapes-d6", 6, 1.5)):
        rows.append(_row("depth", "dp-1", f"{model}/dense", "dense", DENSE_MACS * scale, 9.0, model=model,
                         depth=depth))
        for tau, rel, fid in ((0.9, 0.9, 9.2), (0.7, 0.75, 9.8)):
            rows.append(_row("depth", "dp-1", f"{model}/dmoe/tau={tau}", "dmoe", DENSE_MACS * scale * rel, fid,
                             model=model, depth=depth, params=dict(tau=tau, moe_scales=[4, 5, 6], expert_size=32)))
    # ActVAR tables 2-5
    rows.append(_row("activation", "ac-1", "m/dense", "dense", DENSE_MACS, 9.9))
    for tr, wr, g, fid in (([0.5, 0.25], 0.5, 0.57, 13.0), ([0.75, 0.75], 0.75, 0.79, 10.5)):
        rows.append(_row("activation", "ac-1", f"m/rates/token_rate={tr},weight_rate={wr}", "actvar", g * 1e9, fid,
                         params=dict(token_rate=tr, weight_rate=wr, scales=[5, 6], steps2=300), entry="rates"))
    rows.append(_row("activation", "ac-1", "m/stage1", "actvar", 0.79e9, 11.5,
                     params=dict(token_rate=0.75, weight_rate=0.75, scales=[5, 6], steps2=0), entry="stage1"))
    rows.append(_row("activation", "ac-1", "m/wo_dw", "actvar-tokens", 0.86e9, 10.3,
                     params=dict(token_rate=0.75, steps2=0)))
    rows.append(_row("activation", "ac-1", "m/wo_at", "actvar-experts", 0.9e9, 10.2,
                     params=dict(weight_rate=0.75, steps2=0)))
    rows.append(_row("activation", "ac-1", "m/fixed", "fixed-tokens", 0.86e9, 12.0,
                     params=dict(token_rate=0.75, criterion="norm")))
    rows.append(_row("activation", "ac-1", "m/static", "pruned-ffn", 0.9e9, 11.0, params=dict(fraction=0.25),
                     extra=dict(prune_fraction_effective=0.25)))
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from bench.results import append_row
    d = str(tmp_path_factory.mktemp("store"))
    for r in synthetic_rows():
        append_row(d, r)
    return d


def test_pareto_front_known_points():
    from reports.data import pareto_front
    xs = [1.0, 0.8, 0.7, 0.6, 0.95, 0.8, 0.7, None, 0.5]
    ys = [9.9, 10.2, 11.0, 14.0, 10.0, 11.5, 16.0, 1.0, float("nan")]
    # 0.95/10.0 is dominated by nothing cheaper with lower FID? 0.8/10.2 is cheaper but worse -> 0.95 on the front;
    # 1.0/9.9 is the best FID -> on the front; 0.8/11.5 and 0.7/16.0 are dominated; None and NaN never count
    assert pareto_front(xs, ys) == [True, True, True, True, True, False, False, False, False]
    assert pareto_front([1, 1, 2], [5, 5, 4]) == [True, False, True]      # exact duplicates: the first one
    assert pareto_front([1, 2], [5, 5]) == [True, False]                  # equal FID at higher cost: dominated


EXPECTED = {
    "tau": ["pareto_fid_vs_flops", "pareto_fid_vs_time", "dynamic_vs_static_plot", "tau_tradeoff",
            "active_experts_per_scale", "expert_maps_by_tau", "expert_maps_samples"],
    "experts": ["pareto_fid_vs_flops", "expert_size"],
    "scales": ["pareto_fid_vs_flops", "scale_sensitivity"],
    "depth": ["pareto_fid_vs_flops", "depth"],
    "activation": ["pareto_fid_vs_flops"],
    "all": ["pareto_fid_vs_flops", "pareto_fid_vs_time"],
}
TABLES = {"tau": ["pareto_front", "dynamic_vs_static"], "scales": ["actvar_scales"],
          "activation": ["actvar_activation_rates", "actvar_components", "actvar_tokens_vs_fixed",
                         "actvar_weights_vs_static", "pareto_front"], "all": ["pareto_front"]}


@pytest.fixture(scope="module")
def report_out(store, tmp_path_factory):
    """`python -m bench report` over the whole synthetic store, once for the tests below."""
    out = str(tmp_path_factory.mktemp("report") / "out")
    r = run_cli("report", "--results", store, "--out", out)
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def test_report_writes_every_expected_file(report_out):
    out, log = report_out
    # the synthetic store holds every shipped sweep but the field ranking and the claims (their own tests build them)
    assert re.search(r"no rows yet of the shipped sweeps (claims, )?field \(", log), log
    for sweep, stems in EXPECTED.items():
        for stem in stems:
            for ext in ("png", "pdf", "md"):
                p = os.path.join(out, sweep, f"{stem}.{ext}")
                assert os.path.isfile(p) and os.path.getsize(p) > 0, p
        assert os.path.getsize(os.path.join(out, sweep, "README.md")) > 0
    for sweep, stems in TABLES.items():
        for stem in stems:
            for ext in ("md", "tex"):
                p = os.path.join(out, sweep, f"{stem}.{ext}")
                assert os.path.isfile(p) and os.path.getsize(p) > 0, p
    # PNGs are real images at paper size (3.3 in at 300 dpi ~ 1000 px wide, not a blank placeholder)
    from PIL import Image
    im = Image.open(os.path.join(out, "tau", "pareto_fid_vs_flops.png"))
    assert 700 < im.size[0] < 1400 and len(np.unique(np.asarray(im.convert("L")))) > 10
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".tmp")]
    # captions refer to the report's methods note, which names sample count, model and machine
    cap = open(os.path.join(out, "tau", "pareto_fid_vs_flops.md")).read()
    assert "Protocol: methods.md" in cap and "Test CPU" not in cap
    methods = open(os.path.join(out, "tau", "methods.md")).read()
    assert "64 samples" in methods and "shapes-d4" in methods and "Test CPU" in methods


def test_captions_count_the_runs_a_figure_shows(report_out):
    """A figure or table drawing part of a sweep's rows states how many of them it shows, and its facts are
    theirs; one drawing every row states the sweep's count alone."""
    out = report_out[0]

    def cap(stem):
        return open(os.path.join(out, "tau", f"{stem}.md")).read()
    assert "9 runs." in cap("pareto_fid_vs_flops") and "Shows" not in cap("pareto_fid_vs_flops")
    assert "9 runs." in cap("dynamic_vs_static_plot")          # 4 pairs and dense: every row
    assert "Shows 5 of the 9 runs." in cap("tau_tradeoff")       # 4 DMoE points and dense
    assert "Shows 5 of the 9 runs." in cap("pareto_front")       # the front, dense listed
    assert "Shows 8 of the 9 runs." in cap("dynamic_vs_static")  # the 4 pairs
    assert "Shows 4 of the 9 runs." in cap("expert_maps_by_tau")
    assert "Shows 1 of the 9 runs." in cap("expert_maps_samples")
    act = open(os.path.join(out, "activation", "actvar_components.md")).read()
    assert " of the 8 runs." in act


def test_front_table_lists_the_known_front(store, report_out, tmp_path):
    from reports import build_reports
    one = str(tmp_path / "one")
    build_reports(store, "tau", one)
    assert sorted(os.listdir(one)) == ["tau"]          # one sweep asked: one directory
    out = report_out[0]
    md = open(os.path.join(out, "tau", "pareto_front.md")).read()
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and "GMACs" not in ln]
    on_front = {ln.split("|")[3].strip() for ln in lines if ln.rstrip(" |").endswith("yes")}
    # dense (1.0, 9.9) and every DMoE point; the twins and the quick run's dense (FID 1.0) are not in it
    assert on_front == {"1", "0.95", "0.8", "0.7", "0.6"}
    assert len(lines) == 5
    tex = open(os.path.join(out, "tau", "pareto_front.tex")).read()
    assert "\\begin{tabular}" in tex and "\\toprule" in tex and "0.95" in tex
    twins = open(os.path.join(out, "tau", "dynamic_vs_static.md")).read()
    assert twins.count("\n| ") == 4 and "+11" in twins            # 4 pairs; ΔFID of τ=0.4: 25 - 14


def test_actvar_tables_content(report_out):
    out = report_out[0]
    t2 = open(os.path.join(out, "activation", "actvar_activation_rates.md")).read()
    assert "(50%, 25%; 50%)" in t2 and "(75%, 75%; 75%)" in t2 and "43.0%" in t2 and "21.0%" in t2
    t3 = open(os.path.join(out, "activation", "actvar_components.md")).read()
    assert t3.index("w/o DW") < t3.index("w/o AT") < t3.index("w/ DW & AT")
    assert "| w/o DW | (75%, 75%; 100%) | stage 1 only |" in t3 and "stages 1+2" in t3
    t5 = open(os.path.join(out, "activation", "actvar_weights_vs_static.md")).read()
    assert "Static weight pruning | 75%" in t5


def test_report_bad_input(store, tmp_path):
    out = tmp_path / "out"
    r = run_cli("report", "--results", store, "--out", str(out), "--sweep", "nope")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "valid:" in r.stderr and "tau" in r.stderr and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("report", "--results", str(empty), "--out", str(out))
    assert r.returncode == 2 and "no rows" in r.stderr and not out.exists()


def test_report_missing_columns_are_reported(tmp_path):
    """A store with only dense rows and no FID: no crash, the skipped figures are named."""
    from bench.results import append_row
    d = str(tmp_path / "s")
    row = _row("tau", "t-1", "m/dense", "dense", DENSE_MACS, 1.0)
    for k in ("fid", "fid_ci_low", "fid_ci_high"):
        row.pop(k)
    append_row(d, row)
    r = run_cli("report", "--results", d, "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "pareto" in r.stderr and "no FID values" in r.stderr        # the log (stderr)


# the index order of the shipped reports; the first five are also drawn over every sweep (OUT/all/)
SHIPPED_REPORTS = ["paired", "paired_table", "pareto", "field", "front", "twins", "tau", "active_experts", "expert_maps",
                   "expert_size", "scale_sensitivity", "depth", "activation_rates", "components", "tokens_vs_fixed",
                   "weights_vs_static", "actvar_scales"]


def test_report_registry_order_and_a_registered_figure_is_drawn(store, tmp_path):
    """Adding a figure is one decorated function: it is run and listed in the index with no other edit."""
    from reports import build_reports
    from reports.registry import list_reports, register_report, unregister_report
    from reports.style import write_text
    names = [r.name for r in list_reports()]
    assert [n for n in names if n in SHIPPED_REPORTS] == SHIPPED_REPORTS
    assert [r.name for r in list_reports(overview=True)] == SHIPPED_REPORTS[:5]
    with pytest.raises(RuntimeError, match="registered twice"):
        register_report("paired", "a second paired figure", order=1)(lambda ctx: [])
    assert [r.name for r in list_reports()] == names

    def test_extra(ctx):
        return [write_text(os.path.join(ctx.out_dir, "test_extra.md"), f"rows: {len(ctx.df)}\n")]

    register_report("test_extra", "a test figure", order=999)(test_extra)
    try:
        assert list_reports()[-1].name == "test_extra"
        out = str(tmp_path / "out")
        written, _ = build_reports(store, "tau", out)
        extra = os.path.join(out, "tau", "test_extra.md")
        assert extra in written and open(extra).read() == "rows: 9\n"     # dense + 4 DMoE points + 4 twins
        index = open(os.path.join(out, "tau", "README.md")).read()
        assert "- test_extra.md" in index.split("## Files")[1]
    finally:
        unregister_report("test_extra")
    assert "test_extra" not in [r.name for r in list_reports()]


# ---------------------------------------------------------------------------------------------- paired terms
def _paired(row, sp, dq, noisy=False):
    row.update(speedup=sp[0], speedup_ci_low=sp[1], speedup_ci_high=sp[2], fid_delta=dq[0], fid_delta_ci_low=dq[1],
               fid_delta_ci_high=dq[2], timing_noisy=noisy, timing_rounds=6, macs_ratio=1.0, fid_delta_pct=0.0)
    return row


# (speedup, its interval), (ΔFID, its interval) -> the status the rule must give
PAIRED_POINTS = {
    "m/a": ((1.50, 1.40, 1.60), (-1.0, -2.0, 0.3), "front"),           # separated from c on both axes
    "m/b": ((1.20, 1.00, 1.45), (-2.5, -6.0, 1.0), "front"),           # best ΔFID estimate: on the front
    "m/c": ((1.10, 1.05, 1.15), (1.0, 0.5, 1.5), "dominated"),         # a beats it on both, intervals apart
    "m/d": ((1.30, 1.10, 1.70), (0.0, -1.5, 2.5), "not resolved"),     # a is better, but the intervals overlap
}


def test_paired_status_compares_within_a_dense_baseline_and_lists_incomplete_rows(tmp_path):
    """Two models in one sweep run: each is paired against its own dense, so neither's points can dominate the
    other's; identical points get the same status; a row without a paired interval is listed as incomplete (not
    dropped) and the caption counts it; a run without a paired speedup is named as not drawn on the time axis."""
    import pandas as pd
    from bench.results import append_row
    from reports import build_reports
    from reports.quality_vector import resolution
    rows = []
    for model, sp, dq in (("d4", (1.50, 1.45, 1.55), (0.2, 0.1, 0.3)), ("d6", (1.20, 1.15, 1.25), (0.9, 0.8, 1.0))):
        rows.append(_paired(_row("mm", "mm-1", f"{model}/dense", "dense", DENSE_MACS, 10.0, model=model),
                            (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
        rows.append(_paired(_row("mm", "mm-1", f"{model}/dmoe", "dmoe", 0.8e9, 10.5, model=model), sp, dq))
    rows.append(_paired(_row("mm", "mm-1", "d4/dmoe-again", "dmoe", 0.8e9, 10.5, model="d4"),
                        (1.50, 1.45, 1.55), (0.2, 0.1, 0.3)))              # the same point as d4/dmoe
    assert resolution(pd.DataFrame(rows)) == ["front", "front", "front", "front", "front"]
    rows.append(_paired(_row("mm", "mm-1", "d4/no-interval", "dmoe", 0.9e9, 10.4, model="d4"),
                        (1.1, 1.0, 1.2), (0.1, None, None)))
    rows.append(_row("mm", "mm-1", "d4/unpaired", "pruned-ffn", 0.9e9, 10.6, model="d4"))
    assert resolution(pd.DataFrame(rows))[-2:] == [None, None]
    d, out = str(tmp_path / "s"), str(tmp_path / "out")
    for r in rows:
        append_row(d, r)
    build_reports(d, "mm", out)
    table = open(os.path.join(out, "mm", "paired_summary.md")).read()
    assert table.count("| front |") == 5 and table.count("| incomplete |") == 2
    assert "5 of the 7 runs have every paired value and interval" in table
    index = open(os.path.join(out, "mm", "README.md")).read()
    assert "pareto_fid_vs_time: 1 run(s) without a paired speedup not drawn" in index
    assert "1 run(s) without a paired speedup are not drawn" in open(os.path.join(out, "mm",
                                                                                 "pareto_fid_vs_time.md")).read()
    tex = open(os.path.join(out, "mm", "paired_summary.tex")).read()
    assert "√" not in tex and "Δ" not in tex and r"$\surd$" in tex


def test_paired_figure_survives_an_estimate_outside_its_interval(tmp_path):
    """A bootstrap interval need not contain its estimate (few rounds, skewed resamples): drawn, not a crash."""
    from bench.results import append_row
    from reports import build_reports
    d = str(tmp_path / "s")
    append_row(d, _paired(_row("odd", "odd-1", "m/dense", "dense", DENSE_MACS, 10.0), (1.0, 1.0, 1.0), (0, 0, 0)))
    append_row(d, _paired(_row("odd", "odd-1", "m/dmoe", "dmoe", 0.8e9, 10.5), (1.30, 1.31, 1.40), (0.5, 0.6, 0.9)))
    build_reports(d, "odd", str(tmp_path / "out"))
    assert os.path.getsize(tmp_path / "out" / "odd" / "paired_tradeoff.png") > 0


def test_latex_escaping_is_one_pass():
    from reports.style import _tex_escape
    assert _tex_escape("a\\b {x}") == r"a\textbackslash{}b \{x\}"
    assert _tex_escape("50% of τ_1 × 2") == r"50\% of $\tau$\_1 $\times$ 2"


def test_paired_report_marks_what_is_resolved_and_warns(tmp_path):
    from bench.results import append_row
    from bench.sweep import write_manifest
    from reports import build_reports
    from reports.quality_vector import resolution
    d = str(tmp_path / "s")
    rows = [_paired(_row("pr", "pr-1", "m/dense", "dense", DENSE_MACS, 10.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))]
    for point, (sp, dq, _) in PAIRED_POINTS.items():
        rows.append(_paired(_row("pr", "pr-1", point, "dmoe", 0.8e9, 10.0 + dq[0], params=dict(tau=0.5)), sp, dq,
                            noisy=point == "m/d"))
    for r in rows:
        append_row(d, r)
    import pandas as pd
    got = resolution(pd.DataFrame(rows))
    # dense (1, 0): a's estimates beat it, but a's ΔFID interval reaches above 0: not resolved
    assert got == ["not resolved"] + [v[2] for v in PAIRED_POINTS.values()]
    # complete, quiet-but-one store: the noisy row is named; then the manifest lists one trial more
    out = str(tmp_path / "out")
    build_reports(d, "pr", out)
    index = open(os.path.join(out, "pr", "README.md")).read()
    assert "1 of 5 rows timed on a noisy machine" in index and "m/d" in index and "incomplete" not in index
    table = open(os.path.join(out, "pr", "paired_summary.md")).read()
    for point, (sp, dq, status) in PAIRED_POINTS.items():
        line = next(ln for ln in table.splitlines() if f"{sp[0]:.3f}x [{sp[1]:.3f}, {sp[2]:.3f}]" in ln)
        assert f"| {status} |" in line, (point, line)
    assert os.path.getsize(os.path.join(out, "pr", "paired_tradeoff.png")) > 0
    write_manifest(d, dict(sweep="pr", sweep_id="pr-1", created_at="2026-01-01T00:00:00+00:00",
                           trials=[dict(key=f"pr-1/{i}") for i in range(6)]))
    build_reports(d, "pr", out)
    index = open(os.path.join(out, "pr", "README.md")).read()
    assert index.index("WARNING:** incomplete sweep: its manifest lists 6 trials, 5 have rows") < index.index("##")
    for stem in ("paired_tradeoff", "paired_summary", "pareto_fid_vs_flops"):
        assert "WARNING: incomplete sweep" in open(os.path.join(out, "pr", f"{stem}.md")).read(), stem
    methods = open(os.path.join(out, "pr", "methods.md")).read()       # the protocol, once per report
    assert "64 samples" in methods and "ABBA" in methods and "paired class-stratified bootstrap" in methods
    assert "incomplete sweep: its manifest lists 6 trials" in methods


def test_noisy_plain_runs_are_named_by_their_run_id():
    """Plain `bench run` rows have no sweep point: the noisy-timing warning names them by run id, not 'None'."""
    import pandas as pd
    from reports.data import run_warnings
    df = pd.DataFrame([dict(run_id="run-a", sweep_point=None, timing_noisy=True, speedup=1.1),
                       dict(run_id="run-b", sweep_point="default/dmoe", timing_noisy=True, speedup=1.0)])
    warning = next(w for w in run_warnings(df) if "noisy" in w)
    assert "run-a, default/dmoe" in warning and "None" not in warning
