"""Cost/quality trade-offs of every method (DMoE fig. 3): FID vs FLOPs and vs wall-clock with the Pareto front,
the front as a table, and dynamic methods against their static twins at equal FLOPs (ActVAR tables 4-5)."""
from __future__ import annotations

from typing import List

from reports import data as D
from reports import quality_vector as Q
from reports import style as S
from reports.context import Context, Skip
from reports.protocol import extractor_sentence, features_text
from reports.registry import register_report


def _intervals(ax, xs, los, his, c):
    for x, lo, hi in zip(xs, los, his):
        if x is not None and lo is not None and hi is not None:
            ax.plot([x, x], [lo, hi], color=c, lw=0.8, alpha=0.7, zorder=1)


def _bar(v, lo, hi):
    """[[below], [above]] of one error bar, or None without an interval; max(0, ...): matplotlib refuses a negative
    bar, which an estimate outside its own (bootstrap) interval would give."""
    if v is None or lo is None or hi is None:
        return None
    return [[max(0.0, v - lo)], [max(0.0, hi - v)]]


def error_bars(ax, x, y, xint, yint, c, alpha=0.7):
    """One point's intervals as one matplotlib ErrorbarContainer: xint / yint are (low, high) or None."""
    xerr = _bar(x, *xint) if xint else None
    yerr = _bar(y, *yint) if yint else None
    if xerr is None and yerr is None:
        return None
    return ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=c, elinewidth=0.7, capsize=0,
                       alpha=alpha, zorder=1, label="_nolegend_")


def resolved_markers(ax, xs, ys, idx, flags, c, m, size, label, marked: bool):
    """Scatter the points `idx` of one series: filled where ΔFID is resolved, hollow where not (quality_vector.
    resolved_flags); every point filled when no row of the figure says (`marked` False: older rows). Returns which
    kinds it drew ({'filled', 'hollow'})."""
    filled = [i for i in idx if not marked or flags[i]]
    hollow = [i for i in idx if marked and not flags[i]]
    drawn = set()
    for part, face, kind in ((filled, c, "filled"), (hollow, "none", "hollow")):
        if part:
            ax.scatter([xs[i] for i in part], [ys[i] for i in part], marker=m, s=size, zorder=3, label=label,
                       facecolors=face, edgecolors=c, linewidths=0.9)
            label = "_nolegend_"   # one legend entry per series
            drawn.add(kind)
    return drawn


LEGEND_KEY = "legend-key:"   # gid of a legend-only artist: what it explains ('filled', 'hollow') is drawn elsewhere


def resolved_legend_entries(ax, df, drawn=("filled", "hollow")) -> None:
    """The legend's filled/hollow meaning (grey circles), for the kinds of marker the figure drew."""
    for text, face, kind in zip(Q.resolved_legend(df), ("#555555", "none"), ("filled", "hollow")):
        if kind in drawn:
            ax.scatter([], [], marker="o", s=22, facecolors=face, edgecolors="#555555", linewidths=0.9, label=text,
                       gid=LEGEND_KEY + kind)


def scatter_by_series(ax, df, xs, ys, ctx: Context, front_mask=None, connect=True, xint=None, dodge_y=False):
    """One colour+marker per series (method/entry/twin); dense as a black star; each point's intervals as an error
    bar (vertical: FID bootstrap; horizontal: `xint`, per row (low, high) or None); filled / hollow markers for
    resolved / unresolved ΔFID; points at the same x (dodge_y: at the same x and y) set side by side
    (style.dodge), so none hides another; the Pareto front (`front_mask`) as ringed points on a dotted staircase.
    Returns (the marking was drawn, points were set apart)."""
    keys = [(k[0], "", "") for k in D.series_keys(df)] if ctx.by_method else D.series_keys(df)
    order = list(dict.fromkeys(keys))
    los, his = D.col(df, "fid_ci_low"), D.col(df, "fid_ci_high")
    models = D.col(df, "model")
    flags = Q.resolved_flags(df)
    marked = any(f is not None for f in flags)
    multi_model = len(set(models)) > 1
    px = S.dodge(xs, ys if dodge_y else None)
    px = [None if y is None else x for x, y in zip(px, ys)]
    kinds = set()
    i_color = 0
    for key in order:
        idx = [i for i, k in enumerate(keys) if k == key and px[i] is not None]
        if not idx:
            continue
        if key[0] == "dense":
            c, m, size, label = S.DENSE_COLOR, "*", 60, D.series_label(key, order)
        else:
            c, m, size, label = S.color(i_color), S.marker(i_color), 16, D.series_label(key, order)
            i_color += 1
        for mi, model in enumerate(sorted({models[i] for i in idx}, key=str)):
            sub = sorted((i for i in idx if models[i] == model), key=lambda i: px[i])
            lab = label + (f" — {model}" if multi_model else "")
            if key[0] == "dense":
                ax.scatter([px[i] for i in sub], [ys[i] for i in sub], color=c, marker=m, s=size, zorder=3,
                           label=lab, edgecolors="none")
            else:
                kinds |= resolved_markers(ax, px, ys, sub, flags, c, m, size, lab, marked)
            if connect and len(sub) > 1 and key[0] != "dense":
                ax.plot([px[i] for i in sub], [ys[i] for i in sub], color=c, lw=0.8, alpha=0.6, zorder=2,
                        ls="-" if mi == 0 else "--", label="_nolegend_")
            for i in sub:
                error_bars(ax, px[i], ys[i], None if xint is None else xint[i], (los[i], his[i]), c)
    if front_mask is not None:
        f = sorted((i for i, on in enumerate(front_mask) if on and px[i] is not None), key=lambda i: (xs[i], px[i]))
        if f:   # one artist: the rings, joined by the staircase when there are two or more
            ax.plot([px[i] for i in f], [ys[i] for i in f], drawstyle="steps-post", color="#444444", lw=0.8,
                    ls=":" if len(f) > 1 else "none", marker="o", ms=7.5, mfc="none", mew=0.8, zorder=4,
                    label="Pareto front", gid="pareto-front")
    if marked:
        resolved_legend_entries(ax, df, kinds)
    return marked, S.dodged(xs, px)


