"""The field at equal compute (sweeps/field.yaml): every efficiency family on one figure (ΔFID against MACs saved,
paired speedup and KV-cache memory), and a table ranking the families at each MACs budget by paired speedup and ΔFID.

Families come from the methods themselves (`Method.family`, read through bench.registry.method_catalog): a family is
the method whose family is its own name; variants and ablations (family: their parent's) and compositions are not
families of the field. A row's saving is 1 − macs_ratio (transformer MACs of all its samples against dense, by
formula). At a budget b a family is placed by its row within ±WINDOW (1 point) of b — the sweep gives every family
a setting of its own for each budget (a match_saved-style parameter, or a grid value measured to land there), so
the families compared at b are at equal compute by construction. A family with no row there is listed as unable to
reach b (every row saves less, or more) or as having no setting within the window (its nearest saving), so every
family appears at every budget. Dense is the reference family (0% saved, speedup 1, ΔFID 0) and is ranked with the
others: a method that is slower or worse than doing nothing ranks below it. Ranks follow the point estimates; the
intervals beside them say which differences are resolved."""
from __future__ import annotations

from typing import List, Optional

from bench.registry import method_catalog
from reports import data as D
from reports import quality_vector as Q
from reports import style as S
from reports.context import Context, Skip
from reports.pareto import resolved_legend_entries, resolved_markers
from reports.registry import register_report

BUDGETS = (0.10, 0.20, 0.30, 0.40)
WINDOW = 0.01
TOLERANCE = 1e-9    # a row at exactly ±WINDOW is inside (savings are rounded to 6 decimals)


def is_family(method: Optional[str]) -> bool:
    """A method of the field: one whose family is its own name. A name no method registers (a row of an older or a
    plugin method) is a family of its own, shown rather than dropped."""
    if not method:
        return False
    info = method_catalog().get(method)
    return info is None or info.family == method


def family_order(methods) -> List[str]:
    """The families among `methods`, dense first, then by name (which fixes each one's colour and marker)."""
    fams = sorted({m for m in methods if is_family(m)})
    return (["dense"] if "dense" in fams else []) + [f for f in fams if f != "dense"]


def family_name(m: str) -> str:
    return D.nice_method(m)


def families(df) -> List[str]:
    """The efficiency families (dense aside) the rows hold as points of their own: rows with a sweep parent (a twin
    matched to another point's MACs) do not make a family."""
    own = [m for m, p in zip(D.col(df, "method"), D.col(df, "sweep_parent")) if not p]
    return [f for f in family_order(own) if f != "dense"]


def _rows(ctx: Context) -> List[dict]:
    df = ctx.df
    methods = D.col(df, "method")
    fams = families(df)
    if len(fams) < 2:
        found = ", ".join(family_name(f) for f in fams) or "none"
        raise Skip(f"needs at least two efficiency families besides dense, each a point of its own (found: {found}; "
                   f"FLOP-matched twins such as a DMoE point's Pruned-FFN are controls, not families); the field "
                   f"sweep compares them")
    if not D.has_values(df, "macs_ratio"):
        raise Skip("no macs_ratio column: MACs saved cannot be placed on the budgets")
    sp, dq = D.paired_intervals(df)
    ratio, labels = D.col(df, "macs_ratio"), D.col(df, "method_label")
    flags, calls, vector = Q.resolved_flags(df), Q.quality_calls(df), Q.vector_cells(df)
    kv = kv_percent(df)
    out = []
    for i, m in enumerate(methods):
        if not is_family(m) or ratio[i] is None:
            continue
        dense = m == "dense"
        out.append(dict(pos=i, method=m, label=labels[i] or m, saved=0.0 if dense else 1 - ratio[i],
                        sp=(1.0, None, None) if dense else sp[i], dq=(0.0, None, None) if dense else dq[i],
                        kv=kv[i], resolved=flags[i], call=calls[i], vector=vector[i]))
    return out


