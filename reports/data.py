"""Reading the results table for reports: which rows, which columns, Pareto fronts. No model is ever loaded."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from bench.registry import method_catalog
from bench.results import json_value  # noqa: F401  (reports read cells through D.json_value)

FLOPS_COLUMNS = {  # --flops choice -> (column, axis description)
    "analytic_all": ("macs_analytic_all", "analytic, mean over all samples"),
    "analytic": ("macs_analytic", "analytic, FLOP-count images"),
    "fvcore": ("macs_fvcore", "fvcore, FLOP-count images"),
}


def nice_method(name: str) -> str:
    """The method's display_name (its class declares it); a name no method registers (a row of an older or a
    plugin method) as it is."""
    info = method_catalog().get(name)
    return info.display_name if info else name


def paper_rows(table: str) -> Dict[str, str]:
    """{method: its row label in a paper's table} for the methods that declare one (Method.paper_names), e.g.
    paper_rows("actvar-table-3") -> {"actvar": "w/ DW & AT", "actvar-tokens": "w/o DW", ...}."""
    return {name: dict(info.paper_names)[table] for name, info in method_catalog().items()
            if table in dict(info.paper_names)}


def is_missing(v) -> bool:
    if v is None or type(v).__name__ in ("NAType", "NaTType"):   # pandas' missing markers of nullable dtypes
        return True
    try:
        return isinstance(v, float) and math.isnan(v)
    except TypeError:
        return False


def col(df, name: str) -> list:
    """A column as python values (missing column -> all None)."""
    if name not in df.columns:
        return [None] * len(df)
    return [None if is_missing(v) else json_value(v) for v in df[name].tolist()]


def has_values(df, name: str) -> bool:
    return name in df.columns and any(not is_missing(v) for v in df[name].tolist())


def flops_column(df, choice: str = "analytic_all") -> Tuple[str, str]:
    """(column, description) of the cost axis: the chosen column, else the first of the others with values."""
    order = [choice] + [c for c in FLOPS_COLUMNS if c != choice]
    for c in order:
        name, desc = FLOPS_COLUMNS[c]
        if has_values(df, name):
            return name, desc
    return "", ""


def gmacs(df, column: str) -> List[Optional[float]]:
    return [None if v is None else float(v) / 1e9 for v in col(df, column)]


def ms_per_image(df) -> List[Optional[float]]:
    out = []
    for ips, t, b in zip(col(df, "images_per_s"), col(df, "time_median_s"), col(df, "batch_size")):
        if ips:
            out.append(1000.0 / float(ips))
        elif t is not None and b:
            out.append(1000.0 * float(t) / float(b))
        else:
            out.append(None)
    return out


def pareto_front(xs: Sequence[Optional[float]], ys: Sequence[Optional[float]]) -> List[bool]:
    """Points not dominated when both coordinates are minimised (cost, FID): no other point is <= in both and < in
    one. Missing coordinates are never on the front; of exact duplicates the first one is."""
    pts = [(x, y, i) for i, (x, y) in enumerate(zip(xs, ys)) if x is not None and y is not None
           and not (math.isnan(x) or math.isnan(y))]
    on = [False] * len(xs)
    best = math.inf
    for x, y, i in sorted(pts, key=lambda p: (p[0], p[1], p[2])):
        if y < best:
            on[i] = True
            best = y
    return on


# ---------------------------------------------------------------------------------------------- paired terms
RESOLUTION_RULE = (
    "points are compared only with points paired against the same dense baseline (same model and sweep run); "
    "point A dominates point B only when the evidence separates them on both axes: A's speedup interval lies "
    "wholly above B's and A's ΔFID interval wholly below B's (95% intervals). 'front': no point is at least as "
    "good on both point estimates and better on one, and none separates it; 'not resolved': off that front, but "
    "no point separates it; 'dominated': some point separates it on both axes; 'excluded': a quality measure the "
    "ΔFID axis does not show (Δ class accuracy, Δ precision, Δ recall) is resolved worse than dense, so the point "
    "is neither on the front nor counted against others; 'incomplete': the row lacks a paired value or interval")
PAIRED_CI_TEXT = ("speedup = median over paired ABBA rounds of t_dense / t_method within each trial (same labels "
                  "and seeds), percentile-bootstrap 95% over rounds; ΔFID = FID(method) - FID(dense) on the same "
                  "seeds, paired class-stratified bootstrap 95% (same resample indices for both)")


def has_paired(df) -> bool:
    return has_values(df, "speedup") and has_values(df, "fid_delta")


def paired_intervals(df):
    """Per row: (speedup, low, high) and (ΔFID, low, high); dense rows sit at (1, 0) by definition."""
    sp = list(zip(col(df, "speedup"), col(df, "speedup_ci_low"), col(df, "speedup_ci_high")))
    dq = list(zip(col(df, "fid_delta"), col(df, "fid_delta_ci_low"), col(df, "fid_delta_ci_high")))
    return sp, dq


def _complete(t) -> bool:
    return all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in t)


def baseline_groups(df) -> List[Tuple[str, str]]:
    """(sweep id, model) per row: the rows paired against the same dense baseline, which alone compare."""
    return [(str(s or ""), str(m or "")) for s, m in zip(col(df, "sweep_id"), col(df, "model"))]


def relative_time(df, all_rows=None) -> Tuple[List[Optional[float]], str]:
    """Time per image relative to dense, and what it is: 1 / paired speedup where the rows have it (comparable
    across trials), else absolute times over the dense row's (different trials: not comparable). all_rows: where
    to find the dense rows when `df` is a subset."""
    if has_values(df, "speedup"):
        return [None if s is None or s <= 0 else 1.0 / s for s in col(df, "speedup")], "paired"
    ms, models = ms_per_image(df), col(df, "model")
    out = []
    for m, model in zip(ms, models):
        dt = dense_value(df if all_rows is None else all_rows, model, "images_per_s")
        out.append(None if m is None or not dt else m / (1000.0 / dt))
    return out, "unpaired"


def speedup_text(s, lo, hi) -> str:
    if s is None:
        return "-"
    if lo is None or hi is None:
        return f"{s:.3f}x"
    return f"{s:.3f}x [{lo:.3f}, {hi:.3f}]"


def delta_text(d, lo, hi, spec: str = "+.3g") -> str:
    if d is None:
        return "-"
    if lo is None or hi is None:
        return format(d, spec)
    return f"{format(d, spec)} [{format(lo, spec)}, {format(hi, spec)}]"


def run_warnings(df, manifest_trials: Optional[int] = None) -> List[str]:
    """What a reader must know before trusting the figures of these rows."""
    out = []
    if manifest_trials is not None and manifest_trials > len(df):
        out.append(f"incomplete sweep: its manifest lists {manifest_trials} trials, {len(df)} have rows "
                   f"(finish it with `python -m bench sweep NAME --resume`)")
    names = [p or r for p, r in zip(col(df, "sweep_point"), col(df, "run_id"))]   # a plain run has no sweep point
    noisy = [p for p, n in zip(names, col(df, "timing_noisy")) if n]
    if noisy:
        out.append(f"{len(noisy)} of {len(df)} rows timed on a noisy machine (timing_noisy: "
                   f"{', '.join(map(str, noisy[:4]))}{' ...' if len(noisy) > 4 else ''}); their paired speedups "
                   f"stand, their absolute times do not")
    if not has_values(df, "speedup"):
        out.append("no paired timing in these rows: wall-clock comparisons use times of different trials, which "
                   "a busy machine can distort")
    return out


def select_runs(df, sweep: Optional[str] = None, sweep_id: Optional[str] = None):
    """{sweep name: rows of one invocation}: the given sweep_id, else per sweep the latest full (non --quick)
    invocation, else the latest. Rows of plain `bench run`s are grouped as 'runs'."""
    out = {}
    if df.empty:
        return out
    names = sorted(set(df["sweep"].fillna("").tolist())) if "sweep" in df.columns else [""]
    for name in names:
        if sweep is not None and name != sweep:
            continue
        part = df[df["sweep"].fillna("") == name] if "sweep" in df.columns else df
        if not name:
            out["runs"] = part
            continue
        ids = part["sweep_id"].fillna("").tolist() if "sweep_id" in part.columns else [""]
        if sweep_id is not None:
            chosen = sweep_id
        else:
            order = {}   # sweep_id -> (is full, latest start)
            quick = col(part, "sweep_quick")
            started = col(part, "started_at")
            for i, q, s in zip(ids, quick, started):
                full = not bool(q)
                prev = order.get(i, (False, ""))
                order[i] = (prev[0] or full, max(prev[1], str(s or "")))
            chosen = max(order, key=lambda i: (order[i][0], order[i][1], i))
        sel = part[part["sweep_id"].fillna("") == chosen] if "sweep_id" in part.columns else part
        if len(sel):
            out[name] = sel
    return out


def series_keys(df) -> List[Tuple[str, str, str]]:
    """(method, entry, twin) of each row: one plotted series per key."""
    return list(zip([m or "" for m in col(df, "method")], [e or "" for e in col(df, "sweep_entry")],
                    [t or "" for t in col(df, "sweep_twin")]))


def series_label(key: Tuple[str, str, str], keys: Sequence[Tuple[str, str, str]]) -> str:
    method, entry, twin = key
    same_method = {k for k in keys if k[0] == method}
    label = nice_method(method)
    if len(same_method) > 1:
        label += f" ({entry}{'/' + twin if twin else ''})"
    return label


def point_labels(df) -> List[str]:
    """A short name per row for captions and axes: its sweep point id, else its method label, else its method."""
    return [str(p or lab or m or "?") for p, lab, m in zip(col(df, "sweep_point"), col(df, "method_label"),
                                                           col(df, "method"))]


def dense_rows(df):
    return df[df["method"] == "dense"] if "method" in df.columns else df.iloc[0:0]


def dense_value(df, model: str, column: str) -> Optional[float]:
    """The dense row's value of `column` for `model` (the latest dense row of that model)."""
    d = dense_rows(df)
    if "model" in d.columns:
        d = d[d["model"] == model]
    vals = [v for v in col(d, column) if v is not None]
    return float(vals[-1]) if vals else None


def tau_text(v) -> str:
    v = json_value(v)
    if isinstance(v, list):
        return "(" + ", ".join(f"{x:g}" for x in v) + ")"
    return "-" if v is None else f"{float(v):g}"


def tau_scalar(v) -> Optional[float]:
    """τ of a row as one number: itself, or the mean of a per-scale list."""
    v = json_value(v)
    if v is None:
        return None
    if isinstance(v, list):
        return sum(map(float, v)) / len(v) if v else None
    return float(v)


def scales_text(v) -> str:
    """0-based scale indices -> the papers' 1-based numbering, e.g. [4,5,6] -> '5-7'."""
    v = json_value(v)
    if v is None:
        return "default"
    v = [v] if not isinstance(v, list) else v
    s = [int(x) + 1 for x in v]
    if len(s) > 1 and s == list(range(s[0], s[-1] + 1)):
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


def caption_facts(df, flops_desc: str = "", of: Optional[int] = None) -> str:
    """Sample count, model(s), machine: the facts every caption states. of: the report's row count when `df` is
    the part of them a figure shows."""
    def uniq(name):
        vals = sorted({str(v) for v in col(df, name) if v is not None})
        return ", ".join(vals) if vals else "?"
    parts = [f"{len(df)} run{'' if len(df) == 1 else 's'}" + (f" shown of the {of} in this report" if of is not None
                                                            else ""), f"model {uniq('model')} (depth {uniq('model_depth')})",
             f"{uniq('samples')} samples per run (seed {uniq('seed')}, batch {uniq('batch_size')})",
             f"cfg {uniq('cfg')}, top-k {uniq('top_k')}, top-p {uniq('top_p')}",
             f"FID with {uniq('extractor')} against {uniq('reference')}; FID intervals: class-stratified "
             f"bootstrap 95%",
             f"machine: {uniq('env_device_name')} ({uniq('device')}, {uniq('env_threads')} threads, "
             f"host {uniq('env_host')})", f"sweep {uniq('sweep_id')}"]
    if has_paired(df):
        parts.append(f"{PAIRED_CI_TEXT} ({uniq('timing_rounds')} rounds per trial)")
    if flops_desc:
        parts.append(f"MACs: {flops_desc}, transformer only (decoder excluded), CFG rows included")
    return "; ".join(parts) + "."