def fid_label(df) -> str:
    """The FID axis label: what the features are ('FID (shipped classifier features)'), never a weights hash;
    captions name the extractor (protocol.extractor_sentence), methods.md its hash."""
    what = features_text(df)
    return f"FID ({what})" if what else "FID"


def time_intervals(df, kind: str, xs):
    """Per row the (low, high) of time / dense from the paired speedup interval (1/high, 1/low); dense, whose own
    interval is degenerate, gets its A/A interval (dense timed against itself) where the row has one."""
    if kind != "paired":
        return [None] * len(xs)
    lo, hi = D.col(df, "speedup_ci_low"), D.col(df, "speedup_ci_high")
    aa_lo, aa_hi = D.col(df, "speedup_aa_ci_low"), D.col(df, "speedup_aa_ci_high")
    out = []
    for i, x in enumerate(xs):
        a, b = lo[i], hi[i]
        if (a is None or b is None or a == b) and aa_lo[i] is not None and aa_hi[i] is not None:
            a, b = aa_lo[i], aa_hi[i]
        out.append(None if x is None or a is None or b is None or a <= 0 or b <= 0 else (1.0 / b, 1.0 / a))
    return out


def legend(ax) -> None:
    if len(ax.get_legend_handles_labels()[1]) > 5:   # many series: beside the axes, off the data
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=1.2)
    else:
        ax.legend(loc="best", handlelength=1.2)


@register_report("pareto", "FID vs FLOPs and vs wall-clock, Pareto front, dense highlighted (DMoE fig. 3)",
                 order=30, overview=True)
def pareto_figures(ctx: Context) -> List[str]:
    df = ctx.df
    if not D.has_values(df, "fid"):
        raise Skip("no FID values")
    if all(m == "dense" for m in D.col(df, "method")):
        raise Skip("only dense rows: no method to trade off against it")
    column, desc = D.flops_column(df, ctx.flops)
    if not column:
        raise Skip("no MAC column (macs_analytic_all / macs_analytic / macs_fvcore)")
    files = []
    fids = D.col(df, "fid")
    calls = Q.quality_calls(df)
    rel, kind = D.relative_time(df)
    unpaired = sum(r is None and f is not None for r, f in zip(rel, fids)) if kind == "paired" else 0
    if unpaired:   # rows from before paired timing: their times are not comparable with paired ones
        ctx.note(f"pareto_fid_vs_time: {unpaired} run(s) without a paired speedup not drawn")
    time_label = ("time / dense (1 / paired speedup)" if kind == "paired" else
                  "time / dense (UNPAIRED: different trials)")
    for stem, xs, xlabel in (("pareto_fid_vs_flops", D.gmacs(df, column), f"GMACs / image ({desc})"),
                             ("pareto_fid_vs_time", rel, time_label)):
        if all(x is None for x in xs):
            ctx.note(f"{stem}: no values for the x axis")
            continue
        timed = "time" in stem
        plt = S.setup()
        fig, ax = plt.subplots(figsize=(S.SINGLE, S.HEIGHT))
        front, excluded = Q.admissible_front(xs, fids, calls)
        xint = time_intervals(df, kind, xs) if timed else None
        marked, moved = scatter_by_series(ax, df, xs, fids, ctx, front, xint=xint, dodge_y=timed)
        S.tidy_ticks(ax, "x")
        S.tidy_ticks(ax, "y")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(fid_label(df))
        legend(ax)
        if timed:
            what = ("FID against time / dense (1 / paired speedup). Bars: 95% intervals of paired speedup "
                    "(horizontal) and FID (vertical)." if kind == "paired" else
                    "FID against time / dense from absolute times of different trials (UNPAIRED: not comparable). "
                    "Bars: FID 95% intervals.")
        else:
            what = "FID against transformer GMACs per image. Bars: FID 95% intervals."
        has_front = any(front)
        caption = (what + " Star: dense."
                   + (" Ringed, dotted: Pareto front of the estimates." if has_front else "")
                   + (" Points at equal cost are set side by side." if moved else "")
                   + (" Filled: ΔFID resolved; hollow: not." if marked else "")
                   + Q.excluded_text(df, calls, sorted(excluded), 1)
                   + (f" {unpaired} run(s) without a paired speedup are not drawn." if unpaired and timed else "")
                   + extractor_sentence(df) + f" {ctx.caption(desc)}")
        files += S.save_figure(fig, ctx.out_dir, stem, caption)
    return files


