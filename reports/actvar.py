"""ActVAR tables from the table: activation rates (table 2), components (3), dynamic vs fixed tokens (4), dynamic vs
static weights (5) and which scales (6). FLOPs saving is against the same model's dense row of the sweep."""
from __future__ import annotations

from typing import Callable, List, Sequence

from reports import data as D
from reports import style as S
from reports.context import Context, Skip
from reports.registry import register_report

HEADER = ["FLOPs saving", "Speedup [95% CI]", "FID [95% CI]", "ΔFID [95% CI]", "IS"]


def _rate(v) -> str:
    v = D.json_value(v)
    if v is None:
        return "-"
    return "/".join(f"{100 * float(x):.0f}%" for x in v) if isinstance(v, list) else f"{100 * float(v):.0f}%"


def rates_text(token_rate, weight_rate, n_scales: int = 2) -> str:
    """(α, β; γ) as in ActVAR table 2: token rates of the two sparse scales; FFN weight rate."""
    t = D.json_value(token_rate)
    ts = [t] * n_scales if not isinstance(t, list) else t
    toks = ", ".join(_rate(x) for x in ts) if t is not None else "100%"
    return f"({toks}; {_rate(weight_rate) if D.json_value(weight_rate) is not None else '100%'})"


def _metrics(df, i, column, fids, lo, hi, isc, macs, models, sp, dq) -> List[str]:
    dm = D.dense_value(df, models[i], column)
    save = f"{100 * (1 - macs[i] / dm):.1f}%" if dm and macs[i] is not None else "-"
    return [save, D.speedup_text(*sp[i]), S.fid_text(fids[i], lo[i], hi[i]), D.delta_text(*dq[i]),
            S.fmt(isc[i], ".4g")]


def method_table(ctx: Context, stem: str, methods: Sequence[str], first_cols: Sequence[str],
                 describe: Callable[[int, list], List[str]], caption: str, need: Sequence[str] = (),
                 sort_key=None) -> List[str]:
    df = ctx.df
    if "method" not in df.columns:
        raise Skip("no method column")
    present = set(D.col(df, "method"))
    missing = [m for m in need if m not in present]
    if missing:
        raise Skip(f"needs rows of {', '.join(missing)}")
    column, desc = D.flops_column(df, ctx.flops)
    meth = D.col(df, "method")
    idx = [i for i, m in enumerate(meth) if m in methods]
    if sort_key:
        idx = sorted(idx, key=lambda i: sort_key(i))
    cols = dict(fids=D.col(df, "fid"), lo=D.col(df, "fid_ci_low"), hi=D.col(df, "fid_ci_high"),
                isc=D.col(df, "isc_mean"), macs=D.col(df, column), models=D.col(df, "model"))
    cols["sp"], cols["dq"] = D.paired_intervals(df)
    rows = []
    dense = [i for i, m in enumerate(meth) if m == "dense"]
    for i in dense[-1:]:
        rows.append([D.nice_method("dense")] + [""] * (len(first_cols) - 1) + _metrics(df, i, column, **cols))
    for i in idx:
        rows.append(describe(i, meth) + _metrics(df, i, column, **cols))
    return S.save_table(ctx.out_dir, stem, list(first_cols) + HEADER, rows,
                        f"{caption} {ctx.caption(desc, ctx.rows(dense[-1:], idx))}")


def training_text(steps2) -> str:
    """Which of ActVAR's two stages made the artifact (stage 2 fine-tunes the weights; steps2=0 skips it)."""
    s = D.json_value(steps2)
    return "-" if s is None else ("stages 1+2" if int(s) > 0 else "stage 1 only")


@register_report("activation_rates", "ActVAR activation rates (table 2)", order=120)
def activation_rates(ctx: Context) -> List[str]:
    df = ctx.df
    tr, wr, sc = D.col(df, "param_token_rate"), D.col(df, "param_weight_rate"), D.col(df, "param_scales")
    st = D.col(df, "param_steps2")
    column, _ = D.flops_column(df, ctx.flops)
    macs = D.col(df, column)
    return method_table(ctx, "actvar_activation_rates", ["actvar"], ["Activation rates (α, β; γ)", "Scales",
                                                                    "Training"],
                        lambda i, m: [rates_text(tr[i], wr[i]), D.scales_text(sc[i]), training_text(st[i])],
                        "ActVAR with varying token (α, β) and FFN weight (γ) activation rates (cf. ActVAR table 2).",
                        need=["actvar"], sort_key=lambda i: -(macs[i] or 0))


