"""The tidy results store: one row per run, appended atomically, loaded as one pandas DataFrame.

    append_row("results", row, key="tau=0.8")        # -> results/rows/trial-<hash>.parquet
    df = load_results("results", sweep="tau")         # every row, one column per SCHEMA entry (+ extras)

Layout: `<results_dir>/rows/` holds one parquet file per row. A row is written to a hidden temp file
(`.tmp-<host>-<pid>-<random>.parquet`) in the same directory and `os.replace`d onto its final name, so a reader sees
the whole row or nothing: a writer killed mid-write leaves only a temp file, which the loader ignores (and
deletes once its process on this host is gone); concurrent writers never touch the same temp file. Rows of a sweep trial are
stored under their trial key (`trial-<sha1(key)>.parquet`), so re-running a trial replaces its row instead of
duplicating it; plain runs are stored under their run id (`run-<run_id>.parquet`).

Column types are fixed by SCHEMA (list columns stay parquet lists; JSON columns are strings holding JSON).
Columns a method adds (param_<name>, row_metrics extras) are stored with their inferred type.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import sys
import uuid
from typing import Any, Dict, Optional

from bench.atomic import TMP_PREFIX, atomic_path, atomic_write_text, host_tag, temp_owner
from bench.errors import BenchError
from bench.records import RECORDS, nullable_of, schema_of

# column -> (dtype, meaning), generated from the typed records of a measurement (bench/records.py). dtypes: string,
# int64, float64, bool, list<float64>, list<int64>, json (a string).
SCHEMA: Dict[str, tuple] = schema_of(*RECORDS)
# columns that are null where they do not apply (every other SCHEMA column always holds a finite value)
NULLABLE: Dict[str, str] = nullable_of(*RECORDS)

ROWS = "rows"
_ARROW = {"string": "string", "json": "string", "int64": "int64", "float64": "float64", "bool": "bool",
          "list<float64>": "list<float64>", "list<int64>": "list<int64>"}


def schema_text() -> str:
    width = max(len(k) for k in SCHEMA)
    lines = [f"{'column':<{width}}  {'dtype':<14} meaning"]
    lines += [f"{k:<{width}}  {t:<14} {m}" for k, (t, m) in SCHEMA.items()]
    lines.append("method extras (row_metrics) follow with their own names and inferred types")
    return "\n".join(lines)


def new_run_id() -> str:
    import datetime
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def json_value(v):
    """A stored cell as a Python value: list parameters and JSON columns are stored as JSON strings, numpy scalars
    become Python numbers."""
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if hasattr(v, "item") and not isinstance(v, (list, str, dict)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return v
    return v


def row_filename(row: dict) -> str:
    if row.get("trial_key"):
        return f"trial-{hashlib.sha1(str(row['trial_key']).encode()).hexdigest()[:16]}.parquet"
    rid = str(row["run_id"])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", rid):
        rid = hashlib.sha1(rid.encode()).hexdigest()[:16]
    return f"run-{rid}.parquet"


# ---------------------------------------------------------------------------------------------- validation
def check_results_dir(results_dir: str) -> None:
    """Fail before any work if rows could not be written there; creates nothing."""
    from bench.checkpoints import check_writable_dir   # lazy: pulls torch; the CLI imports this module
    check_writable_dir(results_dir, "results directory")
    path = os.path.abspath(results_dir)
    rows = os.path.join(path, ROWS)
    if os.path.exists(rows) and not (os.path.isdir(rows) and os.access(rows, os.W_OK | os.X_OK)):
        raise BenchError(f"results directory {results_dir!r} is not writable ({rows})")


# ---------------------------------------------------------------------------------------------- writing
def _plain(v):
    """numpy scalars/arrays and tuples -> plain python values; NaN and Inf -> None (stored as null: a non-finite
    number never reaches a row, and a value not computed, e.g. an interval without bootstrap, is null)."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return _plain(v.tolist())
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _json_plain(v):
    """_plain, also inside mappings: a value JSON writes as standard JSON (non-finite numbers as null)."""
    if isinstance(v, dict):
        return {str(k): _json_plain(x) for k, x in v.items()}
    v = _plain(v)
    return [_json_plain(x) for x in v] if isinstance(v, list) else v


def row_json(row: Dict[str, Any]) -> str:
    """A row as one line of standard JSON, as it would be stored: NaN and Inf are null (bare NaN is not JSON, and
    a non-finite number never reaches a row); other values JSON cannot hold as their text."""
    return json.dumps(_json_plain(row), default=str, allow_nan=False)