def kv_percent(df) -> List[Optional[float]]:
    """Per row: K/V bytes held at the largest scale (kv_cache_bytes_peak, per image) in % of its model's dense
    row's; None where the row or its dense row lacks the column."""
    out = []
    for m, v in zip(D.col(df, "model"), D.col(df, "kv_cache_bytes_peak")):
        dense = D.dense_value(df, m, "kv_cache_bytes_peak")
        out.append(None if v is None or not dense else 100.0 * float(v) / dense)
    return out


def ranking(rows: List[dict], budget: float) -> List[dict]:
    """Per family in the rows (dense included): its row within ±WINDOW of this budget (the nearest), or None with
    why — `reach`: 'below' (every row saves less), 'above' (every row saves more) or 'gap' (rows on both sides, none
    within the window) — and the nearest saving; ranks by speedup (descending) and ΔFID (ascending) among the
    placed rows."""
    out = []
    for fam in family_order(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == fam]
        if fam == "dense":
            out.append(dict(family=fam, row=mine[-1], nearest=0.0, reach=None))
            continue
        near = min(mine, key=lambda r: abs(r["saved"] - budget))
        if abs(near["saved"] - budget) <= WINDOW + TOLERANCE:
            out.append(dict(family=fam, row=near, nearest=near["saved"], reach=None))
            continue
        saved = [r["saved"] for r in mine]
        reach = "below" if max(saved) < budget else "above" if min(saved) > budget else "gap"
        out.append(dict(family=fam, row=None, nearest=near["saved"], reach=reach,
                        span=(min(saved), max(saved))))
    ranked = [e for e in out if e["row"] is not None and e["row"]["sp"][0] is not None
              and e["row"]["dq"][0] is not None]
    for key, rev, name in ((lambda e: e["row"]["sp"][0], True, "rank_speed"),
                           (lambda e: e["row"]["dq"][0], False, "rank_fid")):
        for k, e in enumerate(sorted(ranked, key=key, reverse=rev)):
            e[name] = k + 1
    return sorted(out, key=lambda e: (e.get("rank_speed") is None, e.get("rank_speed") or 0, e["family"]))


def unplaced_text(e: dict) -> str:
    """Why a family has no row at a budget, for the ranking table."""
    lo, hi = (100 * x for x in e["span"])
    if e["reach"] == "below":
        return f"cannot reach (its rows save at most {hi:.1f}%)"
    if e["reach"] == "above":
        return f"cannot reach (its rows save at least {lo:.1f}%)"
    return f"no setting within ±{100 * WINDOW:.0f} point (nearest {100 * e['nearest']:.1f}%)"


PANELS = (("saved", "MACs saved (%)", lambda r: 100 * r["saved"]),
          ("speed", "speedup (×, paired)", lambda r: r["sp"][0]),
          ("memory", "KV cache (% of dense)", lambda r: r["kv"]))


@register_report("field", "every family at equal compute: ΔFID against MACs saved, speed and KV memory; ranking "
                 "per MACs budget", order=35, overview=True)
