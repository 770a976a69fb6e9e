"""DMoE-VAR figures from the table: the τ trade-off (fig. 3 curve), active experts per scale (fig. 2b), expert
allocation maps (fig. 12), expert size (fig. 8a), per-scale sensitivity (fig. 4) and model depth (fig. 5)."""
from __future__ import annotations

import json
from collections import Counter
from typing import List

from reports import data as D
from reports import style as S
from reports.context import Context, Skip
from reports.registry import register_report
from reports.pareto import _intervals, fid_label
from reports.protocol import extractor_sentence


def _dmoe(ctx: Context):
    df = ctx.df
    if "method" not in df.columns:
        raise Skip("no method column")
    d = df[df["method"] == "dmoe"]
    if d.empty:
        raise Skip("no dmoe rows")
    return d


def _with_dense(ctx: Context, d):
    """d's rows and the dense rows of d's models: what a DMoE figure draws, for its caption."""
    dn = D.dense_rows(ctx.df)
    return ctx.rows(d, dn[dn["model"].isin(set(D.col(d, "model")))] if "model" in dn.columns else dn)


def _rel(values, ref):
    return [None if v is None or not ref else 100.0 * v / ref for v in values]


@register_report("tau", "τ trade-off curve with FID intervals", order=60)
def tau_curve(ctx: Context) -> List[str]:
    d = _dmoe(ctx)
    taus = [D.tau_scalar(v) for v in D.col(d, "param_tau")]
    if len({t for t in taus if t is not None}) < 2:
        raise Skip("fewer than two τ values among the dmoe rows")
    column, desc = D.flops_column(ctx.df, ctx.flops)
    keys = list(zip(D.col(d, "model"), [D.scales_text(v) for v in D.col(d, "param_moe_scales")],
                    D.col(d, "param_expert_size")))
    groups = list(dict.fromkeys(keys))
    fids, lo, hi = D.col(d, "fid"), D.col(d, "fid_ci_low"), D.col(d, "fid_ci_high")
    macs = D.col(d, column)
    rel, kind = D.relative_time(d, ctx.df)
    plt = S.setup()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(S.SINGLE, 3.6), sharex=True)
    for gi, g in enumerate(groups):
        idx = sorted((i for i, k in enumerate(keys) if k == g and taus[i] is not None), key=lambda i: taus[i])
        model, scales, esize = g
        label = f"scales {scales}, e={S.fmt(esize, 'g')}" + (f", {model}" if len({k[0] for k in groups}) > 1 else "")
        c = S.color(gi)
        a1.plot([taus[i] for i in idx], [fids[i] for i in idx], marker=S.marker(gi), color=c, label=label)
        _intervals(a1, [taus[i] for i in idx], [lo[i] for i in idx], [hi[i] for i in idx], c)
        dm = D.dense_value(ctx.df, model, column)
        a2.plot([taus[i] for i in idx], _rel([macs[i] for i in idx], dm), marker=S.marker(gi), color=c,
                label=f"MACs ({label})" if len(groups) > 1 else "MACs")
        tname = "time (paired)" if kind == "paired" else "time (UNPAIRED)"
        a2.plot([taus[i] for i in idx], _rel([rel[i] for i in idx], 1.0), marker=S.marker(gi), color=c,
                ls="--", label=f"{tname} ({label})" if len(groups) > 1 else tname)
    for model in sorted({k[0] for k in groups}):
        f = D.dense_value(ctx.df, model, "fid")
        if f is not None:
            a1.axhline(f, color=S.DENSE_COLOR, lw=0.8, ls=":", label="dense" if model == groups[0][0] else None)
    a2.axhline(100, color=S.DENSE_COLOR, lw=0.8, ls=":")
    a1.set_ylabel(fid_label(ctx.df))
    a2.set_ylabel("% of dense")
    a2.set_xlabel("threshold τ (1 = all experts)")
    for ax in (a1, a2):
        S.tidy_ticks(ax, "y")
    a1.legend(loc="best")
    a2.legend(loc="best")
    fig.align_ylabels()
    return S.save_figure(fig, ctx.out_dir, "tau_tradeoff", "DMoE-VAR threshold τ: FID with 95% intervals (top), "
                         f"MACs and time per image as % of dense (bottom; time: "
                         f"{'1 / paired speedup' if kind == 'paired' else 'absolute times of different trials'}); "
                         f"dotted: dense.{extractor_sentence(ctx.df)} "
                         f"{ctx.caption(desc, _with_dense(ctx, d[[t is not None for t in taus]]))}")


