"""Figures fit for a paper (issue 23, item 4), tested on what each figure drew, not on its pixels: tick labels short
and distinct, every legend entry backed by a drawn artist, no point hidden under another, intervals on both axes of
the time trade-off, pair segments on the dynamic-vs-static plot, the expert maps' colour scale on their data, no
field figure without the families it compares, no all/ copy of a single sweep, and captions within
reports.style.WORD_LIMIT words with the shared protocol in one methods.md."""
import hashlib
import json
import os

import pandas as pd
import pytest

from reports import style as S
from reports.context import Context, Skip
from tests.test_report import DENSE_MACS, _paired, _row, dmoe_extra, synthetic_rows


class Drawn(dict):
    def __init__(self):
        super().__init__()
        self.captions = []      # every (stem, caption) drawn, in order


@pytest.fixture
def drawn(monkeypatch):
    """{stem: (figure, caption)} of every figure a generator draws; nothing is written."""
    import matplotlib.pyplot as plt
    figures = Drawn()

    def keep(fig, out_dir, stem, caption):
        fig.canvas.draw()          # tick labels and layout are settled at draw time
        if stem in figures:
            plt.close(figures[stem][0])
        figures[stem] = (fig, caption)
        figures.captions.append((stem, caption))
        return [stem]
    monkeypatch.setattr(S, "save_figure", keep)
    yield figures
    plt.close("all")


def tau_rows(dense_macs=0.2900e9):
    """The τ sweep the user reported: GMACs between 0.285 and 0.2905 (ticks 0.0025 apart ran together), every DMoE
    point with a Pruned-FFN twin at exactly its MACs, paired speedups with wide intervals."""
    rows = [_paired(_row("tau", "tau-1", "m/dense", "dense", dense_macs, 10.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))]
    rows[0].update(speedup_aa_ci_low=0.97, speedup_aa_ci_high=1.03)
    for tau, macs, fid, sp in ((1.0, 0.2905e9, 10.05, (0.99, 0.93, 1.06)), (0.8, 0.2880e9, 10.3, (1.05, 0.895, 1.158)),
                               (0.6, 0.2851e9, 11.0, (1.08, 0.98, 1.20))):
        p = f"m/dmoe/tau={tau}"
        rows.append(_paired(_row("tau", "tau-1", p, "dmoe", macs, fid, params=dict(tau=tau, moe_scales=[4, 5, 6]),
                                 extra=dmoe_extra(tau)), sp, (fid - 10.0, fid - 10.4, fid - 9.6)))
        rows.append(_paired(_row("tau", "tau-1", p + "/static", "pruned-ffn", macs, fid + 0.4, parent=p,
                                 twin="static", entry="dmoe", params=dict(match_macs=macs)),
                            (sp[0] + 0.01, sp[1], sp[2]), (fid - 9.6, fid - 10.0, fid - 9.2)))
    return rows


def _has_data(artist) -> bool:
    from matplotlib.collections import Collection, LineCollection
    from matplotlib.container import Container
    from matplotlib.lines import Line2D
    if isinstance(artist, LineCollection):
        return len(artist.get_segments()) > 0
    if isinstance(artist, Line2D):
        n = len(artist.get_xdata())
        line = artist.get_linestyle() not in ("None", "none", "", " ") and n >= 2
        return n > 0 and (line or artist.get_marker() not in ("None", "none", "", " ", None))
    if isinstance(artist, Collection):
        return len(artist.get_offsets()) > 0
    if isinstance(artist, Container):
        return any(_has_data(c) for c in artist.get_children())
    return False


def _marker_kinds(ax) -> set:
    """'filled' / 'hollow' for the data markers drawn (legend keys excluded)."""
    kinds = set()
    for c in _scatters(ax):
        if len(c.get_offsets()):
            face = c.get_facecolor()
            kinds.add("hollow" if len(face) == 0 or face[0][3] == 0 else "filled")
    return kinds