def _column(name: str, value):
    import pyarrow as pa
    value = _plain(value)
    dtype = SCHEMA.get(name, (None,))[0]
    if dtype == "json" and not (value is None or isinstance(value, str)):
        value = json.dumps(value, sort_keys=True, default=str)
    if dtype in _ARROW:
        typ = {"list<float64>": pa.list_(pa.float64()), "list<int64>": pa.list_(pa.int64())}.get(dtype) \
              or pa.type_for_alias(_ARROW[dtype])
        if dtype == "int64" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if dtype == "list<float64>" and value is not None:
            value = [None if x is None else float(x) for x in value]
        try:
            return pa.array([value], type=typ)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(f"results column {name}: {value!r} is not {dtype} ({e})") from None
    if isinstance(value, dict):
        value = json.dumps(value, sort_keys=True, default=str)
    try:
        return pa.array([value])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([json.dumps(value, default=str)])


def row_table(row: Dict[str, Any]):
    import pyarrow as pa
    names = list(row)
    return pa.Table.from_arrays([_column(k, row[k]) for k in names], names=names)


def append_row(results_dir: str, row: Dict[str, Any]) -> str:
    """Write one row atomically; returns the final path. A row with a trial_key replaces that trial's row."""
    import pyarrow.parquet as pq
    table = row_table(row)  # type errors surface before anything is written
    final = os.path.join(results_dir, ROWS, row_filename(row))
    with atomic_path(final) as tmp:   # temp names carry the writer's pid: clean_temp_files
        pq.write_table(table, tmp)
    return final


# ---------------------------------------------------------------------------------------------- reading
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_temp_files(results_dir: str) -> int:
    """Delete temp files of writers on this host that no longer run (a killed run); returns how many. Another
    host's temp files are never touched: its pids mean nothing here (a shared results directory of a cluster)."""
    n = 0
    here = host_tag()
    for p in glob.glob(os.path.join(results_dir, ROWS, TMP_PREFIX + "*")):
        owner = temp_owner(p)
        if owner and owner[0] == here and not _pid_alive(owner[1]):
            try:
                os.remove(p)
                n += 1
            except OSError:
                pass
    return n


def row_files(results_dir: str):
    return sorted(p for p in glob.glob(os.path.join(results_dir, ROWS, "*.parquet"))
                  if not os.path.basename(p).startswith("."))