def _main_scale_set(d):
    sets = [json.dumps(D.json_value(v)) for v in D.col(d, "moe_scales")] if D.has_values(d, "moe_scales") else \
        [json.dumps(D.json_value(v)) for v in D.col(d, "param_moe_scales")]
    common = Counter(sets).most_common(1)[0][0]
    return d[[s == common for s in sets]]


@register_report("active_experts", "active experts per token per scale (DMoE fig. 2b)", order=70)
def active_experts(ctx: Context) -> List[str]:
    d = _dmoe(ctx)
    if not D.has_values(d, "active_experts_per_scale"):
        raise Skip("no active_experts_per_scale column")
    files = []
    for model in sorted({m for m in D.col(d, "model") if m}):
        dm = _main_scale_set(d[d["model"] == model])
        rows = [(D.tau_scalar(t), D.tau_text(t), a, e, i) for t, a, e, i in
                zip(D.col(dm, "param_tau"), D.col(dm, "active_experts_per_scale"), D.col(dm, "num_experts"),
                    dm.index) if isinstance(a, list)]
        rows = sorted(rows, key=lambda r: -(r[0] or 0))[:8]
        if not rows:
            continue
        plt = S.setup()
        fig, ax = plt.subplots(figsize=(S.SINGLE, S.HEIGHT))
        scales = sorted({si for r in rows for si, v in enumerate(r[2]) if v is not None})
        for k, (tau, text, act, E, _) in enumerate(rows):
            ax.plot([s + 1 for s in scales], [act[s] for s in scales], marker=S.marker(k), color=S.color(k),
                    label=f"τ={text}")
        E = rows[0][3]
        if E:
            ax.axhline(E, color=S.DENSE_COLOR, ls=":", lw=0.8, label=f"dense ({E} experts)")
        ax.set_xticks([s + 1 for s in scales])
        ax.set_xlabel("scale (1-based)")
        ax.set_ylabel("active experts per token")
        ax.set_ylim(bottom=0)
        ax.legend(loc="best", ncol=2 if len(rows) > 4 else 1)
        stem = "active_experts_per_scale" + ("" if len(set(D.col(d, "model"))) == 1 else f"_{model}")
        files += S.save_figure(fig, ctx.out_dir, stem, f"Progressive narrowing: mean active experts per token (mean "
                               f"over layers and samples) on each MoE scale, {model}. "
                               f"{ctx.caption(shown=dm.loc[[r[4] for r in rows]])}")
    if not files:
        raise Skip("no per-scale expert counts")
    return files


def _maps(v):
    try:
        m = json.loads(v) if isinstance(v, str) else v
        return {int(k): val for k, val in (m or {}).get("maps", {}).items()} or None
    except (TypeError, ValueError, AttributeError):
        return None


def _images(v):
    """The generated images the expert_maps cell carries beside its maps ('images': one H x W x 3 array of 0-255
    per sample, the same samples as the maps), else None. Rows written so far carry none: the figure says so."""
    try:
        m = json.loads(v) if isinstance(v, str) else v
        imgs = (m or {}).get("images")
    except (TypeError, ValueError, AttributeError):
        return None
    return imgs if isinstance(imgs, list) and imgs else None


