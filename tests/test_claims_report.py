"""The quality vector, the claims page and the resolved/unresolved marking, on hand-made rows (nothing is generated):
each rule gives each of its words, a point a measure off the ΔFID axis calls worse is off the front and the output
says which measure decided, the claims page states a verdict per claim, and the figures draw without error."""
import os

import pandas as pd
import pytest

from reports import quality_vector as Q
from reports.context import Context, Skip

DENSE_FID = 10.0          # 1% of it: a band of 0.1 FID


def _row(entry, method, delta, lo, hi, *, model="shapes-d4", twin="", ratio=0.8, dense_fid=DENSE_FID, acc=None,
         resolved=None, sweep="claims", extra=None):
    """One measured point of a sweep: cost, paired ΔFID (and Δ class accuracy `acc` = (value, low, high)), samples."""
    point = f"{model}/{entry}" + (f"/{twin}" if twin else "")
    row = dict(sweep=sweep, sweep_id=f"{sweep}-1", trial_key=f"{sweep}-1/{point}", sweep_point=point,
               sweep_entry=entry, sweep_twin=twin, sweep_parent="", model=model, method=method,
               method_label=f"{method} ({entry})", macs_ratio=ratio, macs_analytic_all=ratio * 1e9,
               fid=dense_fid + delta, fid_ci_low=dense_fid + delta - 1, fid_ci_high=dense_fid + delta + 1,
               fid_delta=delta, fid_delta_ci_low=lo, fid_delta_ci_high=hi, fid_delta_pct=100 * delta / dense_fid,
               speedup=1.0 / ratio, speedup_ci_low=0.95 / ratio, speedup_ci_high=1.05 / ratio, timing_rounds=6,
               samples=10000, seed=0, batch_size=50, resolve_target_pct=1.0, resolved=resolved,
               resolve_stop_reason=None if resolved is None else ("halfwidth" if resolved else "max_samples"),
               resolve_level=0.9875)
    if acc is not None:
        row.update(class_accuracy_delta=acc[0], class_accuracy_delta_ci_low=acc[1], class_accuracy_delta_ci_high=acc[2])
    row.update(extra or {})
    return row


def _dense(model="shapes-d4", dense_fid=DENSE_FID, sweep="claims"):
    return _row("dense", "dense", 0.0, 0.0, 0.0, model=model, ratio=1.0, dense_fid=dense_fid, acc=(0.0, 0.0, 0.0),
                sweep=sweep)


# ---------------------------------------------------------------------------------------------- the quality vector
def test_quality_call_names_the_measure_that_decides():
    assert Q.measure_call(0.1, 0.3, lower_is_better=True) == Q.WORSE
    assert Q.measure_call(-0.3, -0.1, lower_is_better=True) == Q.BETTER
    assert Q.measure_call(-0.3, -0.1, lower_is_better=False) == Q.WORSE
    assert Q.measure_call(-0.1, 0.1, lower_is_better=False) == Q.UNRESOLVED
    assert Q.measure_call(None, 0.1, lower_is_better=False) is None

    mixed = Q.quality_call(dict(fid_delta_ci_low=-0.5, fid_delta_ci_high=-0.2, class_accuracy_delta_ci_low=-0.04,
                                class_accuracy_delta_ci_high=-0.01, recall_delta_ci_low=-0.01,
                                recall_delta_ci_high=0.02))
    assert mixed.calls == {"ΔFID": Q.BETTER, "class accuracy": Q.WORSE, "precision": None, "recall": Q.UNRESOLVED}
    assert not mixed.admissible() and not mixed.admissible(Q.FRONT_AXES)
    assert mixed.reason(Q.FRONT_AXES) == "ΔFID resolved better but class accuracy resolved worse"
    # a loss on the front's own axis is visible there: it bars a better-than-dense call, not a place on the front
    fid_worse = Q.quality_call(dict(fid_delta_ci_low=0.2, fid_delta_ci_high=0.5, precision_delta_ci_low=0.01,
                                    precision_delta_ci_high=0.03))
    assert not fid_worse.admissible() and fid_worse.admissible(Q.FRONT_AXES)
    assert fid_worse.reason() == "precision resolved better but ΔFID resolved worse"
    older = Q.quality_call(dict(fid_delta_ci_low=None))            # rows from before the vector: nothing excluded
    assert older.admissible() and older.summary == "none resolved"


