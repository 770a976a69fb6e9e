"""`python -m bench report`: the papers' figures and tables from the results table (no model is loaded)."""
from __future__ import annotations

import os

from bench.errors import BenchError
from reports import build_reports

ORDER = 35


def register(sub):
    p = sub.add_parser("report", help="figures (PNG+PDF) and tables (Markdown+LaTeX) from the results store",
                       description="Draw every figure and table the results support: Pareto fronts (FID vs FLOPs and "
                                   "vs wall-clock), the τ trade-off, active experts per scale, expert maps, expert "
                                   "size, per-scale sensitivity, depth, ActVAR tables, dynamic vs static twins. Per "
                                   "sweep the latest full (non --quick) invocation is used unless --sweep-id says "
                                   "otherwise. Output: OUT/<sweep>/ and OUT/all/.")
    p.add_argument("--sweep", default=None, help="only this sweep (name or sweep id); default: every sweep")
    p.add_argument("--sweep-id", default=None, help="with --sweep: this invocation instead of the latest")
    p.add_argument("--results", default="results", help="results store directory (default ./results)")
    p.add_argument("--out", default=None, help="output root (default reports/out; files go to OUT/<sweep>/)")
    p.add_argument("--flops", default="analytic_all", help="MAC column of the cost axis: analytic_all (default: "
                   "mean over all samples), analytic or fvcore (the FLOP-count images)")
    p.set_defaults(func=run)


def run(a):
    out = a.out or os.path.join("reports", "out")
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise BenchError(f"output directory {out!r} cannot be written ({probe})")
    written, _ = build_reports(a.results, a.sweep, out, a.sweep_id, a.flops)
    pages = [f for f in written if os.path.basename(f) == "index.html"]
    print(f"wrote {len(written)} files under {out}" + "".join(f"\n  open {p}" for p in pages))
    return 0
