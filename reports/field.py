"""The field at equal compute (sweeps/field.yaml): every efficiency family on one Pareto figure, and a table ranking
the families at each MACs budget by paired speedup and by ΔFID.

A row's saving is 1 − macs_ratio (transformer MACs of all its samples against dense, by formula). At a budget b a
family is represented by its row nearest to b within ±WINDOW; a family with no row there is listed as out of reach
(with its nearest saving), so every family appears at every budget. Dense is the reference family (0% saved,
speedup 1, ΔFID 0) and is ranked with the others: a method that is slower or worse than doing nothing ranks below it.
Ranks follow the point estimates; the intervals beside them say which differences are resolved."""
from __future__ import annotations

from typing import List

from reports import data as D
from reports import quality_vector as Q
from reports import style as S
from reports.context import Context, Skip
from reports.pareto import resolved_legend_entries, resolved_markers
from reports.registry import register_report

FAMILIES = ("dense", "dmoe", "actvar", "pruned-ffn", "fixed-tokens", "fastvar", "skip-scales", "cfg-skip", "skipvar")
NAMES = {"fastvar": "FastVAR", "skip-scales": "Skip scales (SkipVAR static)",
         "cfg-skip": "CFG-branch skip (SkipVAR static)", "skipvar": "SkipVAR (adaptive)"}
BUDGETS = (0.10, 0.20, 0.30, 0.40)
WINDOW = 0.05


def family_name(m: str) -> str:
    return NAMES.get(m, D.nice_method(m))


def families(df) -> List[str]:
    """The efficiency families (FAMILIES, dense aside) the rows hold as points of their own: rows with a sweep
    parent (a twin matched to another point's MACs) do not make a family."""
    parents = D.col(df, "sweep_parent")
    return [f for f in FAMILIES[1:] if any(m == f and not p for m, p in zip(D.col(df, "method"), parents))]


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
    out = []
    for i, m in enumerate(methods):
        if m not in FAMILIES or ratio[i] is None:
            continue
        dense = m == "dense"
        out.append(dict(pos=i, method=m, label=labels[i] or m, saved=0.0 if dense else 1 - ratio[i],
                        sp=(1.0, None, None) if dense else sp[i], dq=(0.0, None, None) if dense else dq[i],
                        resolved=flags[i], call=calls[i], vector=vector[i]))
    return out


def ranking(rows: List[dict], budget: float) -> List[dict]:
    """Per family (all of FAMILIES present in the rows, dense included): the chosen row at this budget, or None
    with the nearest saving; ranks by speedup (descending) and ΔFID (ascending) among the chosen rows."""
    out = []
    for fam in FAMILIES:
        mine = [r for r in rows if r["method"] == fam]
        if not mine:
            continue
        if fam == "dense":
            out.append(dict(family=fam, row=mine[-1], nearest=0.0))
            continue
        near = min(mine, key=lambda r: abs(r["saved"] - budget))
        inside = abs(near["saved"] - budget) <= WINDOW + 1e-12
        out.append(dict(family=fam, row=near if inside else None, nearest=near["saved"]))
    ranked = [e for e in out if e["row"] is not None and e["row"]["sp"][0] is not None
              and e["row"]["dq"][0] is not None]
    for key, rev, name in ((lambda e: e["row"]["sp"][0], True, "rank_speed"),
                           (lambda e: e["row"]["dq"][0], False, "rank_fid")):
        for k, e in enumerate(sorted(ranked, key=key, reverse=rev)):
            e[name] = k + 1
    return sorted(out, key=lambda e: (e.get("rank_speed") is None, e.get("rank_speed") or 0, e["family"]))


@register_report("field", "every family at equal compute: Pareto figure and ranking per MACs budget",
                 order=35, overview=True)