@register_report("front", "the Pareto front as Markdown + LaTeX table", order=40, overview=True)
def front_table(ctx: Context) -> List[str]:
    df = ctx.df
    column, desc = D.flops_column(df, ctx.flops)
    if not column or not D.has_values(df, "fid"):
        raise Skip("needs FID and a MAC column")
    xs, fids = D.gmacs(df, column), D.col(df, "fid")
    calls = Q.quality_calls(df)
    front, excluded = Q.admissible_front(xs, fids, calls)
    # the front, and the points the estimates alone would put there but a quality measure excludes (with why)
    idx = sorted((i for i, on in enumerate(front) if on or i in excluded), key=lambda i: xs[i])
    dense_idx = [i for i, m in enumerate(D.col(df, "method")) if m == "dense"]
    for i in dense_idx:          # the baseline is always listed, on the front or not
        if i not in idx:
            idx.append(i)
    labels, models = D.col(df, "method_label"), D.col(df, "model")
    lo, hi, ms = D.col(df, "fid_ci_low"), D.col(df, "fid_ci_high"), D.ms_per_image(df)
    isc = D.col(df, "isc_mean")
    sp, dq = D.paired_intervals(df)
    status = Q.resolution(df)
    vector = Q.vector_cells(df)
    header = ["Method", "Model", "GMACs/img", "ΔMACs vs dense", "ms/img", "Speedup [95% CI]", "FID [95% CI]",
              *Q.vector_header(), "IS", "resolved", "on front"]
    rows = []
    for i in idx:
        dm = D.dense_value(df, models[i], column)
        dmacs = f"{100 * (xs[i] * 1e9 / dm - 1):+.1f}%" if dm and xs[i] is not None else "-"
        rows.append([labels[i] or D.col(df, "method")[i], models[i], S.fmt(xs[i], ".4g"), dmacs, S.fmt(ms[i], ".3g"),
                     D.speedup_text(*sp[i]), S.fid_text(fids[i], lo[i], hi[i]), *vector[i],
                     S.fmt(isc[i], ".3g"), status[i] or "incomplete",
                     "yes" if front[i] else f"no: {excluded[i]}" if i in excluded else "no"])
    return S.save_table(ctx.out_dir, "pareto_front", header, rows,
                        f"Pareto front of FID against MACs by point estimates, among points no other quality measure "
                        f"calls worse; a point the estimates alone would put there but a measure excludes is listed "
                        f"with that measure. Dense is always listed. 'resolved': the paired rule. ms/img: this "
                        f"trial's absolute time; Speedup: paired. {ctx.caption(desc, ctx.rows(idx))}")


