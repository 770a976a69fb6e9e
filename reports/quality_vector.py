"""Quality is a vector: ΔFID, Δ class accuracy, Δ precision and Δ recall against dense, each paired (same labels and
seeds) with its interval. quality_call is the one rule every report uses before it calls a point better than dense
or puts it on a front: no measure may be resolved worse. resolved_flags says whether a point's ΔFID is resolved by
its sample count, which the trade-off figures mark (filled vs hollow)."""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence

from reports import data as D


class Measure(NamedTuple):
    column: str              # the paired delta; its interval is <column>_ci_low / <column>_ci_high
    name: str                # how a verdict names it ("class accuracy resolved worse")
    header: str              # table header
    lower_is_better: bool
    spec: str                # number format in tables


MEASURES = (
    Measure("fid_delta", "ΔFID", "ΔFID", True, "+.3g"),
    Measure("class_accuracy_delta", "class accuracy", "Δ class accuracy", False, "+.3f"),
    Measure("precision_delta", "precision", "Δ precision", False, "+.3f"),
    Measure("recall_delta", "recall", "Δ recall", False, "+.3f"),
)
BETTER, WORSE, UNRESOLVED = "resolved better", "resolved worse", "not resolved"

QUALITY_RULE = (
    "quality is a vector: ΔFID (lower is better), Δ class accuracy, Δ precision and Δ recall (higher is better), "
    "each paired with dense; a measure is resolved worse when its interval lies wholly on the worse side of 0, "
    "resolved better when wholly on the better side, else (or without an interval) not resolved; a point is called "
    "better than dense only when no measure is resolved worse, and put on a front only when no measure its quality "
    "axis does not show (Δ class accuracy, Δ precision, Δ recall beside a ΔFID or FID axis) is resolved worse")


def measure_call(lo, hi, lower_is_better: bool) -> Optional[str]:
    """BETTER | WORSE | UNRESOLVED for one interval of a delta against dense; None without an interval."""
    if lo is None or hi is None:
        return None
    if lo > 0:
        return WORSE if lower_is_better else BETTER
    if hi < 0:
        return BETTER if lower_is_better else WORSE
    return UNRESOLVED


FRONT_AXES = ("ΔFID",)   # the measure a front's quality axis shows: a loss there is visible, so it does not exclude


class QualityCall(NamedTuple):
    """What the quality vector of one point says: each measure's call (None: not measured / no interval)."""
    calls: Dict[str, Optional[str]]

    def named(self, call: str, exclude: Sequence[str] = ()) -> List[str]:
        return [m for m, c in self.calls.items() if c == call and m not in exclude]

    def admissible(self, axes: Sequence[str] = ()) -> bool:
        """No measure resolved worse: the point may be called better than dense (axes=()), or put on a front
        whose quality axis shows `axes` (FRONT_AXES: there only a loss the axis does not show excludes)."""
        return not self.named(WORSE, axes)

    def reason(self, axes: Sequence[str] = ()) -> str:
        """Which measures decided an exclusion ('ΔFID resolved better but class accuracy resolved worse'); ''
        when admissible."""
        worse = self.named(WORSE, axes)
        if not worse:
            return ""
        better = self.named(BETTER)
        text = f"{' and '.join(worse)} resolved worse"
        return f"{' and '.join(better)} resolved better but {text}" if better else text

    @property
    def summary(self) -> str:
        """Every measure with a call, for a table cell: 'ΔFID resolved better; class accuracy resolved worse'."""
        parts = [f"{m} {c}" for m, c in self.calls.items() if c is not None and c != UNRESOLVED]
        return "; ".join(parts) if parts else "none resolved"


def quality_call(values: Mapping[str, object]) -> QualityCall:
    """The rule (QUALITY_RULE) on one point: `values` maps a row's columns to values (missing -> not measured)."""
    def get(name):
        v = values.get(name)
        return None if D.is_missing(v) else float(v)
    return QualityCall({m.name: measure_call(get(f"{m.column}_ci_low"), get(f"{m.column}_ci_high"),
                                             m.lower_is_better) for m in MEASURES})


def quality_calls(df) -> List[QualityCall]:
    """quality_call of every row of a results DataFrame."""
    cols = {c: D.col(df, c) for m in MEASURES for c in (f"{m.column}_ci_low", f"{m.column}_ci_high")}
    return [quality_call({c: v[i] for c, v in cols.items()}) for i in range(len(df))]


def resolution(df) -> List[Optional[str]]:
    """'front' | 'not resolved' | 'dominated' | 'excluded' per row by reports.data.RESOLUTION_RULE (None:
    incomplete, the row lacks a paired value). Speed is maximised, ΔFID minimised; identical points get the same status; a point an
    off-axis quality measure calls worse (quality_call) is 'excluded', compared with no other."""
    sp, dq = D.paired_intervals(df)
    ok = [D._complete(a) and D._complete(b) for a, b in zip(sp, dq)]
    admissible = [c.admissible(FRONT_AXES) for c in quality_calls(df)]
    group = D.baseline_groups(df)
    out: List[Optional[str]] = []
    for i in range(len(sp)):
        if not ok[i]:
            out.append(None)
            continue
        if not admissible[i]:
            out.append("excluded")
            continue
        peers = [j for j in range(len(sp)) if ok[j] and admissible[j] and j != i and group[j] == group[i]]
        beaten = any(sp[j][1] > sp[i][2] and dq[j][2] < dq[i][1] for j in peers)
        off_front = any(sp[j][0] >= sp[i][0] and dq[j][0] <= dq[i][0] and (sp[j][0] > sp[i][0] or dq[j][0] < dq[i][0])
                        for j in peers)
        out.append("dominated" if beaten else ("not resolved" if off_front else "front"))
    return out


