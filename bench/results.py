"""The tidy results store: one row per run, appended atomically, loaded as one pandas DataFrame.

    append_row("results", row, key="tau=0.8")        # -> results/rows/trial-<hash>.parquet
    df = load_results("results", sweep="tau")         # every row, one column per SCHEMA entry (+ extras)

Layout: `<results_dir>/rows/` holds one parquet file per row. A row is written to a hidden temp file
(`.tmp-<pid>-<random>.parquet`) in the same directory and `os.replace`d onto its final name, so a reader sees
the whole row or nothing: a writer killed mid-write leaves only a temp file, which the loader ignores (and
deletes once its process is gone); concurrent writers never touch the same temp file. Rows of a sweep trial are
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

from bench.atomic import TMP_PREFIX, atomic_path
from bench.errors import BenchError

# column -> (dtype, meaning). dtypes: string, int64, float64, bool, list<float64>, list<int64>, json (a string).
SCHEMA: Dict[str, tuple] = {
    # identity / configuration
    "run_id": ("string", "unique id of the run (UTC start time + random suffix)"),
    "sweep": ("string", "sweep name ('' for a single `bench run`)"),
    "sweep_id": ("string", "id of the sweep invocation that produced the row ('' if none)"),
    "trial_key": ("string", "key the row is stored under; re-running the trial replaces the row ('' if none)"),
    "method": ("string", "registered method name (bench.registry)"),
    "method_kind": ("string", "none | weight | token | weight+token"),
    "method_label": ("string", "short human-readable method identity (legends)"),
    "method_config": ("json", "the validated method parameters, JSON object"),
    "param_<name>": ("any", "one column per method parameter; scalars as is, lists as JSON strings"),
    "model": ("string", "model name (embedded name, 'tiny', or official-d<depth>)"),
    "model_id": ("string", "stable model id (name + weight hash) used in cache keys"),
    "model_depth": ("int64", "VAR depth (transformer blocks)"),
    "model_source": ("string", "embedded | official | builtin"),
    "samples": ("int64", "number of generated images N (quality and timing use all of them)"),
    "seed": ("int64", "base seed"),
    "seed_scheme": ("string", "how labels and per-batch seeds derive from the seed (exact formula)"),
    "batch_size": ("int64", "images per generation batch B"),
    "cfg": ("float64", "classifier-free guidance strength"),
    "top_k": ("int64", "top-k sampling (0 = off)"),
    "top_p": ("float64", "top-p sampling (0 = off)"),
    "more_smooth": ("bool", "Gumbel smoothing (visualisation only)"),
    "device": ("string", "torch device the run used (cpu, cuda, cuda:1 ...)"),
    # compute: multiply-accumulates per image
    "macs_fvcore": ("float64", "transformer MACs per image counted by fvcore over the real generation (CFG rows "
                               "included; decoder excluded)"),
    "macs_fvcore_per_scale": ("list<float64>", "fvcore MACs per image, one per scale"),
    "macs_decoder": ("float64", "VQ-VAE decoder MACs per image (fvcore)"),
    "macs_total": ("float64", "macs_fvcore + macs_decoder"),
    "macs_analytic": ("float64", "transformer MACs per image by formula (bench/analytic.py or the method's "
                                 "analytic_macs) on the same flop_images images"),
    "macs_analytic_per_scale": ("list<float64>", "analytic MACs per image, one per scale (same images)"),
    "macs_fvcore_over_analytic": ("float64", "macs_fvcore / macs_analytic (1.0 = exact agreement)"),
    "macs_analytic_all": ("float64", "analytic MACs per image over all N generated images (method statistics "
                                     "of the whole run)"),
    "macs_analytic_all_per_scale": ("list<float64>", "the same, per scale"),
    "macs_uncounted_ops": ("json", "ops seen in the trace with no MAC handler (elementwise, norms ...): "
                                   "{op: occurrences}; 'decoder:' prefix for the decoder"),
    "macs_dynamic_ops": ("json", "dynamic data-movement ops counted as 0 MACs (gather, index, sort, topk, "
                                 "embedding ...): {op: occurrences}"),
    "flop_images": ("int64", "images of the counted generation (labels 0..flop_images-1, seed of batch 0)"),
    # time
    "time_median_s": ("float64", "median seconds per full batch: transformer + sampling + decode"),
    "time_p10_s": ("float64", "10th percentile of seconds per batch"),
    "time_p90_s": ("float64", "90th percentile of seconds per batch"),
    "time_per_scale_median_s": ("list<float64>", "median seconds per batch of each scale (transformer + "
                                                 "sampling + residual update)"),
    "time_decode_median_s": ("float64", "median seconds per batch of the VQ-VAE decode"),
    "images_per_s": ("float64", "timed images / timed seconds"),
    "timing_batches": ("int64", "batches in the time statistics (after warm-up)"),
    "warmup_batches": ("int64", "leading batches excluded from the time statistics"),
    "timing_extra_batches": ("int64", "repeats of the last batch added for timing when N/B <= warmup_batches "
                                      "(their outputs are discarded)"),
    "timer": ("string", "perf_counter (CPU) | cuda_events (GPU, synchronised per batch)"),
    # time, paired with dense inside the trial (bench.timing.PAIRED_PROTOCOL): comparable across trials
    "speedup": ("float64", "median over paired rounds of t_dense / t_method, same labels and seeds, ABBA order "
                           "(1 by definition for dense)"),
    "speedup_ci_low": ("float64", "percentile-bootstrap 95% interval of the speedup over rounds, low end"),
    "speedup_ci_high": ("float64", "the same, high end"),
    "speedup_per_scale": ("list<float64>", "median over rounds of t_dense / t_method of each scale"),
    "speedup_aa": ("float64", "dense rows: dense timed against itself (A/A), the protocol's noise floor"),
    "speedup_aa_ci_low": ("float64", "A/A interval, low end"),
    "speedup_aa_ci_high": ("float64", "A/A interval, high end"),
    "timing_rounds": ("int64", "paired rounds (0: paired timing off)"),
    "timing_protocol": ("string", "the paired timing protocol, in words"),
    "time_paired_method_median_s": ("float64", "median seconds of the method's batches in the rounds"),
    "time_paired_dense_median_s": ("float64", "median seconds of dense's batches in the rounds"),
    "macs_ratio": ("float64", "macs_analytic_all / dense transformer MACs per image"),
    "time_flop_efficiency": ("float64", "time saved / FLOPs saved = (1 - 1/speedup) / (1 - macs_ratio); 1.0 is the "
                                        "physical limit (null when the MACs change by < 1%)"),
    "timing_cv": ("float64", "coefficient of variation of the round laps (the larger of method's and dense's)"),
    "load_avg_before": ("float64", "1-min load average before the timing"),
    "load_avg_after": ("float64", "1-min load average after the timing"),
    "cpu_utilization": ("float64", "process CPU time / (wall x threads) over the timing"),
    "timing_noisy": ("bool", "the machine was busy or the laps erratic while timing (timing_noisy_rule)"),
    "timing_noisy_reason": ("string", "which clauses of the rule fired ('' if none)"),
    "timing_noisy_rule": ("string", "the rule of timing_noisy, in words"),
    # memory
    "mem_peak_bytes": ("int64", "peak memory of a generation batch (max over batches), see mem_kind"),
    "mem_kind": ("string", "cuda_max_allocated | cpu_rss_growth_hwm | cpu_rss_growth_sampled | unavailable"),
    # quality (bench/quality.py)
    "fid": ("float64", "Fréchet distance to the reference set in the extractor's feature space"),
    "fid_ci_low": ("float64", "bootstrap 95% interval, low end"),
    "fid_ci_high": ("float64", "bootstrap 95% interval, high end"),
    "isc_mean": ("float64", "Inception score (extractor's classes)"),
    "isc_std": ("float64", "Inception score std over splits"),
    "precision": ("float64", "improved precision (k-NN manifolds)"),
    "recall": ("float64", "improved recall"),
    "kid_mean": ("float64", "kernel inception distance"),
    "kid_std": ("float64", "KID std over subsets"),
    "extractor": ("string", "feature extractor of the quality metrics"),
    "reference": ("string", "reference set the metrics compare against"),
    "reference_count": ("int64", "images in the reference set"),
    "reference_cached": ("bool", "reference statistics came from the disk cache"),
    # quality paired with dense on the same labels and seeds (bench.quality.paired_fid_bootstrap)
    "fid_delta": ("float64", "FID(method) - FID(dense), same seeds, same reference (0 for dense)"),
    "fid_delta_ci_low": ("float64", "paired class-stratified bootstrap 95% interval (same resample indices for "
                                    "both), low end"),
    "fid_delta_ci_high": ("float64", "the same, high end"),
    "fid_delta_pct": ("float64", "100 x fid_delta / FID(dense)"),
    "fid_delta_samples_for_1pct": ("int64", "estimated N at which the fid_delta interval half-width reaches 1% of "
                                            "dense FID (1/sqrt(N) scaling; null when the interval is 0)"),
    "precision_delta": ("float64", "precision(method) - precision(dense), same seeds"),
    "recall_delta": ("float64", "recall(method) - recall(dense), same seeds"),
    "isc_delta": ("float64", "IS(method) - IS(dense), same seeds"),
    # same-seed fidelity against dense
    "fidelity_token_agreement": ("float64", "fraction of tokens equal to the dense run with the same seeds"),
    "fidelity_token_agreement_per_scale": ("list<float64>", "the same, per scale"),
    "fidelity_psnr_db": ("float64", "PSNR of the images against the dense images (inf when identical)"),
    "dense_cache": ("string", "dense reference outputs: reused (from the cache) | stored (this dense run) | "
                              "generated (for this run, then cached)"),
    # environment
    "env_harness": ("string", "var-bench version"),
    "env_torch": ("string", "torch version"),
    "env_torch_fidelity": ("string", "torch-fidelity version"),
    "env_fvcore": ("string", "fvcore version"),
    "env_ray": ("string", "ray version"),
    "env_python": ("string", "python version"),
    "env_platform": ("string", "OS / platform string"),
    "env_device_name": ("string", "CPU model or GPU name"),
    "env_threads": ("int64", "torch intra-op threads"),
    "env_code_commit": ("string", "git commit of the harness (-dirty if modified)"),
    "env_host": ("string", "host name"),
    "started_at": ("string", "UTC start, ISO 8601"),
    "finished_at": ("string", "UTC end, ISO 8601"),
    "wall_s": ("float64", "wall seconds of measure(): validation, FLOP count, generation, quality, dense reference"),
    "phase_s": ("json", "wall seconds per phase of the measurement: {phase: seconds}"),
}

# columns that are null where they do not apply (every other SCHEMA column always holds a finite value)
NULLABLE = {
    "speedup_aa": "dense rows only", "speedup_aa_ci_low": "dense rows only", "speedup_aa_ci_high": "dense rows only",
    "time_flop_efficiency": "null when the MACs change by less than 1% (dense; DMoE where its router costs what "
                            "its experts save)",
    "fid_delta_samples_for_1pct": "null when the ΔFID interval has zero width (dense)",
}

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
    from bench.checkpoints import check_writable_dir
    check_writable_dir(results_dir, "results directory")
    path = os.path.abspath(results_dir)
    rows = os.path.join(path, ROWS)
    if os.path.exists(rows) and not (os.path.isdir(rows) and os.access(rows, os.W_OK | os.X_OK)):
        raise BenchError(f"results directory {results_dir!r} is not writable ({rows})")


# ---------------------------------------------------------------------------------------------- writing
def _plain(v):
    """numpy scalars/arrays and tuples -> plain python values."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        return v.tolist()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


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
    """Delete temp files of writers that no longer run (a killed run); returns how many."""
    n = 0
    for p in glob.glob(os.path.join(results_dir, ROWS, TMP_PREFIX + "*")):
        m = re.match(re.escape(TMP_PREFIX) + r"(\d+)-", os.path.basename(p))
        if m and not _pid_alive(int(m.group(1))):
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
                tables.append(f.read(use_threads=False))
        except (OSError, pa.ArrowInvalid) as e:  # cannot happen through append_row; never hide it silently
            print(f"warning: skipping unreadable results file {p}: {e}", file=sys.stderr)
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
            df[k] = _coerce(df[k], t)
    if sweep is not None:
        df = df[df["sweep"] == sweep]
    if "started_at" in df.columns:
        df = df.sort_values(["started_at", "run_id"], kind="stable")
    return df.reset_index(drop=True)


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
    from bench.atomic import atomic_write_text
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