@register_report("twins", "dynamic methods vs their static twins at equal FLOPs", order=50)
def twins(ctx: Context) -> List[str]:
    """Every trial with a parent (e.g. the FLOP-matched Pruned-FFN of a DMoE point) against that parent."""
    df = ctx.df
    parents = D.col(df, "sweep_parent")
    if not any(parents):
        raise Skip("no twin trials (sweep_parent is empty)")
    column, desc = D.flops_column(df, ctx.flops)
    points = D.col(df, "sweep_point")
    by_point = {p: i for i, p in enumerate(points) if p}
    xs, fids, lo, hi = D.gmacs(df, column), D.col(df, "fid"), D.col(df, "fid_ci_low"), D.col(df, "fid_ci_high")
    labels, isc = D.col(df, "method_label"), D.col(df, "isc_mean")
    pairs = [(by_point[p], i) for i, p in enumerate(parents) if p and p in by_point]
    missing = [points[i] for i, p in enumerate(parents) if p and p not in by_point]
    if missing:
        ctx.note(f"twins: {len(missing)} twin(s) without their parent's row: {', '.join(missing[:3])}")
    if not pairs:
        raise Skip("no twin has its parent's row")
    header = ["Dynamic", "Static twin", "GMACs/img (dyn / twin)", "Speedup vs dense (dyn / twin)",
              "FID dynamic [95% CI]", "FID twin [95% CI]", "FID twin - dynamic", "ΔFID vs dense (dyn / twin)",
              "IS (dyn / twin)"]
    rows = []
    clamped = D.col(df, "match_clamped")
    sp, dq = D.paired_intervals(df)
    for p, t in pairs:
        dfid = f"{fids[t] - fids[p]:+.3g}" if fids[t] is not None and fids[p] is not None else "-"
        twin = labels[t] + (" (target out of reach: nearest end)" if clamped[t] else "")
        rows.append([labels[p], twin, f"{S.fmt(xs[p], '.4g')} / {S.fmt(xs[t], '.4g')}",
                     f"{D.speedup_text(*sp[p])} / {D.speedup_text(*sp[t])}", S.fid_text(fids[p], lo[p], hi[p]),
                     S.fid_text(fids[t], lo[t], hi[t]), dfid, f"{D.delta_text(*dq[p])} / {D.delta_text(*dq[t])}",
                     f"{S.fmt(isc[p])} / {S.fmt(isc[t])}"])
    files = S.save_table(ctx.out_dir, "dynamic_vs_static", header, rows,
                         f"Each dynamic point against its static twin at equal FLOPs (the twin's setting is derived "
                         f"from the dynamic point's measured MACs; a dynamic point costing more than dense gets the "
                         f"unpruned model, marked). {ctx.caption(desc, ctx.rows([i for pair in pairs for i in pair]))}")
    files += _twins_plot(ctx, df, pairs, xs, fids, lo, hi, desc)
    return files


def _twins_plot(ctx: Context, df, pairs, xs, fids, lo, hi, desc) -> List[str]:
    """Dynamic points, their twins and a segment joining each pair. A twin sits at its parent's MACs by
    construction: the two are set side by side (dynamic left, twin right) so that the segment, the markers and
    the intervals show."""
    pairs = [(p, t) for p, t in pairs if None not in (xs[p], xs[t], fids[p], fids[t])]
    if not pairs:
        ctx.note("dynamic_vs_static_plot: no pair has MACs and FID on both sides")
        return []
    dense = [i for i, m in enumerate(D.col(df, "method")) if m == "dense" and xs[i] is not None and
             fids[i] is not None]
    shown = {i for pair in pairs for i in pair} | set(dense)
    # points closer in MACs than 3% of the axis (each pair, by construction) are set 3% apart
    px = S.dodge([xs[i] if i in shown else None for i in range(len(xs))], step=0.03, tol=0.03)
    moved = S.dodged(xs, px)
    plt = S.setup()
    fig, ax = plt.subplots(figsize=(S.SINGLE, S.HEIGHT))
    for k, (p, t) in enumerate(pairs):
        ax.plot([px[p], px[t]], [fids[p], fids[t]], color="#555555", lw=1.0, zorder=2, gid="pair",
                label="pair (equal MACs)" if k == 0 else "_nolegend_")
    dyn = [p for p, _ in pairs]
    tw = [t for _, t in pairs]
    for grp, c, m, name in ((dyn, S.color(0), "o", "dynamic"), (tw, S.color(1), "s", "static twin")):
        g = sorted(grp, key=lambda i: px[i])
        ax.plot([px[i] for i in g], [fids[i] for i in g], color=c, marker=m, lw=0.6, alpha=0.9, ms=4, label=name,
                zorder=3, gid=name)
        for i in g:
            error_bars(ax, px[i], fids[i], None, (lo[i], hi[i]), c)
    if dense:
        ax.scatter([px[i] for i in dense], [fids[i] for i in dense], marker="*", s=60, color=S.DENSE_COLOR,
                   label="dense", zorder=4)
    S.tidy_ticks(ax, "x")
    S.tidy_ticks(ax, "y")
    ax.set_xlabel(f"GMACs / image ({desc})")
    ax.set_ylabel(fid_label(df))
    legend(ax)
    methods = sorted({D.nice_method(m) for m in (D.col(df, 'method')[i] for i in dyn) if m})
    statics = sorted({D.nice_method(m) for m in (D.col(df, 'method')[i] for i in tw) if m})
    caption = (f"{', '.join(methods)} against {', '.join(statics)} twins at equal FLOPs: a grey segment joins each "
               f"pair" + (", set side by side (equal MACs)" if moved else "") + ". Bars: FID 95% intervals; star: "
               f"dense." + extractor_sentence(df)
               + f" {ctx.caption(desc, ctx.rows([i for pair in pairs for i in pair], dense))}")
    return S.save_figure(fig, ctx.out_dir, "dynamic_vs_static_plot", caption)