def _front_rows():
    """dense, a cheap point with the best ΔFID whose class accuracy is resolved worse, and two honest points."""
    return pd.DataFrame([
        _dense(sweep="vec"),
        _row("cheat", "dmoe", -0.3, -0.5, -0.1, ratio=0.6, acc=(-0.03, -0.05, -0.01), sweep="vec", resolved=True),
        _row("honest", "pruned-ffn", 0.2, 0.1, 0.3, ratio=0.7, acc=(-0.005, -0.02, 0.01), sweep="vec",
             resolved=True),
        _row("slow", "actvar", 0.4, -0.1, 0.9, ratio=0.9, acc=(0.0, -0.01, 0.01), sweep="vec", resolved=False),
    ])


def test_a_point_a_measure_calls_worse_is_off_the_front_and_the_output_says_why(tmp_path):
    from reports.quality_vector import resolution
    from reports.paired import paired_table
    from reports.pareto import front_table, pareto_figures
    df = _front_rows()
    calls = Q.quality_calls(df)
    front, excluded = Q.admissible_front([1.0, 0.6, 0.7, 0.9], df["fid"].tolist(), calls)
    # by the estimates alone "cheat" is on the front (cheapest, lowest FID) and would push "honest" off it
    assert front == [True, False, True, False]
    assert excluded == {1: "ΔFID resolved better but class accuracy resolved worse"}
    assert resolution(df)[1] == "excluded" and resolution(df)[2] == "front"
    ctx = Context(df, str(tmp_path))
    front_table(ctx)
    md = open(tmp_path / "pareto_front.md").read()
    cheat = next(ln for ln in md.splitlines() if "(cheat)" in ln)
    assert cheat.endswith("| no: ΔFID resolved better but class accuracy resolved worse |")
    assert "Δ class accuracy [CI]" in md and "-0.030 [-0.050, -0.010]" in cheat   # the vector beside ΔFID
    pareto_figures(ctx)
    cap = open(tmp_path / "pareto_fid_vs_flops.md").read()
    assert "Excluded by the quality vector: shapes-d4/cheat (ΔFID resolved better but class accuracy resolved " \
           "worse)" in cap
    paired_table(ctx)
    table = open(tmp_path / "paired_summary.md").read()
    assert "| excluded: ΔFID resolved better but class accuracy resolved worse |" in table
    assert "98.75% per look" in table                     # the rows' intervals are not 95%


# ---------------------------------------------------------------------------------------------- the rules
def _point(delta, lo, hi, *, ratio=0.8, dense=DENSE_FID, acc=None, name="p"):
    from reports.claims import Point
    values = dict(fid_delta_ci_low=lo, fid_delta_ci_high=hi)
    if acc:
        values.update(class_accuracy_delta_ci_low=acc[0], class_accuracy_delta_ci_high=acc[1])
    return Point(name, delta, lo, hi, dense, ratio, 1000, None, 95.0, Q.quality_call(values))


