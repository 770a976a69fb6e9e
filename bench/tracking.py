"""Experiment tracking (optional): each results row also recorded as one run in MLflow, Weights & Biases or
TensorBoard (`--track mlflow,wandb,tensorboard` on `run` and `sweep`), through each library's own API.

    backends = check_backends(["mlflow", "tensorboard"])    # BenchError (one line) on an unknown or missing one
    tracker = Tracker(backends, results_dir="results")       # before the measurement: nothing is written yet
    tracker.track(row)                                       # after the row is stored; never raises

A run's parameters are the row's configuration (method, param_*, model, samples, seed, sampling, dtype, sweep and
trial keys, sweep_*/ray_*/env_* columns) and its metrics every finite number of the row (FID, ΔFID and intervals,
MACs, speedup, time, memory, accuracy, SSIM, ...; booleans as 0/1). Lists (per-scale columns) and JSON columns stay
in the results store only; the run's `run_id` parameter names the row there.

  mlflow       MlflowClient: honours MLFLOW_TRACKING_URI (else mlflow's own default store) and
               MLFLOW_EXPERIMENT_NAME (else experiment var-bench, or var-bench/<sweep> for a sweep's rows)
  wandb        wandb.init: offline unless WANDB_MODE says otherwise (no account needed; `wandb sync DIR` uploads),
               in <track dir>/wandb; project WANDB_PROJECT or var-bench; a sweep's runs grouped by sweep id
  tensorboard  torch.utils.tensorboard.SummaryWriter: event files in <track dir>/tensorboard/[<sweep id>/]<run>, the
               metrics as scalars at step 0 and the configuration in the HParams dashboard

The track dir is --track-dir, default <results>/tracking. A tracking failure never loses the row (it is stored
before tracking starts): it is logged as a warning. The libraries come with `pip install 'var-bench[tracking]'`.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import socket
import time
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

from bench.defaults import TRACKING_BACKENDS
from bench.errors import BenchError
from bench.log import get_logger
from bench.results import SCHEMA

logger = get_logger(__name__)

INSTALL_HINT = "pip install 'var-bench[tracking]'"
TRACK_SUBDIR = "tracking"          # default track dir: <results>/tracking
# the row's configuration: logged as parameters (whatever their type); every other finite number is a metric
CONFIG_COLUMNS = ("run_id", "sweep", "sweep_id", "trial_key", "method", "method_kind", "method_label",
                  "method_config", "model", "model_id", "model_depth", "model_source", "samples", "seed",
                  "batch_size", "cfg", "top_k", "top_p", "more_smooth", "device", "dtype", "flop_images",
                  "warmup_batches", "timing_rounds", "reference", "reference_count", "extractor",
                  "resolve_target_pct", "max_samples", "preset")
CONFIG_PREFIXES = ("param_", "sweep_", "ray_", "env_")
# modules each backend imports (the first missing one is named in the error)
_MODULES = {"mlflow": ("mlflow",), "wandb": ("wandb",), "tensorboard": ("tensorboard", "torch.utils.tensorboard")}
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")      # MLflow stores that need SQLAlchemy and Alembic
_MLFLOW_PARAM_CHARS = 6000                                     # MLflow's limit on a parameter value
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# ================================================================================================ checks
def parse_backends(values: Optional[Iterable[str]]) -> Tuple[str, ...]:
    """The backends of --track (repeatable, each a comma list), in order, once each; BenchError on an unknown one."""
    valid = ", ".join(TRACKING_BACKENDS)
    out = []
    for value in values or ():
        for name in str(value).split(","):
            key = name.strip().lower()
            if not key:
                raise BenchError(f"--track {value!r} names no backend; valid: {valid} (repeat --track or separate "
                                 f"with commas)")
            if key not in TRACKING_BACKENDS:
                raise BenchError(f"--track: unknown tracking backend {name.strip()!r}; valid: {valid}")
            if key not in out:
                out.append(key)
    return tuple(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _require(backend: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BenchError(f"--track {backend}: {module} is not installed ({_first_line(e)}); install the tracking "
                         f"libraries with: {INSTALL_HINT}") from None
    except Exception as e:   # installed but broken (e.g. a protobuf it does not support)
        raise BenchError(f"--track {backend}: {module} cannot be imported ({type(e).__name__}: {_first_line(e)}); "
                         f"reinstall the tracking libraries with: {INSTALL_HINT}") from None


def check_backends(values: Optional[Iterable[str]]) -> Tuple[str, ...]:
    """parse_backends, then import each backend's library (and, for an MLflow database store, SQLAlchemy and
    Alembic): a missing one is one line naming the install command, before anything is measured or written."""
    backends = parse_backends(values)
    for b in backends:
        for module in _MODULES[b]:
            _require(b, module)
        if b == "mlflow":
            uri = mlflow_uri()
            if uri.split(":", 1)[0].split("+", 1)[0] in _DB_SCHEMES:
                for module in ("sqlalchemy", "alembic"):
                    _require(b, module)
    return backends


def mlflow_uri() -> str:
    """The tracking store MLflow uses: MLFLOW_TRACKING_URI, else its own default."""
    import mlflow
    return str(mlflow.get_tracking_uri())


def track_dir(results_dir: str, given: Optional[str] = None) -> str:
    """Where wandb and tensorboard write: --track-dir, else <results>/tracking."""
    return os.path.abspath(given or os.path.join(results_dir, TRACK_SUBDIR))


# ================================================================================================ the flags
def add_track_args(p, what: str) -> None:
    """--track / --track-dir of `run` and `sweep` (parsing imports nothing heavy: the names from bench.defaults)."""
    g = p.add_argument_group("tracking")
    g.add_argument("--track", action="append", default=[], metavar="BACKEND",
                   help=f"also record {what} as a run in an experiment tracker: {', '.join(TRACKING_BACKENDS)}; "
                        f"repeatable or comma-separated (needs {INSTALL_HINT}). mlflow honours MLFLOW_TRACKING_URI "
                        "and MLFLOW_EXPERIMENT_NAME; wandb runs offline unless WANDB_MODE says otherwise. Rows are "
                        "stored first: a tracking failure is a warning")
    g.add_argument("--track-dir", default=None, metavar="DIR",
                   help="where wandb and tensorboard write (default: <results>/tracking)")


def tracker_from_args(a) -> Optional["Tracker"]:
    """The Tracker of --track / --track-dir / --results, checked (names, libraries, a writable --track-dir) before
    anything runs; None without --track."""
    backends = check_backends(a.track)
    if not backends:
        return None
    if set(backends) & {"wandb", "tensorboard"}:
        from bench.checkpoints import check_writable_dir   # lazy: pulls torch; the CLI imports this module
        check_writable_dir(track_dir(a.results, a.track_dir), "--track-dir")
    return Tracker(backends, a.results, a.track_dir)


# ================================================================================================ the row
def _schema_types() -> Dict[str, str]:
    try:
        return {k: t for k, (t, _) in SCHEMA.items()}
    except Exception:   # tracking works on the row alone
        return {}


def _number(value: Any, kind: Optional[str]) -> Optional[float]:
    """A finite number from a row value (numpy scalars, and the strings a JSON round trip with default=str makes of
    them), or None. Booleans are 0/1."""
    if isinstance(value, str):
        text = value.strip()
        if kind == "bool" and text in ("True", "False"):
            return float(text == "True")
        if kind not in (None, "int64", "float64") or not _NUMBER.match(text):
            return None
        value = float(text)
    elif hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()      # numpy scalar
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    return None


def _param_value(value: Any) -> Any:
    """A parameter value: str/int/float/bool as is, lists and dicts as JSON; None for missing (None, NaN)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def is_config(column: str) -> bool:
    return column in CONFIG_COLUMNS or column.startswith(CONFIG_PREFIXES)


