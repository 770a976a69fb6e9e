"""Cost/quality trade-offs of every method (DMoE fig. 3): FID vs FLOPs and vs wall-clock with the Pareto front,
the front as a table, and dynamic methods against their static twins at equal FLOPs (ActVAR tables 4-5)."""
from __future__ import annotations

from typing import List

from reports import data as D
from reports import quality_vector as Q
from reports import style as S
from reports.context import Context, Skip
from reports.registry import register_report


def _intervals(ax, xs, los, his, c):
    for x, lo, hi in zip(xs, los, his):
        if x is not None and lo is not None and hi is not None:
            ax.plot([x, x], [lo, hi], color=c, lw=0.8, alpha=0.7, zorder=1)


def resolved_markers(ax, xs, ys, idx, flags, c, m, size, label, marked: bool):
    """Scatter the points `idx` of one series: filled where ΔFID is resolved, hollow where not (quality_vector.
    resolved_flags); every point filled when no row of the figure says (`marked` False: older rows)."""
    filled = [i for i in idx if not marked or flags[i]]
    hollow = [i for i in idx if marked and not flags[i]]
    for part, face in ((filled, c), (hollow, "none")):
        if part:
            ax.scatter([xs[i] for i in part], [ys[i] for i in part], marker=m, s=size, zorder=3, label=label,
                       facecolors=face, edgecolors=c, linewidths=0.9)
            label = "_nolegend_"   # one legend entry per series


def resolved_legend_entries(ax, df) -> None:
    """The legend's filled/hollow meaning (grey circles)."""
    for text, face in zip(Q.resolved_legend(df), ("#555555", "none")):
        ax.scatter([], [], marker="o", s=22, facecolors=face, edgecolors="#555555", linewidths=0.9, label=text)


def scatter_by_series(ax, df, xs, ys, ctx: Context, front_mask=None, connect=True) -> bool:
    """One colour+marker per series (method/entry/twin); dense as a black star; bootstrap intervals as bars;
    filled / hollow markers for resolved / unresolved ΔFID. Returns whether that marking was drawn."""
    keys = [(k[0], "", "") for k in D.series_keys(df)] if ctx.by_method else D.series_keys(df)
    order = list(dict.fromkeys(keys))
    los, his = D.col(df, "fid_ci_low"), D.col(df, "fid_ci_high")
    models = D.col(df, "model")
    flags = Q.resolved_flags(df)
    marked = any(f is not None for f in flags)
    multi_model = len(set(models)) > 1
    i_color = 0
    for key in order:
        idx = [i for i, k in enumerate(keys) if k == key and xs[i] is not None and ys[i] is not None]
        if not idx:
            continue
        if key[0] == "dense":
            c, m, size, label = S.DENSE_COLOR, "*", 60, D.series_label(key, order)
        else:
            c, m, size, label = S.color(i_color), S.marker(i_color), 16, D.series_label(key, order)
            i_color += 1
        for mi, model in enumerate(sorted({models[i] for i in idx}, key=str)):
            sub = sorted((i for i in idx if models[i] == model), key=lambda i: xs[i])
            lab = label + (f" — {model}" if multi_model else "")
            if key[0] == "dense":
                ax.scatter([xs[i] for i in sub], [ys[i] for i in sub], color=c, marker=m, s=size, zorder=3,
                           label=lab, edgecolors="none")
            else:
                resolved_markers(ax, xs, ys, sub, flags, c, m, size, lab, marked)
            if connect and len(sub) > 1 and key[0] != "dense":
                ax.plot([xs[i] for i in sub], [ys[i] for i in sub], color=c, lw=0.8, alpha=0.6, zorder=2,
                        ls="-" if mi == 0 else "--")
            _intervals(ax, [xs[i] for i in sub], [los[i] for i in sub], [his[i] for i in sub], c)
    if front_mask is not None:
        f = sorted((i for i, on in enumerate(front_mask) if on), key=lambda i: xs[i])
        if f:
            ax.step([xs[i] for i in f], [ys[i] for i in f], where="post", color="#444444", lw=0.8, ls=":",
                    zorder=2, label="Pareto front")
            ax.scatter([xs[i] for i in f], [ys[i] for i in f], s=60, facecolors="none", edgecolors="#444444",
                       linewidths=0.8, zorder=4)
    if marked:
        resolved_legend_entries(ax, df)
    return marked