def test_each_rule_gives_each_word():
    from reports import claims as C
    one = C.Claim("k", "paper", "stated", ("a",), "within")
    # within ±1% of dense FID (0.1), other measures guarded
    assert C.within_band(one, _point(0.0, -0.05, 0.08)).word == C.REPRODUCED
    assert C.within_band(one, _point(0.3, 0.2, 0.4)) == (C.REFUTED, "ΔFID interval wholly above +1% of dense FID: "
                                                                   "worse")
    assert "better than dense" in C.within_band(one, _point(-0.3, -0.4, -0.2)).because
    assert C.within_band(one, _point(-0.3, -0.4, -0.2)).word == C.REFUTED
    guarded = C.within_band(one, _point(0.0, -0.05, 0.08, acc=(-0.02, -0.01)))
    assert guarded.word == C.REFUTED and guarded.because.startswith("class accuracy resolved worse")
    assert C.within_band(one, _point(0.05, -0.05, 0.15)).word == C.NOT_RESOLVED
    assert C.within_band(one, _point(0.05, None, None)).word == C.NOT_RESOLVED
    # small loss: upper bound within +1%
    assert C.small_loss(one, _point(0.0, -0.3, 0.1)).word == C.REPRODUCED
    assert C.small_loss(one, _point(0.3, 0.11, 0.5)).word == C.REFUTED
    assert C.small_loss(one, _point(0.1, 0.05, 0.15)).word == C.NOT_RESOLVED
    # a below b
    assert C.lower_than(one, _point(0, -0.1, 0.1), _point(0.5, 0.2, 0.8)).word == C.REPRODUCED
    assert C.lower_than(one, _point(0.5, 0.2, 0.8), _point(0, -0.1, 0.1)).word == C.REFUTED
    assert C.lower_than(one, _point(0.1, -0.1, 0.3), _point(0.2, 0.2, 0.8)).word == C.NOT_RESOLVED
    # deeper saves more (d6 band: 1% of its dense FID 12 = 0.12)
    d4 = _point(0.0, -0.1, 0.1, ratio=0.8)
    assert C.deeper_saves_more(one, _point(0.0, -0.1, 0.12, ratio=0.7, dense=12), d4).word == C.REPRODUCED
    assert C.deeper_saves_more(one, _point(0.0, -0.1, 0.1, ratio=0.8, dense=12), d4).word == C.REFUTED   # equal
    assert C.deeper_saves_more(one, _point(0.3, 0.13, 0.5, ratio=0.7, dense=12), d4).word == C.REFUTED
    assert C.deeper_saves_more(one, _point(0.1, 0.0, 0.2, ratio=0.7, dense=12), d4).word == C.NOT_RESOLVED
    # the dispatcher: a missing point is "not run"
    two = C.Claim("k2", "paper", "stated", ("a", "b"), "lower")
    assert C.claim_verdict(two, {"a": d4}) == (C.NOT_RUN, "no row of b")
    assert C.claim_verdict(two, {"a": _point(0, -0.1, 0.1), "b": _point(0.5, 0.2, 0.8)}).word == C.REPRODUCED
    assert set(C.RULES) == {c.rule for c in C.CLAIMS}      # every rule is used, every claim's rule exists


# the claims sweep, hand-made: entry -> (row, the verdict its claim must get); skipvar and cfg_skip have no rows
D6_FID = 12.0
CLAIM_ROWS = [
    (_dense(), None), (_dense("shapes-d6", D6_FID), None),
    (_row("relu", "dmoe", 0.02, -0.05, 0.08, ratio=1.0), ("relu", "reproduced")),
    (_row("dmoe", "dmoe", 0.03, -0.06, 0.09, ratio=0.816, acc=(0.0, -0.01, 0.01), resolved=True),
     ("dmoe_within_1pct", "reproduced")),
    (_row("dmoe", "pruned-ffn", 0.5, 0.3, 0.7, twin="static", ratio=0.816), ("dmoe_dynamic_vs_static", "reproduced")),
    (_row("late", "dmoe", 0.2, 0.1, 0.3, ratio=0.85), ("dmoe_last_scales", "not resolved")),
    (_row("early", "dmoe", 0.25, 0.05, 0.45, ratio=0.84), None),
    (_row("deeper", "dmoe", 0.5, 0.3, 0.7, model="shapes-d6", ratio=0.75, dense_fid=D6_FID),
     ("dmoe_deeper", "refuted")),
    # +3% [+2, +4]: refuted within 1%, reproduced within the paper's own +5.8% (ActVAR's 'small loss')
    (_row("actvar", "actvar", 0.3, 0.2, 0.4, ratio=0.79), ("actvar", "reproduced")),
    (_row("actvar_stage1", "actvar", 0.4, 0.05, 0.75, ratio=0.79), ("actvar_stage1", "not resolved")),
    # ΔFID within +1% but class accuracy resolved worse: the verdict follows the quality vector (issue 22, item 6)
    (_row("fastvar", "fastvar", 0.05, -0.02, 0.09, ratio=0.71, acc=(-0.02, -0.03, -0.01)), ("fastvar", "refuted")),
    (_row("fixed_tokens", "fixed-tokens", 1.0, 0.5, 1.5, ratio=0.8), ("fixed_tokens", "refuted")),
]
NOT_RUN = ("skipvar", "cfg_skip")