def assert_legend_backed(ax):
    """Every legend entry is an artist with data, or a legend key ('legend-key:KIND') whose kind of marker the
    axes draw."""
    from reports.pareto import LEGEND_KEY
    handles, labels = ax.get_legend_handles_labels()
    assert labels, "no legend"
    for h, label in zip(handles, labels):
        gid = str(h.get_gid() or "")
        if gid.startswith(LEGEND_KEY):
            assert gid[len(LEGEND_KEY):] in _marker_kinds(ax), label
        else:
            assert _has_data(h), label


def assert_ticks_fit(fig, ax):
    """Tick labels: at least two, distinct, at most 8 characters, and no two overlapping on screen."""
    renderer = fig.canvas.get_renderer()
    for axis in ("x", "y"):
        ticks = [t for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())
                 if t.get_visible() and t.get_text()]
        lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
        inside = [t for t in ticks if min(lo, hi) <= (t.get_position()[0 if axis == "x" else 1]) <= max(lo, hi)]
        texts = [t.get_text() for t in inside]
        assert len(texts) >= 2, (axis, texts)
        assert len(set(texts)) == len(texts), (axis, texts)
        assert all(len(t) <= 8 for t in texts), (axis, texts)
        boxes = sorted((t.get_window_extent(renderer) for t in inside), key=lambda b: b.x0 if axis == "x" else b.y0)
        for a, b in zip(boxes, boxes[1:]):
            assert (a.x1 <= b.x0) if axis == "x" else (a.y1 <= b.y0), (axis, texts)


def _scatters(ax):
    """The marker collections of the axes (scatter), legend keys aside."""
    from matplotlib.collections import PathCollection
    return [c for c in ax.collections if isinstance(c, PathCollection)
            and not str(c.get_gid() or "").startswith("legend-key:")]


def _points(ax):
    """(x, y) of every data marker drawn."""
    return [tuple(p) for c in _scatters(ax) for p in c.get_offsets()]


# ---------------------------------------------------------------------------------------------- pareto figures
def test_flops_figure_ticks_short_distinct_and_apart(drawn, tmp_path):
    from reports.pareto import pareto_figures
    pareto_figures(Context(pd.DataFrame(tau_rows()), str(tmp_path)))
    for stem in ("pareto_fid_vs_flops", "pareto_fid_vs_time", ):
        fig, _ = drawn[stem]
        assert_ticks_fit(fig, fig.axes[0])
    labels = [t.get_text() for t in drawn["pareto_fid_vs_flops"][0].axes[0].get_xticklabels() if t.get_text()]
    assert not any(t.endswith("0") and "." in t and len(t) > 5 for t in labels), labels     # no '0.28500'


def test_tick_formatter_keeps_labels_distinct():
    f = S.tick_formatter()
    assert f.format_ticks([0.285, 0.2875, 0.29]) == ["0.2850", "0.2875", "0.2900"]
    assert f.format_ticks([0.28, 0.285, 0.29]) == ["0.280", "0.285", "0.290"]
    assert f.format_ticks([1, 2, 3]) == ["1", "2", "3"]
    assert f.format_ticks([-0.0, 0.5]) == ["0.0", "0.5"]


def test_pareto_legend_entries_are_drawn(drawn, tmp_path):
    """The 'Pareto front' entry is the ringed points themselves (joined by the staircase from two points on): a
    front of one point is a ring without a line, never a line key with nothing drawn."""
    from reports.pareto import pareto_figures
    rows = tau_rows()
    pareto_figures(Context(pd.DataFrame(rows), str(tmp_path)))
    for stem in ("pareto_fid_vs_flops", "pareto_fid_vs_time"):
        ax = drawn[stem][0].axes[0]
        assert_legend_backed(ax)
        front = [ln for ln in ax.lines if ln.get_gid() == "pareto-front"]
        assert len(front) == 1 and front[0].get_label() == "Pareto front"
    flops_front = next(ln for ln in drawn["pareto_fid_vs_flops"][0].axes[0].lines if ln.get_gid() == "pareto-front")
    assert len(flops_front.get_xdata()) >= 2 and flops_front.get_linestyle() == ":"
    # dense cheapest and best: a front of one point
    alone = [r for r in rows if r["method"] != "dense"]
    for r in alone:
        r["macs_analytic_all"] = r["macs_analytic"] = r["macs_fvcore"] = 0.31e9
    pareto_figures(Context(pd.DataFrame(rows[:1] + alone), str(tmp_path)))
    ax = drawn["pareto_fid_vs_flops"][0].axes[0]
    assert_legend_backed(ax)
    front = next(ln for ln in ax.lines if ln.get_gid() == "pareto-front")
    assert len(front.get_xdata()) == 1 and front.get_linestyle() == "None" and front.get_marker() == "o"