def fid_label(df) -> str:
    ex = sorted({str(v) for v in D.col(df, "extractor") if v is not None})
    return f"FID ({', '.join(ex)})" if ex else "FID"


@register_report("pareto", "FID vs FLOPs and vs wall-clock, Pareto front, dense highlighted (DMoE fig. 3)",
                 order=30, overview=True)
def pareto_figures(ctx: Context) -> List[str]:
    df = ctx.df
    if not D.has_values(df, "fid"):
        raise Skip("no FID values")
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
        plt = S.setup()
        fig, ax = plt.subplots(figsize=(S.SINGLE, S.HEIGHT))
        front, excluded = Q.admissible_front(xs, fids, calls)
        marked = scatter_by_series(ax, df, xs, fids, ctx, front)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(fid_label(df))
        if len(ax.get_legend_handles_labels()[1]) > 5:   # many series: beside the axes, off the data
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=1.2)
        else:
            ax.legend(loc="best", handlelength=1.2)
        what = "FLOPs" if "flops" in stem else (
            "time relative to dense, measured paired with dense inside each trial" if kind == "paired" else
            "time relative to dense from absolute times of different trials (not comparable on a shared machine)")
        files += S.save_figure(fig, ctx.out_dir, stem, f"FID against {what} per method; the dotted staircase is "
                               f"the Pareto front of the point estimates (circled points; intervals ignored: "
                               f"paired_tradeoff says what is resolved) over the points no quality measure calls "
                               f"worse ({Q.QUALITY_RULE}), the black star the dense model, bars are FID bootstrap "
                               f"intervals."
                               + Q.excluded_text(df, calls, sorted(excluded))
                               + (Q.resolved_caption(df) if marked else "")
                               + (f" {unpaired} run(s) without a paired speedup are not drawn."
                                  if unpaired and "time" in stem else "") + f" {ctx.caption(desc)}")
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
    status = D.resolution(df)
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
                        f"Pareto front of FID against MACs ({desc}) by point estimates over the points no quality "
                        f"measure calls worse ({Q.QUALITY_RULE}); a point the estimates alone would put on it but a "
                        f"measure excludes is listed with the measure that decided. The dense baseline is always "
                        f"listed; 'resolved' applies the paired rule ({D.RESOLUTION_RULE}). ms/img is this trial's "
                        f"absolute time (not comparable across trials); Speedup is paired. "
                        f"{ctx.caption(desc, ctx.rows(idx))}")


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
                         f"Each dynamic point against its static twin at equal FLOPs (the twin's parameters are "
                         f"derived from the dynamic point's measured MACs; a dynamic point costing more than dense gets the "
                         f"unpruned model, marked). {ctx.caption(desc, ctx.rows([i for pair in pairs for i in pair]))}")
    plt = S.setup()
    fig, ax = plt.subplots(figsize=(S.SINGLE, S.HEIGHT))
    dyn = [p for p, _ in pairs]
    tw = [t for _, t in pairs]
    for grp, c, m, name in ((dyn, S.color(0), "o", "dynamic"), (tw, S.color(1), "s", "static twin")):
        g = sorted(grp, key=lambda i: xs[i] if xs[i] is not None else 0)
        ax.plot([xs[i] for i in g], [fids[i] for i in g], color=c, marker=m, lw=0.8, label=name)
        _intervals(ax, [xs[i] for i in g], [lo[i] for i in g], [hi[i] for i in g], c)
    for p, t in pairs:
        if None not in (xs[p], xs[t], fids[p], fids[t]):
            ax.plot([xs[p], xs[t]], [fids[p], fids[t]], color="#999999", lw=0.5, ls=":")
    dense = [i for i, m in enumerate(D.col(df, "method")) if m == "dense" and xs[i] is not None]
    if dense:
        ax.scatter([xs[i] for i in dense], [fids[i] for i in dense], marker="*", s=60, color=S.DENSE_COLOR,
                   label="dense", zorder=4)
    ax.set_xlabel(f"GMACs / image ({desc})")
    ax.set_ylabel(fid_label(df))
    ax.legend(loc="best")
    methods = sorted({D.nice_method(m) for m in (D.col(df, 'method')[i] for i in dyn) if m})
    files += S.save_figure(fig, ctx.out_dir, "dynamic_vs_static_plot", f"{', '.join(methods)} against static twins at "
                           f"equal FLOPs (dotted lines join each pair). "
                           f"{ctx.caption(desc, ctx.rows([i for pair in pairs for i in pair], dense))}")
    return files
