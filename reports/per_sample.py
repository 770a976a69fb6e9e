"""Points ranked on the per-sample measures against dense (same labels and seeds): token agreement, PSNR and SSIM to
dense with their intervals, Δ class accuracy with its interval. Each is a mean over images, so it resolves with far
fewer samples than FID: a --quick sweep already orders methods on something resolved. A figure (one panel per
measure, points in one order) and the ranking as a table."""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

from reports import data as D
from reports import style as S
from reports.context import Context, Skip
from reports.registry import register_report


class PerSample(NamedTuple):
    column: str
    low: Optional[str]            # interval columns (None: the measure has none)
    high: Optional[str]
    label: str
    spec: str
    dense: Optional[float]        # dense's own value (a reference line), None where it has none worth drawing


# every measure: higher is closer to dense
MEASURES = (
    PerSample("fidelity_token_agreement", None, None, "token agreement", ".3f", 1.0),
    PerSample("fidelity_psnr_db", "psnr_to_dense_ci_low", "psnr_to_dense_ci_high", "PSNR to dense (dB)", ".3g",
              None),
    PerSample("ssim_to_dense", "ssim_to_dense_ci_low", "ssim_to_dense_ci_high", "SSIM to dense", ".3f", 1.0),
    PerSample("class_accuracy_delta", "class_accuracy_delta_ci_low", "class_accuracy_delta_ci_high",
              "Δ class accuracy", "+.3f", 0.0),
)
ORDER_BY = ("ssim_to_dense", "fidelity_psnr_db", "class_accuracy_delta", "fidelity_token_agreement")


def _finite(v):
    return v if v is not None and math.isfinite(float(v)) else None


def _values(df, m: PerSample):
    """(value, low, high) per row; non-finite values (identical images) count as missing."""
    lows = D.col(df, m.low) if m.low else [None] * len(df)
    highs = D.col(df, m.high) if m.high else [None] * len(df)
    return [(_finite(v), _finite(lo), _finite(hi)) for v, lo, hi in zip(D.col(df, m.column), lows, highs)]


def ranking(df):
    """(measures present, {column: values}, order of the rows, the measure that orders them): non-dense rows with
    any per-sample value, best (closest to dense) first by the first of ORDER_BY that has intervals, else values."""
    methods = D.col(df, "method")
    present = [m for m in MEASURES if any(v[0] is not None and methods[i] != "dense"
                                          for i, v in enumerate(_values(df, m)))]
    if not present:
        raise Skip("no per-sample measures (" + ", ".join(m.column for m in MEASURES) + ")")
    values = {m.column: _values(df, m) for m in present}
    rows = [i for i in range(len(df)) if methods[i] != "dense" and any(values[c][i][0] is not None for c in values)]
    with_interval = [c for c in ORDER_BY if c in values and any(values[c][i][1] is not None for i in rows)]
    key = (with_interval or [c for c in ORDER_BY if c in values])[0]
    order = sorted(rows, key=lambda i: (values[key][i][0] is None, -(values[key][i][0] or 0.0)))
    return present, values, order, next(m for m in present if m.column == key)


def ranks(values, rows) -> dict:
    """{row: rank} by one measure's values (1 = highest, closest to dense; equal values share a rank); rows without
    a value get none."""
    have = [values[i][0] for i in rows if values[i][0] is not None]
    return {i: 1 + sum(v > values[i][0] for v in have) for i in rows if values[i][0] is not None}


def separated(values, order) -> List[Optional[bool]]:
    """Per position in `order`: whether its interval lies wholly above the next one's (None: no interval)."""
    out = []
    for a, b in zip(order, order[1:]):
        (_, alo, _), (_, _, bhi) = values[a], values[b]
        out.append(None if alo is None or bhi is None else alo > bhi)
    return out + [None]


def _labels(df, order) -> List[str]:
    """Point ids without the model when every shown point has the same one."""
    names, models = D.point_labels(df), D.col(df, "model")
    single = len({models[i] for i in order}) == 1
    return [names[i].split("/", 1)[1] if single and "/" in names[i] and names[i].startswith(f"{models[i]}/")
            else names[i] for i in order]


@register_report("per_sample", "points ranked on the per-sample measures (token agreement, PSNR and SSIM to dense, "
                 "Δ class accuracy), which resolve at a quick sweep's sample size", order=25)
def per_sample(ctx: Context) -> List[str]:
    df = ctx.df
    present, values, order, key = ranking(df)
    labels = _labels(df, order)
    methods = D.col(df, "method")
    colours = {m: S.color(k) for k, m in enumerate(dict.fromkeys(methods[i] for i in order))}
    plt = S.setup()
    fig, axes = plt.subplots(1, len(present), sharey=True, squeeze=False,
                             figsize=(max(S.SINGLE, 1.7 * len(present) + 1.2), max(S.HEIGHT, 0.8 + 0.16 * len(order))))
    ys = list(range(len(order)))[::-1]          # the best at the top
    for ax, m in zip(axes[0], present):
        for y, i in zip(ys, order):
            v, lo, hi = values[m.column][i]
            if v is None:
                continue
            c = colours[methods[i]]
            if lo is not None and hi is not None:
                ax.plot([lo, hi], [y, y], color=c, lw=0.8, zorder=1)
            ax.scatter([v], [y], color=c, s=14, zorder=2)
        if m.dense is not None:
            ax.axvline(m.dense, color=S.DENSE_COLOR, lw=0.6, ls=":")
        ax.set_xlabel(m.label + (" ▲" if m is key else ""))
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels(labels)
    caption = (f"Points ranked by {key.label} (▲), closest to dense at the top; one panel per per-sample measure, "
               f"paired with dense; bars: intervals; dotted: dense's own value. Means over images resolve at far "
               f"fewer samples than FID. {ctx.caption(shown=ctx.rows(order))}")
    files = S.save_figure(fig, ctx.out_dir, "per_sample_ranking", caption)

    header = ["Point"] + [f"{m.label}" + (" [CI]" if m.low else "") for m in present] + \
             [f"rank ({m.label})" for m in present] + [f"separated from the next ({key.label})"]
    rank = {m.column: ranks(values[m.column], order) for m in present}
    sep = separated(values[key.column], order)
    rows = []
    for pos, i in enumerate(order):
        cells = [labels[pos]]
        cells += [D.delta_text(*values[m.column][i], m.spec) if m.low else S.fmt(values[m.column][i][0], m.spec)
                  for m in present]
        cells += [str(rank[m.column].get(i, "-")) for m in present]
        cells.append("-" if sep[pos] is None else "yes" if sep[pos] else "no")
        rows.append(cells)
    files += S.save_table(ctx.out_dir, "per_sample_table", header, rows,
                          f"Points ranked on the per-sample measures (1 = closest to dense), in the order of "
                          f"{key.label}; 'separated' says whether a point's interval lies wholly above the next "
                          f"one's (the order between them is resolved). {ctx.caption(shown=ctx.rows(order))}")
    return files