def split_row(row: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, float]]:
    """(parameters, metrics) of a row: its configuration columns, and its other finite numbers."""
    types = _schema_types()
    params: Dict[str, Any] = {}
    metrics: Dict[str, float] = {}
    for k, v in row.items():
        if is_config(k):
            p = _param_value(v)
            if p is not None:
                params[k] = p
            continue
        kind = types.get(k)
        if kind in ("string", "json") or (kind or "").startswith("list"):
            continue
        x = _number(v, kind)
        if x is not None:
            metrics[k] = x
    return params, metrics


def run_name(row: Dict[str, Any]) -> str:
    """A readable name of the row's run: the sweep point, else `<method label> on <model>`."""
    return str(row.get("sweep_point") or f"{row.get('method_label') or row.get('method', '?')} on "
                                          f"{row.get('model', '?')}")


def _safe(text: str, allowed: str = r"\w\-.=") -> str:
    return re.sub(rf"[^{allowed}]+", "_", str(text)).strip("_") or "run"


# ================================================================================================ the backends
class Tracker:
    """Records rows as runs in the chosen backends (check_backends first). One Tracker serves a whole sweep: the
    MLflow client and experiments are reused across its rows."""

    def __init__(self, backends: Sequence[str], results_dir: str, directory: Optional[str] = None):
        self.backends = tuple(backends)
        self.results_dir = os.path.abspath(results_dir)
        self.dir = track_dir(results_dir, directory)
        self._mlflow_client = None
        self._experiments: Dict[str, str] = {}
        self._home = (socket.gethostname(), os.getpid())

    def __getstate__(self):   # a copy (Ray pickles the sweep's callback) holds no client
        return dict(self.__dict__, _mlflow_client=None, _experiments={})

    def track(self, row: Dict[str, Any]) -> Dict[str, str]:
        """Record `row` (already in the results store) in every backend; returns {backend: where} for those that
        recorded it. Never raises: a backend's failure is a warning (the row stays in the store). Only the process
        that made the Tracker records: a copy elsewhere (a sweep's callback run on the cluster through Ray Client,
        whose rows reach the driver afterwards) does nothing."""
        if (socket.gethostname(), os.getpid()) != self._home:
            logger.debug(f"tracking: row {row.get('run_id', '?')} left to the driver (this is a copy of its tracker)")
            return {}
        params, metrics = split_row(row)
        done: Dict[str, str] = {}
        for b in self.backends:
            try:
                done[b] = getattr(self, f"_track_{b}")(row, params, metrics)
                logger.info(f"tracking: {b}: {done[b]}")
            except Exception as e:   # any failure of the library or its store: the row is safe in the store
                logger.warning(f"tracking: {b} could not record row {row.get('run_id', '?')} ({type(e).__name__}: "
                               f"{_first_line(e)}); the row is stored in {self.results_dir}")
        return done

    # ---------------------------------------------------------------------------------------------- MLflow
    def _track_mlflow(self, row, params, metrics) -> str:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
        if self._mlflow_client is None:
            self._mlflow_client = MlflowClient()          # MLFLOW_TRACKING_URI, else mlflow's default
        client = self._mlflow_client
        experiment_id = self._mlflow_experiment(client, row)
        tags = {"var_bench.run_id": str(row.get("run_id", "")), "var_bench.results": self.results_dir}
        for k in ("sweep", "sweep_id", "trial_key"):
            if row.get(k):
                tags[k] = str(row[k])
        run = client.create_run(experiment_id, run_name=run_name(row), tags=tags)
        rid = run.info.run_id
        try:
            ts = int(time.time() * 1000)
            ps = [Param(_safe(k, r"\w\-. /"), str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in params.items()]
            ms = [Metric(_safe(k, r"\w\-. /"), v, ts, 0) for k, v in metrics.items()]
            for i in range(0, len(ps), 100):               # MLflow takes at most 100 params per batch
                client.log_batch(rid, params=ps[i:i + 100])
            for i in range(0, len(ms), 1000):              # and 1000 metrics
                client.log_batch(rid, metrics=ms[i:i + 1000])
        except BaseException:
            client.set_terminated(rid, "FAILED")
            raise
        client.set_terminated(rid, "FINISHED")
        return f"run {rid} in experiment {self._experiment_name(row)!r} of {client.tracking_uri}"

    @staticmethod
    def _experiment_name(row) -> str:
        sweep = row.get("sweep")
        return os.environ.get("MLFLOW_EXPERIMENT_NAME") or (f"var-bench/{sweep}" if sweep else "var-bench")

    def _mlflow_experiment(self, client, row) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = self._experiment_name(row)
        if name not in self._experiments:
            exp = client.get_experiment_by_name(name)
            self._experiments[name] = exp.experiment_id if exp is not None else client.create_experiment(name)
        return self._experiments[name]

    # ---------------------------------------------------------------------------------------------- W&B
    def _track_wandb(self, row, params, metrics) -> str:
        import wandb
        os.makedirs(self.dir, exist_ok=True)
        mode = os.environ.get("WANDB_MODE") or "offline"
        sweep_id = row.get("sweep_id") or None
        tags = [str(row["sweep"])] if row.get("sweep") else []
        run = wandb.init(mode=mode, dir=self.dir, project=os.environ.get("WANDB_PROJECT") or "var-bench",
                         name=run_name(row), group=sweep_id, job_type="sweep-trial" if sweep_id else "run",
                         tags=tags, config=params,
                         settings=wandb.Settings(silent=True, console="off", disable_git=True, save_code=False))
        try:
            run.log(metrics, step=0)
            where = os.path.dirname(run.dir) if run.dir else self.dir     # <dir>/wandb/offline-run-.../
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish()
        return (f"{mode} run {run.id} in {where}" + (f" (upload: wandb sync {where})" if mode == "offline" else ""))

    # ---------------------------------------------------------------------------------------------- TensorBoard
    def _track_tensorboard(self, row, params, metrics) -> str:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        name = _safe(f"{row.get('run_id', 'run')}_{row.get('method_label') or row.get('method', '')}")
        parts = [self.dir, "tensorboard"] + ([_safe(row["sweep_id"])] if row.get("sweep_id") else []) + [name]
        logdir = os.path.join(*parts)
        writer = SummaryWriter(log_dir=logdir)
        try:
            for k, v in metrics.items():
                writer.add_scalar(k, v, 0)
            # the configuration in the HParams dashboard, next to the same metrics
            for summary in hparams(params, metrics):
                writer.file_writer.add_summary(summary)
            writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params.items()), 0)
        finally:
            writer.close()
        return f"event files in {logdir}"