def test_claims_page_states_a_verdict_per_claim(tmp_path):
    from reports.claims import CLAIMS, HEADER, RULES, claims_page
    df = pd.DataFrame([r for r, _ in CLAIM_ROWS])
    files = claims_page(Context(df, str(tmp_path)))
    assert sorted(os.path.basename(f) for f in files) == ["claims.md", "claims.tex", "claims_points.md",
                                                          "claims_points.tex"]
    md = open(tmp_path / "claims.md").read()
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]]
             for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Claim")}
    assert set(lines) == {c.key for c in CLAIMS}
    verdict = HEADER.index("Verdict")
    expected = dict(v for _, v in CLAIM_ROWS if v) | {k: "not run" for k in NOT_RUN}
    assert {k: cells[verdict] for k, cells in lines.items()} == expected
    assert "class accuracy resolved worse" in lines["fastvar"][HEADER.index("Rule")]
    within = lines["dmoe_within_1pct"]
    assert within[HEADER.index("Ours: ΔFID [CI] (% of dense FID)")].startswith("+0.03 [-0.06, +0.09] (+0.3% "
                                                                                 "[-0.6, +0.9] of dense FID 10)")
    assert within[HEADER.index("N (stop)")] == "10,000 (halfwidth)" and within[HEADER.index("MACs saved")] == "18.4%"
    assert "inside ±1% of dense FID" in within[HEADER.index("Rule")]
    twins = lines["dmoe_dynamic_vs_static"]
    assert twins[HEADER.index("MACs saved")] == "shapes-d4/dmoe: 18.4%; shapes-d4/dmoe/static: 18.4%"
    assert "non-overlap of two intervals is conservative" in twins[HEADER.index("Rule")]
    scales = lines["dmoe_last_scales"][HEADER.index("MACs saved")]
    assert scales == "shapes-d4/late: 15.0%; shapes-d4/early: 16.0%"     # both MACs ratios stated
    assert "saves 25.0% against 18.4%, but its ΔFID lower bound +2.50% > +1%" in lines["dmoe_deeper"][-1]
    # the other measures are shown beside a ΔFID-only rule
    assert lines["fastvar"][HEADER.index("Other quality measures")].startswith("class accuracy resolved worse")
    assert "at 98.75%" in within[HEADER.index("Ours: ΔFID [CI] (% of dense FID)")]
    assert "## Rules" in md and md.count("\n- **") == len(RULES)
    tex = open(tmp_path / "claims.tex").read()
    assert tex.startswith("\\begin{table*}") and "p{3.0cm}" in tex and "\\label{tab:claims}" in tex
    assert "Δ" not in tex and "±" not in tex and " < " not in tex and "$<$ 1\\%" in tex
    points = open(tmp_path / "claims_points.md").read()
    assert points.count("\n| shapes-d") == len(CLAIM_ROWS)


def test_claims_page_only_for_the_claims_sweep(tmp_path):
    from reports.claims import claims_page
    with pytest.raises(Skip, match="no rows of the claims sweep"):
        claims_page(Context(pd.DataFrame([_dense(sweep="tau")]), str(tmp_path)))
    # older rows without the new columns: every claim is decided or 'not run', nothing raises
    old = [{k: v for k, v in r.items() if not k.startswith(("resolve", "class_acc", "samples"))}
           for r, _ in CLAIM_ROWS[:4]]
    claims_page(Context(pd.DataFrame(old), str(tmp_path)))
    assert "| not run |" in open(tmp_path / "claims.md").read()


# ---------------------------------------------------------------------------------------------- the marking
def test_resolved_flags_and_the_figures_mark_them(tmp_path, monkeypatch):
    from reports import style as S
    from reports.field import field
    from reports.paired import paired_tradeoff
    from reports.pareto import pareto_figures
    df = _front_rows()
    df.loc[3, "resolved"] = None            # not recorded: the same test on the row (0 inside, half-width 0.5 > 0.1)
    assert Q.resolved_flags(df) == [None, True, True, False]
    df.loc[3, "fid_delta_ci_high"] = 0.09   # half-width 0.095 <= 1% of dense FID: resolved
    assert Q.resolved_flags(df)[3] is True
    df.loc[3, "fid_delta_ci_high"] = 0.9
    figures = {}

    def keep(fig, out_dir, stem, caption):
        figures[stem] = [c for ax in fig.axes for c in ax.collections]
        return [stem]
    monkeypatch.setattr(S, "save_figure", keep)
    ctx = Context(df, str(tmp_path))
    pareto_figures(ctx)
    paired_tradeoff(ctx)
    df.loc[1:, "method"] = ["dmoe", "fastvar", "skipvar"]  # three families: the field figure applies
    field(Context(df, str(tmp_path)))
    for stem in ("pareto_fid_vs_flops", "paired_tradeoff", "field_pareto"):
        drawn = [c for c in figures[stem] if len(c.get_offsets())]
        hollow = [c for c in drawn if len(c.get_facecolor()) == 0 or c.get_facecolor()[0][3] == 0]
        assert hollow and len(hollow) < len(drawn), stem         # the unresolved point hollow, the others not
    legend = Q.resolved_legend(df)
    assert legend == ["ΔFID resolved (CI excludes 0 or half-width ≤ 1% of dense FID)", "ΔFID not resolved"]