def field(ctx: Context) -> List[str]:
    rows = _rows(ctx)
    fams = [f for f in FAMILIES if any(r["method"] == f for r in rows)]
    plt = S.setup()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(S.DOUBLE, S.HEIGHT + 0.4))
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
        for ax, x in ((a1, lambda r: 100 * r["saved"]), (a2, lambda r: r["sp"][0])):
            pts = [r for r in mine if x(r) is not None and r["dq"][0] is not None]
            if not pts:
                continue
            for r in pts:
                d, lo, hi = r["dq"]
                if lo is not None and hi is not None:
                    ax.plot([x(r)] * 2, [lo, hi], color=c, lw=0.7, alpha=0.6, zorder=1)
            if fam == "dense":
                ax.scatter([x(r) for r in pts], [r["dq"][0] for r in pts], color=c, marker=m, s=s, zorder=3,
                           label=family_name(fam) if ax is a1 else None, edgecolors="none")
            else:   # filled where ΔFID is resolved, hollow where not (every point filled on rows that do not say)
                kinds |= resolved_markers(ax, [x(r) for r in pts], [r["dq"][0] for r in pts], range(len(pts)),
                                          [r["resolved"] for r in pts], c, m, s,
                                          family_name(fam) if ax is a1 else None, marked)
            if len(pts) > 1 and fam != "dense" and ax is a1:
                ax.plot([x(r) for r in pts], [r["dq"][0] for r in pts], color=c, lw=0.7, alpha=0.5, zorder=2)
    for b in BUDGETS:
        a1.axvline(100 * b, color="#aaaaaa", lw=0.6, ls="--", zorder=0)
    for ax in (a1, a2):
        ax.axhline(0.0, color="#888888", lw=0.6, ls=":")
    a2.axvline(1.0, color="#888888", lw=0.6, ls=":")
    a1.set_xlabel("transformer MACs saved vs dense (%)")
    a2.set_xlabel("speedup over dense (×, paired)")
    a1.set_ylabel("ΔFID vs dense (paired, 95% CI)")
    if marked:
        resolved_legend_entries(a1, ctx.df, kinds)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 1.12), ncol=5, handlelength=1.0)
    files = S.save_figure(fig, ctx.out_dir, "field_pareto",
                          "Every family: ΔFID against MACs saved (left; dashed: the budgets, ±5 points) and against "
                          "paired speedup (right); bars: 95% intervals."
                          + (" Filled: ΔFID resolved; hollow: not." if marked else "") + " "
                          + ctx.caption(shown=ctx.rows([r["pos"] for r in rows if r["dq"][0] is not None])))

    header = ["Budget", "Family", "Setting", "MACs saved", "Speedup [95% CI]", *Q.vector_header(), "Rank (speed)",
              "Rank (ΔFID)", "Quality vector"]
    blank = ["-"] * len(Q.MEASURES)
    table, listed = [], []
    for b in BUDGETS:
        for e in ranking(rows, b):
            r = e["row"]
            if r is not None:
                listed.append(r["pos"])
            if r is None:
                table.append([f"{100 * b:.0f}%", family_name(e["family"]),
                              f"out of reach (nearest {100 * e['nearest']:.0f}%)", "-", "-", *blank, "-", "-", "-"])
                continue
            call = r["call"]
            table.append([f"{100 * b:.0f}%", family_name(e["family"]), r["label"], f"{100 * r['saved']:.1f}%",
                          D.speedup_text(*r["sp"]), *r["vector"], str(e.get("rank_speed", "-")),
                          str(e.get("rank_fid", "-")),
                          "dense" if e["family"] == "dense" else call.summary])
    files += S.save_table(ctx.out_dir, "field_ranking", header, table,
                          f"Each family at each budget: its row nearest the budget within ±{100 * WINDOW:.0f} points "
                          "of MACs saved (else out of reach), ranked by paired speedup (1 = fastest) and ΔFID "
                          "(1 = lowest) on point estimates; dense is the 0% reference. 'Quality vector': measures "
                          f"resolved better or worse than dense.{Q.level_note(ctx.df)} "
                          + ctx.caption(shown=ctx.rows(listed)))
    return files
