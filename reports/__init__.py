"""Figures and tables of the papers, drawn from the results table alone (no model is loaded).

    from reports import build_reports
    written, notes = build_reports("results", sweep="tau", out_root="reports/out")

To add a figure, write one function in any module of reports/ and decorate it with
reports.registry.register_report (name, one-line description, index order, overview=True to also draw it in
<out_root>/all/); every module of the package is imported, so nothing else is edited. A generator takes a
reports.context.Context (the rows of one sweep invocation) and returns the files it wrote, or raises
reports.context.Skip with the reason it does not apply (a missing column, a single τ ...). Generators are chosen by
what the rows contain, not by the sweep's name, so a custom sweep gets every figure its columns support.
Output: <out_root>/<sweep>/ (PNG + PDF + caption .md per figure, .md + .tex per table, index.html: every figure and
table on one self-contained page with the warnings and run facts, README.md index) and
<out_root>/all/ (the overview reports over every method of every sweep; not written when the rows hold one sweep,
whose report it would repeat). methods.md in each: the shared protocol (samples, seeds, machine, intervals, what
paired means, the rules, the symbols) that every caption refers to instead of repeating it.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from typing import List, Optional, Sequence, Tuple

from bench.errors import BenchError, choices_error
from bench.log import get_logger
from bench.results import load_results
from bench.sweep import list_sweeps, read_manifests
from reports import data as D
from reports.context import Context, Skip
from reports.data import FLOPS_COLUMNS, select_runs
from reports.html import PAGE, write_page
from reports.protocol import write_methods as write
from reports.registry import Report, list_reports
from reports.style import METHODS_FILE, write_text

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):       # importing runs each module's @register_report decorators
        importlib.import_module(f"{__name__}.{_module.name}")

logger = get_logger(__name__)
OVERVIEW = "all"


def available_sweeps(df) -> List[str]:
    return sorted(select_runs(df))


def build_reports(results_dir: str, sweep: Optional[str] = None, out_root: str = os.path.join("reports", "out"),
                  sweep_id: Optional[str] = None, flops: str = "analytic_all") -> Tuple[List[str], List[str]]:
    """Draw everything the store supports (or one sweep). Returns (files written, notes on what was skipped).
    Raises BenchError (nothing written) on an empty store, an unknown sweep, or a bad option."""
    if flops not in FLOPS_COLUMNS:
        raise choices_error("--flops", flops, FLOPS_COLUMNS)
    if not os.path.isdir(results_dir):
        raise BenchError(f"no results directory {results_dir!r}; `python -m bench sweep NAME` writes one")
    df = load_results(results_dir)
    if df.empty:
        raise BenchError(f"results store {results_dir!r} has no rows; run `python -m bench sweep tau` first")
    runs = select_runs(df)
    if sweep is not None:
        if sweep not in runs:
            ids = sorted(set(df["sweep_id"].dropna())) if "sweep_id" in df.columns else []
            if sweep in ids:      # a sweep id given as --sweep
                sweep_id, sweep = sweep, df[df["sweep_id"] == sweep]["sweep"].iloc[0]
            else:
                raise BenchError(f"no rows of sweep {sweep!r} in {results_dir}; valid: {', '.join(sorted(runs))}")
        runs = select_runs(df, sweep, sweep_id)
        if sweep not in runs:
            raise BenchError(f"no rows of sweep {sweep!r} with sweep id {sweep_id!r} in {results_dir}")
    elif sweep_id is not None:
        raise BenchError("--sweep-id needs --sweep")
    written, notes = [], []
    planned = manifest_trials(results_dir)
    all_warnings = []
    for name, part in runs.items():
        out_dir = os.path.join(out_root, name)
        ids = set(D.col(part, "sweep_id")) if name != "runs" else set()
        warnings = D.run_warnings(part, planned.get(next(iter(ids))) if len(ids) == 1 else None)
        all_warnings += [f"{name}: {w}" for w in warnings]
        for w in warnings:
            logger.warning(f"  WARNING ({name}): {w}")
        ctx = Context(part, out_dir, flops, warnings=warnings)
        files, skipped = run_generators(ctx, list_reports())
        protocol = []
        if files:   # the protocol every caption refers to, once per report output (and first on its page)
            protocol = [write_methods(out_dir, part, flops, warnings, name)]
            written += protocol
        notes += [f"{name}: {s}" for s in skipped]
        written += files
        if files:
            written += write_pages(out_dir, name, part, protocol + files, skipped, warnings, ctx.notes)
        logger.info(f"report {name}: {len(files)} files in {out_dir} (page: {os.path.join(out_dir, PAGE)})"
                    if files else f"report {name}: nothing drawn")
        if skipped:
            logger.info(f"  not drawn for {name}: {'; '.join(skipped)}")
    if sweep is None:
        absent = [n for n in list_sweeps() if n not in runs]
        if absent:
            notes.append(f"no rows of the shipped sweeps {', '.join(absent)}")
            logger.info(f"no rows yet of the shipped sweeps {', '.join(absent)} (python -m bench sweep NAME)")
    if sweep is None and len(runs) == 1:   # the overview of one sweep is that sweep's report again
        notes.append(f"{OVERVIEW}: not written: the rows hold one sweep ({next(iter(runs))}), whose report it would "
                     f"repeat")
        logger.info(f"report {OVERVIEW}: not written: the rows hold one sweep ({next(iter(runs))}); its report is "
                    f"in {os.path.join(out_root, next(iter(runs)))}")
    elif sweep is None and len(df):
        import pandas as pd
        allrows = pd.concat(list(runs.values()), ignore_index=True)
        out_dir = os.path.join(out_root, OVERVIEW)
        ctx = Context(allrows, out_dir, flops, by_method=True, warnings=all_warnings)
        files, skipped = run_generators(ctx, list_reports(overview=True))
        protocol = []
        if files:
            protocol = [write_methods(out_dir, allrows, flops, all_warnings, "every sweep and run")]
            written += protocol
        notes += [f"{OVERVIEW}: {s}" for s in skipped]
        if files:
            written += files
            written += write_pages(out_dir, "every sweep and run", allrows, protocol + files, skipped, all_warnings,
                                   ctx.notes)
        logger.info(f"report {OVERVIEW}: {len(files)} files in {out_dir} (page: {os.path.join(out_dir, PAGE)})"
                    if files else f"report {OVERVIEW}: nothing drawn")
        if skipped:
            logger.info(f"  not drawn for {OVERVIEW}: {'; '.join(skipped)}")
    return written, notes


def write_methods(out_dir: str, df, flops: str, warnings: Sequence[str], title: str) -> str:
    return write(out_dir, df, flops, warnings, title)


def run_generators(ctx: Context, reports: Sequence[Report]) -> Tuple[List[str], List[str]]:
    files, skipped = [], []
    for report in reports:
        try:
            files += report.generate(ctx)
        except Skip as s:
            skipped.append(f"{report.name}: {s}")
    skipped += ctx.notes
    return files, skipped


def manifest_trials(results_dir: str) -> dict:
    """{sweep_id: trials its manifest lists} of the store's sweeps."""
    return {m.get("sweep_id"): len(m.get("trials") or []) for m in read_manifests(results_dir)}


