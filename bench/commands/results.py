"""`python -m bench results show|export|schema`: read the tidy results store (bench/results.py)."""
from __future__ import annotations

from bench.commands._common import check_writable_file
from bench.errors import BenchError
from bench.results import fmt, load_results, schema_text, to_csv

ORDER = 30

SHOW_COLUMNS = (  # (column, header, format)
    ("method_label", "method", ""), ("model", "model", ""), ("samples", "N", "d"), ("seed", "seed", "d"),
    ("macs_total", "GMACs", ".4g"), ("macs_fvcore_over_analytic", "fv/an", ".4f"),
    ("time_median_s", "s/batch", ".4g"), ("images_per_s", "img/s", ".4g"), ("mem_peak_bytes", "MiB", ".1f"),
    ("fid", "FID", ".4g"), ("precision", "prec", ".3f"), ("recall", "rec", ".3f"),
    ("fidelity_token_agreement", "tok=dense", ".4f"), ("device", "device", ""), ("started_at", "started", ""),
)


def register(sub):
    p = sub.add_parser("results", help="show, export or describe the results store")
    s = p.add_subparsers(dest="results_command", metavar="ACTION")
    for name, hlp in (("show", "a summary table of the rows"), ("export", "write the rows as CSV"),
                      ("schema", "the documented columns and their types")):
        q = s.add_parser(name, help=hlp)
        if name != "schema":
            q.add_argument("--results", default="results", help="results directory (default ./results)")
            q.add_argument("--sweep", default=None, help="only the rows of this sweep")
        if name == "export":
            q.add_argument("--csv", required=True, metavar="OUT", help="output CSV file")
        if name == "show":
            q.add_argument("--last", type=int, default=None, help="only the last N rows")
        q.set_defaults(func=run)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _load(a):
    import os
    if not os.path.isdir(a.results):
        raise BenchError(f"no results directory {a.results!r}; `python -m bench run` writes one")
    df = load_results(a.results, sweep=a.sweep)
    if a.sweep is not None and df.empty:    # as `report --sweep`: an unknown name is an error, not an empty table
        every = load_results(a.results)
        have = sorted({s for s in every["sweep"] if isinstance(s, str) and s}) if "sweep" in every.columns else []
        raise BenchError(f"no rows of sweep {a.sweep!r} in {a.results}; valid: {', '.join(have) or '(no sweep rows)'}")
    return df


def run(a):
    if a.results_command == "schema":
        print(schema_text())
        return 0
    if a.results_command == "export":
        check_writable_file(a.csv, (".csv",), "--csv")
        df = _load(a)
        to_csv(df, a.csv)
        print(f"wrote {a.csv} ({len(df)} rows, {len(df.columns)} columns)")
        return 0
    if a.last is not None and a.last < 1:
        raise BenchError(f"--last must be >= 1, got {a.last}")
    df = _load(a)
    if a.last:
        df = df.tail(a.last)
    cols = [(c, h, f) for c, h, f in SHOW_COLUMNS if c in df.columns]
    import pandas as pd
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c, _, f in cols:
            v = r[c]
            if pd.api.types.is_scalar(v) and pd.isna(v):   # None, NaN and pandas' NA (a nullable Int64/boolean cell)
                cells.append("-")
                continue
            if c == "macs_total":
                v = v / 1e9
            if c == "mem_peak_bytes":
                v = v / 2 ** 20
            cells.append(fmt(v, f) if f else str(v))
        rows.append(cells)
    heads = [h for _, h, _ in cols]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(heads)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    sweeps = sorted({s if isinstance(s, str) else "" for s in df["sweep"]}) if "sweep" in df.columns and len(df) \
        else []   # a row without a sweep column reads as NaN there: "(none)", as an empty sweep
    names = ", ".join(s or "(none)" for s in sweeps)
    print(f"{len(df)} rows in {a.results}" + (f" (sweeps: {names})" if sweeps else ""))
    return 0