def test_figures_draw_with_the_marking(tmp_path):
    """The same rows through the real writers: files on disk, captions saying what filled and hollow mean."""
    from reports.paired import paired_tradeoff, quality_vector_figure
    from reports.pareto import pareto_figures
    ctx = Context(_front_rows(), str(tmp_path))
    pareto_figures(ctx)
    paired_tradeoff(ctx)
    quality_vector_figure(ctx)
    for stem in ("pareto_fid_vs_flops", "paired_tradeoff", "quality_vector"):
        assert os.path.getsize(tmp_path / f"{stem}.png") > 0
    assert "Filled: ΔFID resolved; hollow: not." in open(tmp_path / "pareto_fid_vs_flops.md").read()
    assert "Filled: ΔFID resolved; hollow: not." in open(tmp_path / "paired_tradeoff.md").read()
    assert "Excluded by the quality vector: shapes-d4/cheat (ΔFID resolved better but class accuracy resolved " \
           "worse)" in open(tmp_path / "quality_vector.md").read()
    fid_only = _front_rows().drop(columns=[c for c in _front_rows().columns if c.startswith("class_accuracy")])
    with pytest.raises(Skip, match="at least one other paired quality measure"):
        quality_vector_figure(Context(fid_only, str(tmp_path)))


# ---------------------------------------------------------------------------------------------- per-sample ranking
def test_per_sample_ranking_orders_and_skips(tmp_path):
    from reports.per_sample import per_sample, ranking
    rows = [_dense(sweep="ps")]
    for entry, ssim, psnr, agree in (("a", (0.80, 0.78, 0.82), (20.0, 19.0, 21.0), 0.5),
                                     ("b", (0.95, 0.94, 0.96), (30.0, 29.0, 31.0), 0.9),
                                     ("c", (0.90, 0.85, 0.945), (None, None, None), 0.7)):
        rows.append(_row(entry, "fastvar", 0.1, -0.1, 0.3, sweep="ps", acc=(-0.01, -0.02, 0.0),
                         extra=dict(ssim_to_dense=ssim[0], ssim_to_dense_ci_low=ssim[1],
                                    ssim_to_dense_ci_high=ssim[2], fidelity_psnr_db=psnr[0],
                                    psnr_to_dense_ci_low=psnr[1], psnr_to_dense_ci_high=psnr[2],
                                    fidelity_token_agreement=agree)))
    df = pd.DataFrame(rows)
    present, values, order, key = ranking(df)
    assert key.column == "ssim_to_dense" and order == [2, 3, 1]          # b, c, a; dense is not ranked
    assert [m.column for m in present] == ["fidelity_token_agreement", "fidelity_psnr_db", "ssim_to_dense",
                                           "class_accuracy_delta"]
    per_sample(Context(df, str(tmp_path)))
    table = open(tmp_path / "per_sample_table.md").read()
    body = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| Point")]
    assert [ln.split("|")[1].strip() for ln in body] == ["b", "c", "a"]
    assert body[0].rstrip(" |").endswith("no") and body[1].rstrip(" |").endswith("yes")   # b~c overlap; c above a
    assert [ln.split("|")[-3].strip() for ln in body] == ["1", "1", "1"]      # equal Δ class accuracy: one rank
    assert os.path.getsize(tmp_path / "per_sample_ranking.png") > 0
    bare = df.drop(columns=["ssim_to_dense", "fidelity_psnr_db", "fidelity_token_agreement",
                            "class_accuracy_delta"])
    with pytest.raises(Skip, match="no per-sample measures"):
        per_sample(Context(bare, str(tmp_path)))