def map_range(panels, scales):
    """(low, high) of the values the maps show: the colour scale spans the data, not 0..E."""
    import numpy as np
    vals = [np.asarray(maps[si], dtype=float) for maps in panels if maps for si in scales if si in maps]
    vals = [v[np.isfinite(v)] for v in vals]
    vals = [v for v in vals if v.size]
    if not vals:
        return 0.0, 1.0
    lo, hi = float(min(v.min() for v in vals)), float(max(v.max() for v in vals))
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


@register_report("expert_maps", "expert allocation maps per scale (DMoE fig. 12)", order=80)
def expert_maps(ctx: Context) -> List[str]:
    d = _dmoe(ctx)
    if not D.has_values(d, "expert_maps"):
        raise Skip("no expert_maps column")
    model = sorted({m for m in D.col(d, "model") if m})[0]
    dm = _main_scale_set(d[d["model"] == model])
    rows = [(D.tau_scalar(t), D.tau_text(t), _maps(m), e, i, _images(m)) for t, m, e, i in
            zip(D.col(dm, "param_tau"), D.col(dm, "expert_maps"), D.col(dm, "num_experts"), dm.index)]
    rows = sorted([r for r in rows if r[2]], key=lambda r: -(r[0] or 0))
    if not rows:
        raise Skip("expert_maps hold no maps")
    E = max((r[3] or 0) for r in rows) or None
    plt = S.setup()
    files = []

    def grid(panels, images, row_labels, scales, stem, caption):
        """One row per panel: the sample's image (when the rows carry one) and its map on each scale, on one
        colour scale spanning the values shown."""
        import numpy as np
        with_image = any(img is not None for img in images)
        nr, nc = len(panels), len(scales) + with_image
        fig, axes = plt.subplots(nr, nc, figsize=(min(S.DOUBLE, 0.95 * nc + 1.1), 0.95 * nr + 0.35), squeeze=False)
        lo, hi = map_range(panels, scales)
        im = None
        for r, maps in enumerate(panels):
            for c in range(nc):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for sp in ax.spines.values():
                    sp.set_visible(False)
                if with_image and c == 0:
                    if images[r] is not None:
                        ax.imshow(np.clip(np.asarray(images[r]), 0, 255).astype(np.uint8), interpolation="nearest",
                                  gid="sample-image")
                    if r == 0:
                        ax.set_title("sample")
                else:
                    si = scales[c - with_image]
                    if maps is not None and si in maps:
                        im = ax.imshow(maps[si], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest",
                                       gid="expert-map")
                    if r == 0:
                        ax.set_title(f"scale {si + 1}")
                if c == 0:
                    ax.set_ylabel(row_labels[r])
        if im is not None:
            cb = fig.colorbar(im, ax=axes, shrink=0.9, pad=0.02)
            cb.set_label("active experts / token" + (f" (of {S.fmt(E, 'g')})" if E else ""))
        return S.save_figure(fig, ctx.out_dir, stem, caption)

    def image_text(images):
        return ("" if any(img is not None for img in images) else
                " No sample image: the rows store the maps, not the generated images.")

    scales = sorted({si for r in rows for si in r[2]})
    by_tau = rows[:5]
    first = [r[5][0] if r[5] else None for r in by_tau]
    files += grid([r[2] and {si: v[0] for si, v in r[2].items() if v} for r in by_tau], first,
                  [f"τ={r[1]}" for r in by_tau], scales, "expert_maps_by_tau",
                  f"Active experts per token (mean over layers) of the first sample on each MoE scale as τ "
                  f"decreases, {model}; colour scale: the range shown.{image_text(first)} "
                  f"{ctx.caption(shown=dm.loc[[r[4] for r in by_tau]])}")
    pick = min(rows, key=lambda r: abs((r[0] or 0) - 0.8))
    n = min(4, min(len(v) for v in pick[2].values()))
    imgs = [pick[5][k] if pick[5] and k < len(pick[5]) else None for k in range(n)]
    files += grid([{si: v[k] for si, v in pick[2].items()} for k in range(n)], imgs,
                  [f"sample {k}" for k in range(n)], scales, "expert_maps_samples",
                  f"Active experts per token of {n} samples at τ={pick[1]} (closest to 0.8), {model}; colour scale: "
                  f"the range shown.{image_text(imgs)} {ctx.caption(shown=dm.loc[[pick[4]]])}")
    return files