@register_report("components", "ActVAR components (table 3)", order=130)
def components(ctx: Context) -> List[str]:
    df = ctx.df
    tr, wr, st = D.col(df, "param_token_rate"), D.col(df, "param_weight_rate"), D.col(df, "param_steps2")
    names = D.paper_rows("actvar-table-3")
    present = set(D.col(df, "method")) if "method" in df.columns else set()
    if not ({"actvar-tokens", "actvar-experts"} & present) or "actvar" not in present:
        raise Skip("needs actvar and at least one of actvar-tokens / actvar-experts")
    order = {"actvar-tokens": 0, "actvar-experts": 1, "actvar": 2}
    return method_table(ctx, "actvar_components", list(names), ["Module", "Rates (α, β; γ)", "Training"],
                        lambda i, m: [names[m[i]], rates_text(tr[i], wr[i]), training_text(st[i])],
                        "Ablation of ActVAR's components: DW dynamic weight activation, AT adaptive token activation "
                        "(cf. ActVAR table 3).", sort_key=lambda i: (order.get(D.col(df, "method")[i], 9), i))


@register_report("tokens_vs_fixed", "dynamic vs fixed tokens (ActVAR table 4)", order=140)
def token_comparison(ctx: Context) -> List[str]:
    df = ctx.df
    tr, crit = D.col(df, "param_token_rate"), D.col(df, "param_criterion")
    names = {"fixed-tokens": D.nice_method("fixed-tokens"), **D.paper_rows("actvar-table-4")}
    return method_table(ctx, "actvar_tokens_vs_fixed", list(names), ["Module", "Token rates"],
                        lambda i, m: [names[m[i]] + (f" ({crit[i]})" if m[i] == "fixed-tokens" and crit[i] else ""),
                                      _rate(tr[i])],
                        "Dynamic token activation against fixed token pruning keeping the same number of tokens "
                        "(cf. ActVAR table 4).", need=["fixed-tokens"])


@register_report("weights_vs_static", "dynamic vs static weights (ActVAR table 5)", order=150)
def weight_comparison(ctx: Context) -> List[str]:
    df = ctx.df
    wr, frac = D.col(df, "param_weight_rate"), D.col(df, "prune_fraction_effective")
    present = set(D.col(df, "method")) if "method" in df.columns else set()
    if "pruned-ffn" not in present or not ({"actvar-experts", "actvar"} & present):
        raise Skip("needs pruned-ffn and actvar-experts or actvar rows")
    names = D.paper_rows("actvar-table-5")
    return method_table(ctx, "actvar_weights_vs_static", list(names), ["Method", "Weight rate"],
                        lambda i, m: [names[m[i]], _rate(wr[i]) if m[i] != "pruned-ffn" else
                                      (_rate(1 - frac[i]) if frac[i] is not None else "-")],
                        "Dynamic weight activation against static weight pruning at the same weight rate "
                        "(cf. ActVAR table 5).")


@register_report("actvar_scales", "ActVAR scales (table 6)", order=160)
def scales_table(ctx: Context) -> List[str]:
    df = ctx.df
    meth = D.col(df, "method")
    sc = D.col(df, "param_scales")
    sets = {D.scales_text(sc[i]) for i, m in enumerate(meth) if m == "actvar"}
    if len(sets) < 2:
        raise Skip("fewer than two sets of ActVAR scales")
    tr, wr = D.col(df, "param_token_rate"), D.col(df, "param_weight_rate")
    return method_table(ctx, "actvar_scales", ["actvar"], ["Activation scales", "Rates (α, β; γ)"],
                        lambda i, m: [D.scales_text(sc[i]), rates_text(tr[i], wr[i])],
                        "ActVAR applied at different scales (1-based) with the same activation rates "
                        "(cf. ActVAR table 6).", sort_key=lambda i: D.scales_text(sc[i]))