def load_results(results_dir: str = "results", sweep: Optional[str] = None):
    """All rows of the store as a pandas DataFrame (one row per run), oldest first.

    Columns: those of SCHEMA (dtypes as documented there; int columns with missing values become pandas'
    nullable Int64, bool ones 'boolean'), plus every param_<name> and method extra column any row has (missing in
    other rows: None/NaN). List columns hold python lists. `sweep` keeps only that sweep's rows. Temp files of
    interrupted writers are ignored (and removed once their process has exited)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    clean_temp_files(results_dir)
    tables = []
    for p in row_files(results_dir):
        try:
            with pq.ParquetFile(p) as f:  # cheaper than read_table's dataset machinery for one-row files
                table = f.read(use_threads=False)
        except (OSError, pa.ArrowInvalid) as e:  # cannot happen through append_row; never hide it silently
            print(f"warning: skipping unreadable results file {p}: {e}", file=sys.stderr)
            continue
        table = _conform(table, p)
        if table is not None:
            tables.append(table)
    if not tables:
        return pd.DataFrame({k: pd.Series(dtype=_pandas_dtype(t)) for k, (t, _) in SCHEMA.items()
                             if t != "any"})
    try:  # one table: fast; null/list<null> columns promote to the other rows' types
        frames = [_frame(pa.concat_tables(tables, promote_options="permissive"))]
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column with different types in different rows
        frames = [_frame(t) for t in tables]
    df = pd.concat(frames, ignore_index=True, sort=False) if len(frames) > 1 else frames[0]
    for k, (t, _) in SCHEMA.items():
        if k in df.columns:
            try:
                df[k] = _coerce(df[k], t)
            except (TypeError, ValueError) as e:   # _conform made every row's cell a `t`: not expected
                print(f"warning: results column {k} left as stored in {results_dir}, not {t}: {e}", file=sys.stderr)
    if sweep is not None:
        df = df[df["sweep"] == sweep]
    if "started_at" in df.columns:
        df = df.sort_values(["started_at", "run_id"], kind="stable")
    return df.reset_index(drop=True)


# the columns every row of this harness has (append_row through bench.measure, and every sweep row): a file
# without them holds a row of another schema (another tool's table, a hand-made file)
IDENTITY = ("run_id", "method")


def _arrow_type(t: str):
    import pyarrow as pa
    return {"list<float64>": pa.list_(pa.float64()), "list<int64>": pa.list_(pa.int64()),
            "json": pa.string()}.get(t) or pa.type_for_alias(_ARROW[t])


def _fits(typ, t: str) -> bool:
    """Does an arrow column type hold SCHEMA dtype `t` as it is (nothing to convert)?"""
    import pyarrow.types as at
    if at.is_null(typ):
        return True
    if t == "int64":
        return at.is_integer(typ)
    if t == "float64":
        return at.is_floating(typ) or at.is_integer(typ)
    if t == "bool":
        return at.is_boolean(typ)
    if t in ("string", "json"):
        return at.is_string(typ) or at.is_large_string(typ)
    if t.startswith("list<"):
        return (at.is_list(typ) or at.is_large_list(typ)) and (
            at.is_null(typ.value_type) or at.is_integer(typ.value_type)
            or (t == "list<float64>" and at.is_floating(typ.value_type)))
    return True


def _conform(table, path: str):
    """One stored row made to fit SCHEMA, or None (the row left out of the frame, the file kept): a column of another
    type is converted where the value converts exactly ("16" -> 16, 16.0 -> 16); a value that does not convert, or
    a file without the IDENTITY columns (a row of another schema), leaves the row out; a non-finite number becomes
    null. Each is said on stderr, naming the file and the column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    missing = [c for c in IDENTITY if c not in table.column_names]
    if missing:
        print(f"warning: skipping results file {path}: a row of another schema (no {', '.join(missing)} column; "
              f"columns: {', '.join(table.column_names[:8])}{', ...' if len(table.column_names) > 8 else ''})",
              file=sys.stderr)
        return None
    for i, name in enumerate(table.column_names):
        t = SCHEMA.get(name, (None,))[0]
        if t not in _ARROW:
            continue
        col = table.column(i)
        if not _fits(col.type, t):
            try:
                conv = col.cast(_arrow_type(t))     # safe: 16.5 -> int64 or "many" -> int64 fail
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                value = col.to_pylist()[0] if len(col) else None
                print(f"warning: skipping results file {path}: column {name} holds {value!r} ({col.type}), not {t} "
                      f"({str(e).splitlines()[0]})", file=sys.stderr)
                return None
            print(f"warning: results file {path}: column {name} stored as {col.type}, read as {t}", file=sys.stderr)
            table, col = table.set_column(i, name, conv), conv
        if t == "float64" and pa.types.is_floating(col.type) and col.null_count < len(col) \
                and not pc.all(pc.is_finite(col)).as_py():
            print(f"warning: results file {path}: column {name} holds a non-finite number, read as null",
                  file=sys.stderr)
            table = table.set_column(i, name, pc.if_else(pc.is_finite(col), col, pa.scalar(None, col.type)))
    return table


def _frame(table):
    """DataFrame of a table; list columns as python lists (not numpy arrays)."""
    import pandas as pd
    import pyarrow as pa
    data = {}
    for name in table.column_names:
        col = table.column(name)
        data[name] = col.to_pylist() if pa.types.is_list(col.type) or pa.types.is_null(col.type) \
            else col.to_pandas()
    return pd.DataFrame(data)


def _pandas_dtype(t: str):
    return {"int64": "int64", "float64": "float64", "bool": "bool"}.get(t, "object")


def _coerce(s, t: str):
    if t == "int64":
        return s.astype("int64") if s.notna().all() else s.astype("Int64")
    if t == "bool":
        return s.astype("bool") if s.notna().all() else s.astype("boolean")
    if t == "float64":
        return s.astype("float64")
    return s


def to_csv(df, path: str) -> None:
    """CSV export: list columns as JSON text; written atomically."""
    import io
    out = df.copy()
    for c in out.columns:
        if out[c].map(lambda v: isinstance(v, (list, tuple))).any():
            out[c] = out[c].map(lambda v: json.dumps(v) if isinstance(v, (list, tuple)) else v)
    buf = io.StringIO()
    out.to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())


def fmt(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)