@register_report("expert_size", "FID / FLOPs / time against expert size (DMoE fig. 8a)", order=90)
def expert_size(ctx: Context) -> List[str]:
    d = _dmoe(ctx)
    sizes = D.col(d, "param_expert_size")
    if len({s for s in sizes if s is not None}) < 2:
        raise Skip("fewer than two expert sizes among the dmoe rows")
    column, desc = D.flops_column(ctx.df, ctx.flops)
    taus = [D.tau_text(t) for t in D.col(d, "param_tau")]
    models = D.col(d, "model")
    keys = list(dict.fromkeys(zip(models, taus)))
    rel, kind = D.relative_time(d, ctx.df)
    panels = (("fid", fid_label(ctx.df), D.col(d, "fid")), ("macs", "GMACs / image", D.gmacs(d, column)),
              ("time", "time / dense" + (" (paired)" if kind == "paired" else " (UNPAIRED)"), rel))
    lo, hi = D.col(d, "fid_ci_low"), D.col(d, "fid_ci_high")
    plt = S.setup()
    fig, axes = plt.subplots(1, 3, figsize=(S.DOUBLE, 2.2))
    for ki, (model, tau) in enumerate(keys):
        idx = sorted((i for i in range(len(d)) if (models[i], taus[i]) == (model, tau) and sizes[i] is not None),
                     key=lambda i: sizes[i])
        label = f"τ={tau}" + (f", {model}" if len({k[0] for k in keys}) > 1 else "")
        for ax, (name, ylabel, ys) in zip(axes, panels):
            ax.plot([sizes[i] for i in idx], [ys[i] for i in idx], marker=S.marker(ki), color=S.color(ki),
                    label=label)
            if name == "fid":
                _intervals(ax, [sizes[i] for i in idx], [lo[i] for i in idx], [hi[i] for i in idx], S.color(ki))
    for model in sorted({k[0] for k in keys}):
        for ax, (name, _, _) in zip(axes, panels):
            ref = {"fid": D.dense_value(ctx.df, model, "fid"),
                   "macs": (D.dense_value(ctx.df, model, column) or 0) / 1e9 or None,
                   "time": 1.0}[name]
            if ref is not None:
                ax.axhline(ref, color=S.DENSE_COLOR, ls=":", lw=0.8, label="dense")
    for ax, (_, ylabel, _) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expert size (neurons)")
        ax.set_ylabel(ylabel)
    axes[0].legend(loc="best")
    fig.tight_layout()
    how = "1 / paired speedup" if kind == "paired" else "absolute times of different trials"
    return S.save_figure(fig, ctx.out_dir, "expert_size", f"DMoE-VAR expert granularity: FID, MACs and time "
                         f"relative to dense ({how}) against expert size; dotted: dense.{extractor_sentence(ctx.df)} "
                         f"{ctx.caption(desc, _with_dense(ctx, d[[s is not None for s in sizes]]))}")