def write_pages(out_dir: str, title: str, df, files: List[str], skipped: List[str], warnings: Sequence[str],
                partial: Sequence[str]) -> List[str]:
    """The report's index.html (reports.html: every figure and table on one page) and its README.md index."""
    what = {r.name: r.what for r in list_reports()}
    page = write_page(out_dir, title, df, files, skipped, warnings, partial, what)
    return [page, write_index(out_dir, title, df, files + [page], skipped, warnings)]


def write_index(out_dir: str, title: str, df, files: List[str], skipped: List[str],
                warnings: Sequence[str] = ()) -> str:
    lines = [f"# Report: {title}", ""]
    lines += [f"> **WARNING:** {w}." for w in warnings] + ([""] if warnings else [])
    lines += [f"{len(df)} run{'' if len(df) == 1 else 's'}. Protocol (samples, seeds, machine, intervals, what "
              f"paired means), rules and symbols: [{METHODS_FILE}]({METHODS_FILE}).", "", "## Files", ""]
    lines += [f"- {os.path.basename(f)}" for f in files]
    if skipped:
        what = {r.name: r.what for r in list_reports()}
        lines += ["", "## Not drawn", ""] + [f"- {s} ({what.get(s.split(':')[0], '')})" for s in skipped]
    return write_text(os.path.join(out_dir, "README.md"), "\n".join(lines) + "\n")