def field(ctx: Context) -> List[str]:
    rows = _rows(ctx)
    fams = family_order(r["method"] for r in rows)
    plt = S.setup()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(S.DOUBLE, S.HEIGHT + 0.4), sharey=True)
    marked = any(r["resolved"] is not None for r in rows)
    kinds = set()
    i_color = 0
    for fam in fams:
        mine = sorted((r for r in rows if r["method"] == fam), key=lambda r: r["saved"])
        if fam == "dense":
            c, m, s = S.DENSE_COLOR, "*", 70
        else:
            c, m, s = S.color(i_color), S.marker(i_color), 20
            i_color += 1
        for ax, (panel, _, x) in zip(axes, PANELS):
            pts = [r for r in mine if x(r) is not None and r["dq"][0] is not None]
            if not pts:
                continue
            label = family_name(fam) if ax is axes[0] else None
            for r in pts:
                d, lo, hi = r["dq"]
                if lo is not None and hi is not None:
                    ax.plot([x(r)] * 2, [lo, hi], color=c, lw=0.7, alpha=0.6, zorder=1)
            if fam == "dense":
                ax.scatter([x(r) for r in pts], [r["dq"][0] for r in pts], color=c, marker=m, s=s, zorder=3,
                           label=label, edgecolors="none")
            else:   # filled where ΔFID is resolved, hollow where not (every point filled on rows that do not say)
                kinds |= resolved_markers(ax, [x(r) for r in pts], [r["dq"][0] for r in pts], range(len(pts)),
                                          [r["resolved"] for r in pts], c, m, s, label, marked)
            if len(pts) > 1 and fam != "dense" and panel == "saved":
                ax.plot([x(r) for r in pts], [r["dq"][0] for r in pts], color=c, lw=0.7, alpha=0.5, zorder=2)
    a1, a2, a3 = axes
    for b in BUDGETS:
        a1.axvline(100 * b, color="#aaaaaa", lw=0.6, ls="--", zorder=0)
    for ax, (_, xlabel, _) in zip(axes, PANELS):
        ax.axhline(0.0, color="#888888", lw=0.6, ls=":")
        ax.set_xlabel(xlabel)
    a2.axvline(1.0, color="#888888", lw=0.6, ls=":")
    a3.axvline(100.0, color="#888888", lw=0.6, ls=":")
    has_kv = any(r["kv"] is not None for r in rows)
    if not has_kv:
        a3.text(0.5, 0.5, "no kv_cache_bytes_peak\nin these rows", transform=a3.transAxes, ha="center",
                va="center", fontsize=7, color="#666666")
    a1.set_ylabel("ΔFID vs dense (paired, 95% CI)")
    if marked:
        resolved_legend_entries(a1, ctx.df, kinds)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 1.16), ncol=5, handlelength=1.0)
    files = S.save_figure(fig, ctx.out_dir, "field_pareto",
                          f"Every family: ΔFID against transformer MACs saved (dashed: the budgets, ±{100 * WINDOW:.0f} "
                          "point), paired speedup and KV-cache bytes per image at the largest scale (% of dense); "
                          "bars: 95% intervals." + (" Filled: ΔFID resolved; hollow: not." if marked else "") + " "
                          + ctx.caption(shown=ctx.rows([r["pos"] for r in rows if r["dq"][0] is not None])))
    header, table, listed = ranking_table(rows)
    files += S.save_table(ctx.out_dir, "field_ranking", header, table,
                          f"Each family at each budget: its row within ±{100 * WINDOW:.0f} point of MACs saved (else "
                          "why not), ranked by paired speedup (1 = fastest) and ΔFID (1 = lowest) on point "
                          "estimates; dense is the 0% reference. KV: cache bytes at the largest scale, % of dense. "
                          f"'Quality vector': measures resolved better or worse than dense.{Q.level_note(ctx.df)} "
                          + ctx.caption(shown=ctx.rows(listed)))
    return files


def ranking_table(rows: List[dict]):
    """(header, table rows, row positions listed) of the ranking: every family at every budget."""
    header = ["Budget", "Family", "Setting", "MACs saved", "Speedup [95% CI]", "KV", *Q.vector_header(),
              "Rank (speed)", "Rank (ΔFID)", "Quality vector"]
    blank = [S.MISSING] * len(Q.MEASURES)
    table, listed = [], []
    for b in BUDGETS:
        for e in ranking(rows, b):
            r = e["row"]
            if r is None:
                table.append([f"{100 * b:.0f}%", family_name(e["family"]), unplaced_text(e), *[S.MISSING] * 3,
                              *blank, *[S.MISSING] * 3])
                continue
            listed.append(r["pos"])
            kv = S.MISSING if r["kv"] is None else f"{r['kv']:.0f}%"
            table.append([f"{100 * b:.0f}%", family_name(e["family"]), r["label"], f"{100 * r['saved']:.1f}%",
                          D.speedup_text(*r["sp"]), kv, *r["vector"], str(e.get("rank_speed", S.MISSING)),
                          str(e.get("rank_fid", S.MISSING)),
                          "dense" if e["family"] == "dense" else r["call"].summary])
    return header, table, listed
