"""Registry of report figures and tables, in the style of timm's model registry.

    @register_report("tau", "τ trade-off curve with FID intervals", order=60)
    def tau_curve(ctx: Context) -> List[str]: ...

    list_reports()                  # every report, in index order
    list_reports(overview=True)     # those also drawn over every sweep at once (OUT/all/)
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional


class Report(NamedTuple):
    name: str
    generate: Callable          # Context -> list of files written; raises reports.context.Skip when it does not apply
    what: str                   # one line: what it draws (the index names it when the report is skipped)
    order: int                  # position in the index, ascending
    overview: bool              # also drawn for the every-sweep overview


_REPORTS: Dict[str, Report] = {}


def register_report(name: str, what: str, *, order: int, overview: bool = False):
    def deco(fn):
        if name in _REPORTS:
            raise RuntimeError(f"report {name!r} registered twice ({_REPORTS[name].generate.__module__}, "
                               f"{fn.__module__})")
        _REPORTS[name] = Report(name, fn, what, order, overview)
        return fn
    return deco


def unregister_report(name: str) -> None:
    del _REPORTS[name]


def list_reports(overview: Optional[bool] = None) -> List[Report]:
    """Registered reports sorted by order (then name); overview=True/False keeps only those with that flag."""
    reports = sorted(_REPORTS.values(), key=lambda r: (r.order, r.name))
    return [r for r in reports if overview is None or r.overview == overview]
