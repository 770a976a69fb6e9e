"""The headline figures in paired terms: speedup (x, with interval) against ΔFID (with interval), dense at (1, 0),
each point marked front / not resolved / dominated by reports.data.RESOLUTION_RULE, and the same as a table."""
from __future__ import annotations

from typing import List

from reports import data as D
from reports import quality_vector as Q
from reports import style as S
from reports.context import Context, Skip
from reports.registry import register_report

STATUS_STYLE = {  # status -> (alpha, overlay, legend text); the fill says whether ΔFID is resolved by sample count
    "front": (1.0, "ring", "front (ringed)"),
    "not resolved": (1.0, None, "off the front, not separated"),
    "dominated": (0.35, None, "dominated, separated (faded)"),
    "excluded": (0.35, "x", "excluded: a quality measure resolved worse (×)"),
}
OVERLAY = {"ring": dict(marker="o", s=70, facecolors="none", edgecolors="#444444", linewidths=0.7),
           "x": dict(marker="x", s=40, color="#000000", linewidths=0.8)}


def _paired(ctx: Context):
    """(rows, speedup intervals, ΔFID intervals, resolution status) of the context; Skip without paired columns."""
    if not D.has_paired(ctx.df):
        raise Skip("no paired columns (speedup, fid_delta): rows from before paired measurement")
    sp, dq = D.paired_intervals(ctx.df)
    return ctx.df, sp, dq, Q.resolution(ctx.df)


def _caption_rule(ctx: Context, status, full_level: bool = False, limit: int = 2) -> str:
    """The end of a paired caption: incomplete rows, excluded points (named up to `limit`), the interval level when
    not 95%, the shared facts; the resolution rule and the quality vector are stated in methods.md."""
    missing = sum(st is None for st in status)
    shown = (f" {len(status) - missing} of the {len(status)} runs have every paired value and interval; the other "
             f"{missing} are incomplete (not drawn)." if missing and full_level else
             f" {missing} incomplete run(s) not drawn." if missing else "")
    calls = Q.quality_calls(ctx.df)
    level = Q.level_note(ctx.df) if full_level else (" Some intervals are not at 95% (methods.md)."
                                                     if Q.level_note(ctx.df) else "")
    return f"{Q.excluded_text(ctx.df, calls, range(len(calls)), limit)}{level}{shown} {ctx.caption()}"


@register_report("paired", "speedup vs ΔFID against dense, paired, with what is resolved (headline)",
                 order=10, overview=True)