def test_coincident_points_are_set_apart(drawn, tmp_path):
    """Twins at their parent's MACs and two models' dense at the same cost and FID: every marker at its own place,
    and the caption says points were set side by side."""
    from reports.pareto import pareto_figures
    rows = tau_rows()
    twin = _row("tau", "tau-1", "d/dense", "dense", 0.2900e9, 10.0, model="shapes-d4b")
    rows.append(_paired(twin, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    pareto_figures(Context(pd.DataFrame(rows), str(tmp_path)))
    for stem in ("pareto_fid_vs_flops", "pareto_fid_vs_time"):
        fig, caption = drawn[stem]
        pts = _points(fig.axes[0])
        assert len(pts) == len(rows), stem
        assert len({(round(x, 9), round(y, 9)) for x, y in pts}) == len(pts), stem
        assert "set side by side" in caption, stem
    xs = sorted(x for x, _ in _points(drawn["pareto_fid_vs_flops"][0].axes[0]))
    assert len(set(round(x, 9) for x in xs)) == len(xs)        # equal MACs: apart on the cost axis too


def test_fid_axis_names_the_features_not_a_hash(drawn, tmp_path):
    from reports.pareto import pareto_figures
    pareto_figures(Context(pd.DataFrame(tau_rows()), str(tmp_path)))
    fig, caption = drawn["pareto_fid_vs_flops"]
    assert fig.axes[0].get_ylabel() == "FID (shipped classifier features)"
    assert "@" not in fig.axes[0].get_ylabel() and "1234" not in caption
    assert "FID features: var-bench-classifier." in caption


def test_time_figure_has_intervals_on_both_axes(drawn, tmp_path):
    """Each point on the time axis: one error bar with a horizontal interval (1 / the paired speedup interval) and
    a vertical one (FID); the DMoE point the user read as 5% faster shows its [0.895, 1.158] speedup interval."""
    from matplotlib.container import ErrorbarContainer
    from reports.pareto import pareto_figures
    rows = tau_rows()
    pareto_figures(Context(pd.DataFrame(rows), str(tmp_path)))
    ax = drawn["pareto_fid_vs_time"][0].axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == len(rows)
    assert all(c.has_xerr and c.has_yerr for c in bars)
    spans = []
    for c in bars:
        for coll in c.lines[2]:
            for seg in coll.get_segments():
                if abs(seg[0][1] - seg[1][1]) < 1e-12:          # horizontal: the time interval
                    spans.append((min(seg[0][0], seg[1][0]), max(seg[0][0], seg[1][0])))
    assert any(abs(lo - 1 / 1.158) < 1e-6 and abs(hi - 1 / 0.895) < 1e-6 for lo, hi in spans), spans
    assert "95% intervals of paired speedup (horizontal) and FID (vertical)" in drawn["pareto_fid_vs_time"][1]
    # the FLOPs axis has no interval: vertical bars only
    flops = [c for c in drawn["pareto_fid_vs_flops"][0].axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert flops and all(c.has_yerr and not c.has_xerr for c in flops)


def test_dynamic_vs_static_plot_draws_a_segment_per_pair(drawn, tmp_path):
    from reports.pareto import twins
    rows = tau_rows()
    twins(Context(pd.DataFrame(rows), str(tmp_path)))
    fig, caption = drawn["dynamic_vs_static_plot"]
    ax = fig.axes[0]
    assert_legend_backed(ax)
    assert_ticks_fit(fig, ax)
    segs = [ln for ln in ax.lines if ln.get_gid() == "pair"]
    assert len(segs) == 3
    dyn = next(ln for ln in ax.lines if ln.get_gid() == "dynamic")
    tw = next(ln for ln in ax.lines if ln.get_gid() == "static twin")
    ends = {(round(x, 9), round(y, 9)) for ln in (dyn, tw) for x, y in zip(ln.get_xdata(), ln.get_ydata())}
    for seg in segs:
        (x0, x1), (y0, y1) = seg.get_xdata(), seg.get_ydata()
        assert {(round(x0, 9), round(y0, 9)), (round(x1, 9), round(y1, 9))} <= ends   # joins two drawn markers
        p0, p1 = ax.transData.transform([(x0, y0), (x1, y1)])
        assert ((p1 - p0) ** 2).sum() ** 0.5 > 3                   # long enough to see (display units)
        assert x0 != x1                                            # equal MACs: set apart, not under the bars
    assert "grey segment joins each pair" in caption


# ---------------------------------------------------------------------------------------------- which figures
def test_field_figures_need_two_families_besides_dense(tmp_path):
    from reports.field import families, field
    df = pd.DataFrame(tau_rows())
    assert families(df) == ["dmoe"]                  # the twins' Pruned-FFN is a control, not a family
    with pytest.raises(Skip, match="at least two efficiency families besides dense.*found: DMoE-VAR"):
        field(Context(df, str(tmp_path)))
    other = _paired(_row("tau", "tau-1", "m/fastvar", "fastvar", 0.25e9, 10.5), (1.2, 1.1, 1.3), (0.5, 0.1, 0.9))
    assert families(pd.DataFrame(tau_rows() + [other])) == ["dmoe", "fastvar"]


@pytest.fixture(scope="module")
def tau_only_report(tmp_path_factory):
    """The report (build_reports, in process) of a store holding the τ sweep alone, and its log."""
    import io
    import logging
    from bench.results import append_row
    from reports import build_reports
    d = str(tmp_path_factory.mktemp("tau_store"))
    for r in tau_rows():
        append_row(d, r)
    out = str(tmp_path_factory.mktemp("tau_report") / "out")
    log, root = io.StringIO(), logging.getLogger("var_bench")
    handler, level = logging.StreamHandler(log), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        build_reports(d, None, out)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return out, log.getvalue()


def test_one_sweep_writes_no_all_copy_and_logs_what_it_skipped(tau_only_report):
    out, log = tau_only_report
    assert sorted(os.listdir(out)) == ["tau"]
    assert "report all: not written: the rows hold one sweep (tau)" in log
    assert "not drawn for tau:" in log and "field: needs at least two efficiency families besides dense" in log
    assert not os.path.exists(os.path.join(out, "tau", "field_pareto.png"))
    digests = {}
    for root, _, names in os.walk(out):
        for n in names:
            if n.endswith((".png", ".pdf")):
                h = hashlib.sha256(open(os.path.join(root, n), "rb").read()).hexdigest()
                assert h not in digests, (n, digests.get(h))
                digests[h] = n


def test_captions_within_the_word_limit_with_one_methods_note(tau_only_report):
    out, _ = tau_only_report
    d = os.path.join(out, "tau")
    methods = open(os.path.join(d, S.METHODS_FILE)).read()
    assert "ABBA" in methods and "Quality vector (" in methods and "Resolution" in methods and "Test CPU" in methods
    figures = [n[:-4] for n in os.listdir(d) if n.endswith(".png")]
    assert {"pareto_fid_vs_flops", "pareto_fid_vs_time", "dynamic_vs_static_plot", "paired_tradeoff",
            "expert_maps_by_tau"} <= set(figures)
    for stem in figures:
        text = open(os.path.join(d, f"{stem}.md")).read()
        caption = text.split(" — ", 1)[1]
        assert S.words(caption) <= S.WORD_LIMIT, (stem, S.words(caption), caption)
        assert "Protocol: methods.md" in caption, stem
        assert "ABBA" not in caption and "Test CPU" not in caption, stem   # the protocol is not repeated
    assert "methods.md" in open(os.path.join(d, "README.md")).read()


def test_captions_within_the_word_limit_on_every_shipped_figure(drawn, tmp_path):
    """Every figure the synthetic sweeps, the paired points and the field draw, on hand-made rows."""
    from reports import run_generators
    from reports.data import select_runs
    from reports.registry import list_reports
    from tests.test_claims_report import CLAIM_ROWS
    from tests.test_report import PAIRED_POINTS
    frames = list(select_runs(pd.DataFrame(synthetic_rows())).values())
    pr = [_paired(_row("pr", "pr-1", "m/dense", "dense", DENSE_MACS, 10.0), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))]
    pr += [_paired(_row("pr", "pr-1", p, "dmoe", 0.8e9, 10.0 + dq[0]), sp, dq) for p, (sp, dq, _) in
           PAIRED_POINTS.items()]
    frames += [pd.DataFrame(pr), pd.DataFrame([r for r, _ in CLAIM_ROWS])]
    for df in frames:
        run_generators(Context(df, str(tmp_path), warnings=["incomplete sweep: its manifest lists 9 trials, 8 "
                                                            "have rows (finish it with ...)"]), list_reports())
    assert {"field_pareto", "paired_tradeoff", "quality_vector", "expert_size", "depth",
            "scale_sensitivity"} <= set(drawn)
    for stem, caption in drawn.captions:
        assert S.words(caption) <= S.WORD_LIMIT, (stem, S.words(caption), caption)
        assert "WARNING: incomplete sweep." in caption and "finish it" not in caption, stem


# ---------------------------------------------------------------------------------------------- expert maps
def test_expert_maps_colour_scale_spans_the_data_and_says_there_is_no_image(drawn, tmp_path):
    from reports.dmoe import expert_maps
    rows = tau_rows()       # with dense and twin rows: num_experts is a float column (16.0), labelled 16
    for r in (r for r in rows if r["method"] == "dmoe"):          # active experts 9..15 of 16
        m = json.loads(r["expert_maps"])
        m["maps"] = {k: [[[9 + (i + j + s) % 7 for j in range(len(smp))] for i in range(len(smp))]
                         for s, smp in enumerate(v)] for k, v in m["maps"].items()}
        r["expert_maps"] = json.dumps(m)
    expert_maps(Context(pd.DataFrame(rows), str(tmp_path)))
    for stem in ("expert_maps_by_tau", "expert_maps_samples"):
        fig, caption = drawn[stem]
        maps = [im for ax in fig.axes for im in ax.images if im.get_gid() == "expert-map"]
        assert maps and all(im.get_clim() == (9.0, 15.0) for im in maps), stem
        labels = [ax.get_ylabel() for ax in fig.axes] + [ax.get_xlabel() for ax in fig.axes]
        assert "active experts / token (of 16)" in labels, stem      # the colour bar's label
        assert "No sample image" in caption and not [im for ax in fig.axes for im in ax.images
                                                     if im.get_gid() == "sample-image"], stem
    # a row that carries its samples' images: one beside the maps, and the caption does not say there is none
    first = rows[1]         # τ = 1, the first row of expert_maps_by_tau
    m = json.loads(first["expert_maps"])
    m["images"] = [[[[(i * 30) % 256, (j * 30) % 256, 128] for j in range(8)] for i in range(8)]] * 2
    first["expert_maps"] = json.dumps(m)
    expert_maps(Context(pd.DataFrame(rows), str(tmp_path)))
    fig, caption = drawn["expert_maps_by_tau"]
    images = [im for ax in fig.axes for im in ax.images if im.get_gid() == "sample-image"]
    assert len(images) == 1 and images[0].get_array().shape == (8, 8, 3)
    assert "No sample image" not in caption


def test_captions_carry_each_warning_in_a_few_words():
    from reports.protocol import short_warning
    assert short_warning("3 of 9 rows timed on a noisy machine (timing_noisy: a, b); their paired speedups stand, "
                         "their absolute times do not") == "noisy timing (3/9 rows)"
    assert short_warning("incomplete sweep: its manifest lists 6 trials, 5 have rows (finish it with `python -m "
                         "bench sweep NAME --resume`)") == "incomplete sweep"
    assert short_warning("no paired timing in these rows: wall-clock comparisons use times of different trials, "
                         "which a busy machine can distort") == "no paired timing"
    assert short_warning("tau: 3 of 3 rows timed on a noisy machine (x)") == "tau: noisy timing (3/3 rows)"
