"""The headline figures in paired terms: speedup (x, with interval) against ΔFID (with interval), dense at (1, 0),
each point marked front / not resolved / dominated by reports.data.RESOLUTION_RULE, and the same as a table."""
from __future__ import annotations

from typing import List

from reports import data as D
from reports import style as S
from reports.context import Context, Skip
from reports.registry import register_report

STATUS_STYLE = {  # status -> (filled, alpha, legend text)
    "front": (True, 1.0, "front"),
    "not resolved": (True, 0.35, "not resolved"),
    "dominated": (False, 1.0, "dominated (resolved)"),
}


def _paired(ctx: Context):
    """(rows, speedup intervals, ΔFID intervals, resolution status) of the context; Skip without paired columns."""
    if not D.has_paired(ctx.df):
        raise Skip("no paired columns (speedup, fid_delta): rows from before paired measurement")
    sp, dq = D.paired_intervals(ctx.df)
    return ctx.df, sp, dq, D.resolution(ctx.df)


def _caption_rule(ctx: Context, status) -> str:
    missing = sum(st is None for st in status)
    shown = (f" {len(status) - missing} of the {len(status)} runs have every paired value and interval; the other "
             f"{missing} are incomplete (listed in the table, not drawn)." if missing else "")
    return f"Resolution rule: {D.RESOLUTION_RULE}.{shown} {ctx.caption()}"


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
            filled, alpha, _ = STATUS_STYLE[status[i]]
            # max(0, ...): matplotlib refuses a negative bar, which an estimate outside its own interval would give
            ax.errorbar([s], [d], xerr=[[max(0.0, s - slo)], [max(0.0, shi - s)]],
                        yerr=[[max(0.0, d - dlo)], [max(0.0, dhi - d)]], fmt="none",
                        ecolor=c, elinewidth=0.7, alpha=max(alpha, 0.5), zorder=2)
            ax.scatter([s], [d], marker=m, s=22, zorder=3, alpha=alpha,
                       facecolors=c if filled else "none", edgecolors=c, linewidths=0.9)
        ax.scatter([], [], marker=m, color=c, s=22, label=_label(key, order))
    for st, (filled, alpha, text) in STATUS_STYLE.items():   # legend entries for the marking
        if st in status:
            ax.scatter([], [], marker="o", s=22, alpha=alpha, facecolors="#555555" if filled else "none",
                       edgecolors="#555555", label=text)
    ax.set_xlabel("speedup over dense (×, paired, 95% CI)")
    ax.set_ylabel("ΔFID vs dense (paired, 95% CI)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), handlelength=1.2)
    return S.save_figure(fig, ctx.out_dir, "paired_tradeoff",
                         "Speedup against ΔFID, both paired with dense inside each trial; dense sits at (1, 0) "
                         "(grey band: dense timed against itself, the timing noise floor). Filled points are on the "
                         "front, faded ones are not resolved, hollow ones are dominated with separated intervals. "
                         + _caption_rule(ctx, status))


def _label(key, order) -> str:
    """series_label of (method, entry, twin), with the model when the figure holds several."""
    label = D.series_label(key[:3], [k[:3] for k in order])
    if key[0] == "dense":   # every model's dense sits at (1, 0): one legend entry
        return label if next(k for k in order if k[0] == "dense") == key else "_nolegend_"
    return label + (f" — {key[3]}" if key[3] else "")


@register_report("paired_table", "every point in paired terms: speedup, ΔFID, intervals, status",
                 order=20, overview=True)
def paired_table(ctx: Context) -> List[str]:
    df, sp, dq, status = _paired(ctx)
    labels, methods = D.col(df, "method_label"), D.col(df, "method")
    ratio, eff = D.col(df, "macs_ratio"), D.col(df, "time_flop_efficiency")
    executed = D.col(df, "macs_executed_ratio")
    pct, need, noisy = D.col(df, "fid_delta_pct"), D.col(df, "fid_delta_samples_for_1pct"), D.col(df, "timing_noisy")
    models = D.col(df, "model")
    header = ["Method", "Model", "MACs / dense", "MACs run / dense", "Speedup [95% CI]", "Time saved / FLOPs saved",
              "ΔFID [95% CI]", "ΔFID %", "N for ±1% ΔFID (est.)", "Status", "Timing"]
    idx = sorted(range(len(status)), key=lambda i: (status[i] is None, str(models[i]), methods[i] != "dense",
                                                    -(sp[i][0] or 0)))
    rows = []
    for i in idx:
        rows.append([labels[i] or methods[i], models[i], S.fmt(ratio[i], ".3f"), S.fmt(executed[i], ".3f"),
                     D.speedup_text(*sp[i]),
                     S.fmt(eff[i], ".2f"), D.delta_text(*dq[i]), S.fmt(pct[i], "+.1f"),
                     "-" if need[i] is None else f"{int(need[i]):,}", status[i] or "incomplete",
                     "noisy" if noisy[i] else "ok"])
    return S.save_table(ctx.out_dir, "paired_summary", header, rows,
                        "Every point in paired terms against dense. 'MACs / dense' is the method's routed work (what "
                        "the papers count), 'MACs run / dense' what the kernels executed (expert layers: every "
                        "expert on masked-dense calls). 'N for ±1% ΔFID' estimates the samples per "
                        "point at which the ΔFID interval's half-width would reach 1% of dense FID (1/√N scaling "
                        "of this run's paired bootstrap; an estimate). " + _caption_rule(ctx, status))