def paired_tradeoff(ctx: Context) -> List[str]:
    df, sp, dq, status = _paired(ctx)
    series = [(k[0], "", "") for k in D.series_keys(df)] if ctx.by_method else D.series_keys(df)
    models = [str(m or "") for m in D.col(df, "model")]
    multi_model = len(set(models)) > 1   # one series per (series, model): each model has its own dense baseline
    keys = [k + (m if multi_model else "",) for k, m in zip(series, models)]
    order = list(dict.fromkeys(keys))
    aa = list(zip(D.col(df, "speedup_aa_ci_low"), D.col(df, "speedup_aa_ci_high")))
    flags = Q.resolved_flags(df)
    if any(st is None for st in status):
        ctx.note(f"paired_tradeoff: {sum(st is None for st in status)} incomplete run(s) not drawn (no paired "
                 "value or interval)")
    plt = S.setup()
    fig, ax = plt.subplots(figsize=(S.SINGLE, S.HEIGHT + 0.3))
    ax.axvline(1.0, color="#888888", lw=0.6, ls=":")
    ax.axhline(0.0, color="#888888", lw=0.6, ls=":")
    i_color = 0
    for key in order:
        idx = [i for i, k in enumerate(keys) if k == key and status[i] is not None]
        if not idx:
            continue
        if key[0] == "dense":
            for i in idx:
                lo, hi = aa[i]
                if lo is not None and hi is not None:   # the protocol's noise floor: dense timed against itself
                    ax.plot([lo, hi], [0, 0], color=S.DENSE_COLOR, lw=2.5, alpha=0.3, solid_capstyle="butt",
                            label="dense A/A interval")
            ax.scatter([1.0], [0.0], marker="*", s=70, color=S.DENSE_COLOR, zorder=5,
                       label=_label(key, order))
            continue
        c, m = S.color(i_color), S.marker(i_color)
        i_color += 1
        for i in idx:
            (s, slo, shi), (d, dlo, dhi) = sp[i], dq[i]
            alpha, overlay, _ = STATUS_STYLE[status[i]]
            # max(0, ...): matplotlib refuses a negative bar, which an estimate outside its own interval would give
            ax.errorbar([s], [d], xerr=[[max(0.0, s - slo)], [max(0.0, shi - s)]],
                        yerr=[[max(0.0, d - dlo)], [max(0.0, dhi - d)]], fmt="none",
                        ecolor=c, elinewidth=0.7, alpha=max(alpha, 0.5), zorder=2)
            ax.scatter([s], [d], marker=m, s=22, zorder=3, alpha=alpha,
                       facecolors="none" if flags[i] is False else c, edgecolors=c, linewidths=0.9)
            if overlay:
                ax.scatter([s], [d], zorder=4, **OVERLAY[overlay])
        ax.scatter([], [], marker=m, color=c, s=22, label=_label(key, order))
    for st, (alpha, overlay, text) in STATUS_STYLE.items():   # legend entries for the marking
        if st in status:
            ax.scatter([], [], **(OVERLAY[overlay] if overlay else dict(marker="o", s=22, color="#555555")),
                       alpha=alpha, label=text)
    if any(f is not None for f in flags):
        for text, face in zip(Q.resolved_legend(df), ("#555555", "none")):
            ax.scatter([], [], marker="o", s=22, facecolors=face, edgecolors="#555555", linewidths=0.9, label=text)
    ax.set_xlabel("speedup over dense (×, paired, 95% CI)")
    ax.set_ylabel("ΔFID vs dense (paired, 95% CI)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=1.2)
    return S.save_figure(fig, ctx.out_dir, "paired_tradeoff",
                         "Paired speedup against ΔFID; dense at (1, 0), grey band: dense against itself. Rings: "
                         "front; faded: dominated; ×: excluded. Filled: ΔFID resolved; hollow: not. Bars: 95% "
                         "intervals." + _caption_rule(ctx, status, limit=1))


def _label(key, order) -> str:
    """series_label of (method, entry, twin), with the model when the figure holds several."""
    label = D.series_label(key[:3], [k[:3] for k in order])
    if key[0] == "dense":   # every model's dense sits at (1, 0): one legend entry
        return label if next(k for k in order if k[0] == "dense") == key else "_nolegend_"
    return label + (f" — {key[3]}" if key[3] else "")


def _samples_text(df):
    """Per row: the sample count, with why a resolving run stopped there."""
    return ["-" if n is None else f"{int(n):,}" + (f" ({why})" if why else "")
            for n, why in zip(D.col(df, "samples"), D.col(df, "resolve_stop_reason"))]


@register_report("paired_table", "every point in paired terms: speedup, ΔFID, intervals, status",
                 order=20, overview=True)
def paired_table(ctx: Context) -> List[str]:
    df, sp, dq, status = _paired(ctx)
    labels, methods = D.col(df, "method_label"), D.col(df, "method")
    ratio, eff = D.col(df, "macs_ratio"), D.col(df, "time_flop_efficiency")
    executed = D.col(df, "macs_executed_ratio")
    pct, need, noisy = D.col(df, "fid_delta_pct"), D.col(df, "fid_delta_samples_for_1pct"), D.col(df, "timing_noisy")
    models = D.col(df, "model")
    calls, vector = Q.quality_calls(df), Q.vector_cells(df)
    header = ["Method", "Model", "MACs / dense", "MACs run / dense", "Speedup [95% CI]", "Time saved / FLOPs saved",
              *Q.vector_header(), "ΔFID %", "Samples", "N for ±1% ΔFID (est.)", "Status", "Timing"]
    idx = sorted(range(len(status)), key=lambda i: (status[i] is None, str(models[i]), methods[i] != "dense",
                                                    -(sp[i][0] or 0)))
    samples = _samples_text(df)
    rows = []
    for i in idx:
        st = status[i] or "incomplete"
        rows.append([labels[i] or methods[i], models[i], S.fmt(ratio[i], ".3f"), S.fmt(executed[i], ".3f"),
                     D.speedup_text(*sp[i]),
                     S.fmt(eff[i], ".2f"), *vector[i], S.fmt(pct[i], "+.1f"), samples[i],
                     "-" if need[i] is None else f"{int(need[i]):,}",
                     f"{st}: {calls[i].reason(Q.FRONT_AXES)}" if st == "excluded" else st,
                     "noisy" if noisy[i] else "ok"])
    return S.save_table(ctx.out_dir, "paired_summary", header, rows,
                        "Every point paired against dense. 'MACs / dense': routed work (what the papers count); "
                        "'MACs run / dense': what the kernels executed. 'N for ±1% ΔFID': samples at which the ΔFID "
                        "half-width would reach 1% of dense FID (1/√N estimate)." + _caption_rule(ctx, status, True))


CALL_COLOURS = {Q.BETTER: S.color(2), Q.WORSE: S.color(1), Q.UNRESOLVED: "#888888", None: "#bbbbbb"}


@register_report("quality_vector", "ΔFID beside Δ class accuracy, Δ precision and Δ recall, each with its interval "
                 "and what it resolves (headline)", order=15)
def quality_vector_figure(ctx: Context) -> List[str]:
    df = ctx.df
    present = [m for m in Q.MEASURES if D.has_values(df, m.column)]
    if not D.has_values(df, "fid_delta") or len(present) < 2:
        raise Skip("needs ΔFID and at least one other paired quality measure (Δ class accuracy, precision, recall)")
    methods, names, calls = D.col(df, "method"), D.point_labels(df), Q.quality_calls(df)
    deltas = D.col(df, "fid_delta")
    order = sorted((i for i in range(len(df)) if methods[i] != "dense" and deltas[i] is not None),
                   key=lambda i: deltas[i])
    plt = S.setup()
    fig, axes = plt.subplots(1, len(present), sharey=True, squeeze=False,
                             figsize=(max(S.SINGLE, 1.7 * len(present) + 1.2), max(S.HEIGHT, 0.8 + 0.16 * len(order))))
    ys = list(range(len(order)))[::-1]           # the lowest ΔFID at the top
    for ax, m in zip(axes[0], present):
        v, lo, hi = D.col(df, m.column), D.col(df, f"{m.column}_ci_low"), D.col(df, f"{m.column}_ci_high")
        for y, i in zip(ys, order):
            if v[i] is None:
                continue
            c = CALL_COLOURS[calls[i].calls[m.name]]
            if lo[i] is not None and hi[i] is not None:
                ax.plot([lo[i], hi[i]], [y, y], color=c, lw=0.9, zorder=1)
            ax.scatter([v[i]], [y], color=c, s=14, zorder=2)
        ax.axvline(0.0, color=S.DENSE_COLOR, lw=0.6, ls=":")
        ax.set_xlabel(f"{m.header} ({'lower' if m.lower_is_better else 'higher'} is better)")
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels([names[i] for i in order])
    for call, c in CALL_COLOURS.items():
        if call is not None:
            axes[0][-1].scatter([], [], color=c, s=14, label=call)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return S.save_figure(fig, ctx.out_dir, "quality_vector",
                         "Each point's quality vector against dense (paired), one panel per measure; bars: "
                         "intervals coloured by what they resolve; ΔFID order, lowest at the top; dotted: dense."
                         f"{Q.excluded_text(df, calls, order, 1)}"
                         + (" Some intervals are not at 95% (methods.md)." if Q.level_note(df) else "")
                         + f" {ctx.caption(shown=ctx.rows(order))}")