@register_report("scale_sensitivity", "per-scale sensitivity curves (DMoE fig. 4)", order=100)
def scale_sensitivity(ctx: Context) -> List[str]:
    d = _dmoe(ctx)
    sets = [D.scales_text(v) for v in D.col(d, "param_moe_scales")]
    if len(set(sets)) < 2:
        raise Skip("fewer than two sets of MoE scales among the dmoe rows")
    column, desc = D.flops_column(ctx.df, ctx.flops)
    xs, fids = D.gmacs(d, column), D.col(d, "fid")
    lo, hi = D.col(d, "fid_ci_low"), D.col(d, "fid_ci_high")
    plt = S.setup()
    fig, ax = plt.subplots(figsize=(S.SINGLE, S.HEIGHT))
    for k, s in enumerate(sorted(set(sets), key=lambda t: (len(t), t))):
        idx = sorted((i for i in range(len(d)) if sets[i] == s and xs[i] is not None), key=lambda i: xs[i])
        ax.plot([xs[i] for i in idx], [fids[i] for i in idx], marker=S.marker(k), color=S.color(k),
                label=f"MoE on scale{'s' if ('-' in s or ',' in s) else ''} {s}")
        _intervals(ax, [xs[i] for i in idx], [lo[i] for i in idx], [hi[i] for i in idx], S.color(k))
    dn = D.dense_rows(ctx.df)
    if len(dn):
        ax.scatter(D.gmacs(dn, column), D.col(dn, "fid"), marker="*", s=60, color=S.DENSE_COLOR, label="dense",
                   zorder=4)
    ax.set_xlabel(f"GMACs / image ({desc})")
    ax.set_ylabel(fid_label(ctx.df))
    S.tidy_ticks(ax, "x")
    S.tidy_ticks(ax, "y")
    ax.legend(loc="best")
    return S.save_figure(fig, ctx.out_dir, "scale_sensitivity", "Sensitivity of each scale to sparsification: "
                         f"DMoE-VAR on the given scale(s) only, τ varied along each curve; bars: FID 95% intervals."
                         f"{extractor_sentence(ctx.df)} "
                         f"{ctx.caption(desc, ctx.rows(d, dn))}")


@register_report("depth", "the same grid at two depths (DMoE fig. 5)", order=110)
def depth(ctx: Context) -> List[str]:
    df = ctx.df
    depths = D.col(df, "model_depth")
    if len({x for x in depths if x is not None}) < 2:
        raise Skip("fewer than two model depths")
    column, desc = D.flops_column(df, ctx.flops)
    xs, fids, models = D.gmacs(df, column), D.col(df, "fid"), D.col(df, "model")
    rel = [None if x is None or not D.dense_value(df, m, column) else 100.0 * x * 1e9 / D.dense_value(df, m, column)
           for x, m in zip(xs, models)]
    methods = D.col(df, "method")
    plt = S.setup()
    fig, axes = plt.subplots(1, 2, figsize=(S.DOUBLE, S.HEIGHT))
    for k, model in enumerate(sorted({m for m in models if m}, key=lambda m: (depths[models.index(m)] or 0, m))):
        dep = depths[models.index(model)]
        for j, meth in enumerate(sorted({methods[i] for i in range(len(df)) if models[i] == model} - {"dense"})):
            idx = sorted((i for i in range(len(df)) if models[i] == model and methods[i] == meth
                          and xs[i] is not None), key=lambda i: xs[i])
            for ax, x in zip(axes, (xs, rel)):
                ax.plot([x[i] for i in idx], [fids[i] for i in idx], marker=S.marker(k), color=S.color(k),
                        ls=["-", "--", ":", "-."][j % 4], label=f"{D.nice_method(meth)}, depth {dep}")
        di = [i for i in range(len(df)) if models[i] == model and methods[i] == "dense" and xs[i] is not None]
        for ax, x in zip(axes, (xs, rel)):
            ax.scatter([x[i] for i in di], [fids[i] for i in di], marker="*", s=60, color=S.color(k),
                       edgecolors=S.DENSE_COLOR, linewidths=0.6, zorder=4, label=f"dense, depth {dep}")
    axes[0].set_xlabel(f"GMACs / image ({desc})")
    axes[1].set_xlabel("MACs, % of the same model's dense")
    for ax in axes:
        ax.set_ylabel(fid_label(df))
        S.tidy_ticks(ax, "x")
        S.tidy_ticks(ax, "y")
    axes[0].legend(loc="best")
    fig.tight_layout()
    return S.save_figure(fig, ctx.out_dir, "depth", "The same sweep at two model depths: FID against absolute MACs "
                         f"(left) and MACs relative to each model's dense run (right).{extractor_sentence(df)} "
                         f"{ctx.caption(desc)}")