def admissible_front(xs, ys, calls: Sequence[QualityCall]):
    """(front mask, {row: reason}) of the Pareto front (reports.data.pareto_front, both minimised; y is FID or
    ΔFID) over the points no other measure calls worse; the reasons name each point that the point estimates
    alone would have put on the front. Excluded points neither join the front nor push others off it: a hidden
    resolved loss is not an option to offer."""
    ok = [c.admissible(FRONT_AXES) for c in calls]
    front = D.pareto_front([x if k else None for x, k in zip(xs, ok)], ys)
    naive = D.pareto_front(xs, ys)
    return front, {i: calls[i].reason(FRONT_AXES) for i, on in enumerate(naive) if on and not ok[i]}


def vector_header() -> List[str]:
    return [f"{m.header} [CI]" for m in MEASURES]


def vector_cells(df) -> List[List[str]]:
    """Per row: each measure's delta with its interval, for the headline tables."""
    cols = [(m, D.col(df, m.column), D.col(df, f"{m.column}_ci_low"), D.col(df, f"{m.column}_ci_high"))
            for m in MEASURES]
    return [[D.delta_text(v[i], lo[i], hi[i], m.spec) for m, v, lo, hi in cols] for i in range(len(df))]


def excluded_text(df, calls: Sequence[QualityCall], rows: Sequence[int], limit: int = 2) -> str:
    """A caption sentence naming each row a front excludes and what decided it ('' when none); past `limit` rows,
    a count (the tables list every one)."""
    names = D.point_labels(df)
    parts = [f"{names[i]} ({calls[i].reason(FRONT_AXES)})" for i in rows if not calls[i].admissible(FRONT_AXES)]
    if not parts:
        return ""
    more = f" and {len(parts) - limit} more (tables)" if len(parts) > limit else ""
    return f" Excluded by the quality vector: {'; '.join(parts[:limit])}{more}."


# ---------------------------------------------------------------------------------------------- sample resolution
def dense_fids(df) -> List[Optional[float]]:
    """Dense FID behind each row: fid − fid_delta (the same seeds), else the dense row's FID of that model."""
    out = []
    for fid, delta, model in zip(D.col(df, "fid"), D.col(df, "fid_delta"), D.col(df, "model")):
        out.append(float(fid) - float(delta) if fid is not None and delta is not None
                   else D.dense_value(df, model, "fid"))
    return out


def resolved_flags(df) -> List[Optional[bool]]:
    """Per row whether its ΔFID is resolved: the recorded `resolved` where the run resolved by sample count, else
    the same test on the row (interval excludes 0, or half-width ≤ resolve_target_pct % of dense FID); None for
    dense (the reference) and for rows without a ΔFID interval."""
    out = []
    rows = zip(D.col(df, "method"), D.col(df, "resolved"), D.col(df, "fid_delta_ci_low"),
               D.col(df, "fid_delta_ci_high"), D.col(df, "resolve_target_pct"), dense_fids(df))
    for method, recorded, lo, hi, target, dense in rows:
        if method == "dense":
            out.append(None)
        elif recorded is not None:
            out.append(bool(recorded))
        elif lo is None or hi is None:
            out.append(None)
        else:
            within = target is not None and dense and (hi - lo) / 2 <= float(target) / 100 * abs(dense)
            out.append(bool(lo > 0 or hi < 0 or within))
    return out


def resolved_legend(df) -> List[str]:
    """[filled, hollow] legend texts of resolved_flags, with the resolve target(s) of these rows."""
    targets = sorted({float(t) for t in D.col(df, "resolve_target_pct") if t is not None})
    within = f" or half-width ≤ {'/'.join(f'{t:g}' for t in targets)}% of dense FID" if targets else ""
    return [f"ΔFID resolved (CI excludes 0{within})", "ΔFID not resolved"]


def resolved_caption(df) -> str:
    filled, hollow = resolved_legend(df)
    return f" Filled markers: {filled}; hollow: {hollow} (or no ΔFID interval)."


def level_note(df) -> str:
    """A caption sentence when some rows' intervals are not at 95% (runs that resolved by repeated looks)."""
    levels = sorted({round(interval_level({n: v for n, v in zip(("resolve_level", "quality_level"), pair)}), 2)
                     for pair in zip(D.col(df, "resolve_level"), D.col(df, "quality_level"))} - {95.0})
    return (f" Some rows' intervals are at {'/'.join(f'{v:g}%' for v in levels)} per look (the level corrected "
            f"for repeated looks at a growing sample), not 95%." if levels else "")


def interval_level(values: Mapping[str, object]) -> float:
    """Confidence level (percent) of a row's intervals: resolve_level where the run looked repeatedly, else
    quality_level, else 95."""
    for name in ("resolve_level", "quality_level"):
        v = values.get(name)
        if not D.is_missing(v) and v is not None and math.isfinite(float(v)) and float(v) > 0:
            v = float(v)
            return 100 * v if v <= 1 else v
    return 95.0
