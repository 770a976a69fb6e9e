"""The Ray runner: a sweep's pending trials run as Ray Tune grids, phase by phase, on a local Ray or a cluster,
one measured results row per trial. Ray is imported only when a sweep runs (importing it is slow)."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import types
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from bench.errors import BenchError
from bench.log import counter_bar, get_logger, setup_logging
from bench.measure_config import MeasureConfig
from bench.records import SweepRecord
from bench.registry import create_method
from bench.results import row_json
from bench.sweep.process import trial_setup
from bench.sweep.spec import measure_config
from bench.sweep.store import stored_rows
from bench.sweep.trials import Trial, derive_twin_params

logger = get_logger(__package__)    # var_bench.sweep: one logger for the whole package
GENERATION_MIN_SAMPLES = 2000    # --generation-workers applies to trials of at least this many samples


# ================================================================================================ Ray
def _quiet_ray_env() -> None:
    """Before ray is imported: short progress (we print our own lines), no usage reporting, no result loggers."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1e9")
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1")


def _probe(host: str, port: int, timeout: float = 5.0) -> Optional[str]:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return e.strerror or str(e)


def check_address(address: str) -> str:
    """Fail fast (one line) on an address that cannot be a reachable Ray cluster; creates nothing. Returns the
    address to connect to ('auto' resolved the way Ray does: RAY_ADDRESS, else the last `ray start` here)."""
    if address == "auto":
        _quiet_ray_env()
        try:   # ray's own resolution of 'auto' (a private API: pyproject bounds ray below 3)
            from ray._private.services import get_ray_address_from_environment
            found = get_ray_address_from_environment("auto", None)
        except ImportError:
            found = os.environ.get("RAY_ADDRESS")
        except Exception:   # ray raises ConnectionError when several or none are found
            found = None
        if not found or found == "auto":
            raise BenchError("--address auto: no running Ray cluster found on this machine (start one with "
                             "`ray start --head`); valid: HOST:PORT, ray://HOST:PORT, or no --address for a local Ray")
        host, _, port = found.rpartition(":")
        err = _probe(host, int(port)) if port.isdigit() else "not HOST:PORT"
        if err:
            raise BenchError(f"--address auto: the Ray cluster recorded here ({found}) is not reachable ({err}); "
                             f"start one with `ray start --head`, or give HOST:PORT")
        return found
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BenchError(f"--address {address!r} is not valid; valid: auto, HOST:PORT (a head's GCS address), "
                         f"ray://HOST:PORT (Ray Client)")
    if address.startswith("ray://"):
        import importlib.util
        if importlib.util.find_spec("grpc") is None:   # what ray[client] adds to ray
            raise BenchError(f"--address {address}: Ray Client is not installed here (pip install 'ray[client]'); "
                             f"valid instead: auto or the head's GCS address HOST:PORT")
    err = _probe(host.strip("[]"), int(port)) or _probe_grpc(target, gcs=not address.startswith("ray://"))
    if err:
        raise BenchError(f"cannot reach a Ray cluster at {address} ({err}); valid: auto, HOST:PORT or ray://HOST:PORT "
                         f"of a running head (`ray start --head`), or no --address for a local Ray")
    return address


def _probe_grpc(target: str, gcs: bool, timeout: float = 5.0) -> Optional[str]:
    """Ray's GCS (and Ray Client) servers speak gRPC. Something else on the port (a web server, an HTTP/2 proxy)
    would make ray.init retry for a minute or more, logging a warning each time: ask first. A GCS answers its
    GetClusterId call (possibly with an authentication error: still a GCS); anything else does not."""
    try:
        import grpc
    except ImportError:
        return None
    channel = grpc.insecure_channel(target)
    try:
        if not gcs:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return None
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        call(b"", timeout=timeout)
        return None
    except grpc.FutureTimeoutError:
        return f"the port is open but no Ray (gRPC) server answered within {timeout:g} s"
    except grpc.RpcError as e:
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return f"the port is open but no Ray (gRPC) server answered within {timeout:g} s"
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return "something answers there, but it is not a Ray cluster's GCS"
        if code == grpc.StatusCode.UNAUTHENTICATED and not ray_token_configured():
            # ray.init would log an authentication error every few seconds for about a minute before failing
            return ("the cluster requires token authentication and no token is set here; set RAY_AUTH_MODE=token "
                    "and the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token")
        return None   # a GCS (one that wants the token we have)
    finally:
        channel.close()


def ray_token_configured() -> bool:
    """Ray's token authentication is switched on here and a token is at hand (environment or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return False
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN", "").strip()) or os.path.isfile(path)


def connect_ray(address: Optional[str], verbose: bool) -> dict:
    """Start a private local Ray (default) or connect to a cluster; returns what the rows record about it."""
    import logging
    _quiet_ray_env()
    import ray
    if ray.is_initialized():
        ray.shutdown()
    kw = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=verbose, configure_logging=True)
    t = time.time()
    try:
        if address is None:
            import torch
            # "local": never attach to a cluster someone else started on this machine
            ray.init(address="local", num_cpus=os.cpu_count() or 1,
                     num_gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0, **kw)
        else:
            env = {k: v for k, v in os.environ.items() if k.startswith("VARBENCH_")}
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kw)
    except Exception as e:   # ConnectionError, RuntimeError, ValueError ... from ray.init: one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if address is None else ("; if the cluster uses token authentication set RAY_AUTH_MODE=token "
                                           "(token in ~/.ray/auth_token or RAY_AUTH_TOKEN)")
        where = "start a local Ray" if address is None else f"connect to the Ray cluster at {address}"
        raise BenchError(f"could not {where}: {msg}{hint}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [float(n.get("Resources", {}).get("CPU", 0)) for n in nodes]
    gpus = [float(n.get("Resources", {}).get("GPU", 0)) for n in nodes]
    return dict(address=address or "local", version=ray.__version__, nodes=len(nodes),
                num_cpus=float(sum(cpus)), num_gpus=float(sum(gpus)), max_node_cpus=max(cpus) if cpus else 0.0,
                max_node_gpus=max(gpus) if gpus else 0.0, start_s=round(time.time() - t, 2))


def resources(ray_info: dict, device: str, cpus: Optional[float], gpus: Optional[float],
              generation_workers: int = 1) -> Tuple[float, float]:
    """Per-trial resources: by default a whole machine (its CPUs; its GPUs when the device is cuda). With
    generation workers, each of them gets as much again, and all of them must fit in the cluster at once."""
    cpus = ray_info["max_node_cpus"] if cpus is None else float(cpus)
    if gpus is None:
        gpus = ray_info["max_node_gpus"] if device.startswith("cuda") else 0.0
    gpus = float(gpus)
    if cpus <= 0:
        raise BenchError(f"--cpus-per-trial must be > 0, got {cpus:g}")
    if cpus > ray_info["max_node_cpus"]:
        raise BenchError(f"--cpus-per-trial {cpus:g} exceeds the largest node's CPUs; valid: 0 < N <= "
                         f"{ray_info['max_node_cpus']:g}")
    if gpus < 0 or gpus > ray_info["max_node_gpus"]:
        raise BenchError(f"--gpus-per-trial {gpus:g} is not available; valid: 0 .. {ray_info['max_node_gpus']:g} "
                         f"(GPUs of the largest node)")
    if device.startswith("cuda") and gpus == 0:
        raise BenchError(f"device {device} needs --gpus-per-trial > 0 (no node of the cluster has a GPU)"
                         if ray_info["max_node_gpus"] == 0 else f"device {device} needs --gpus-per-trial > 0")
    w = generation_workers
    have_cpus, have_gpus = (ray_info["num_cpus"], ray_info.get("num_gpus", 0.0)) if w > 1 else (0.0, 0.0)
    if w > 1 and (w * cpus > have_cpus or w * gpus > have_gpus):
        need = f"{cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")
        have = f"{have_cpus:g} CPUs" + (f", {have_gpus:g} GPUs" if gpus else "")
        raise BenchError(f"--generation-workers {w} needs {w} x ({need}) at once but the cluster has {have}; valid: "
                         f"fewer workers, or smaller --cpus-per-trial / --gpus-per-trial (each worker gets the "
                         f"trial's)")
    return cpus, gpus


def trial_resources(cpus: float, gpus: float) -> Dict[str, float]:
    """What each trial asks Ray for: its CPUs, and its GPU share when it has one (Ray then sets the trial's
    CUDA_VISIBLE_DEVICES to the GPU(s) it granted)."""
    res = {"CPU": float(cpus)}
    if gpus:
        res["GPU"] = float(gpus)
    return res


# ================================================================================================ one trial (worker)
def run_trial(job: dict) -> dict:
    """Measure one trial (called inside a Ray worker, or directly); returns a short summary, never raises."""
    import traceback
    t0 = time.time()
    try:
        from bench.measure import measure   # lazy: pulls torch; the CLI imports this module
        _, bundle, method, sampling = trial_setup(job)
        workers = generation_workers(job)
        try:
            row = measure(bundle, method, MeasureConfig.from_dict(job["config"]), sampling=sampling,
                          results_dir=job["results_dir"], sweep=job["sweep"], sweep_id=job["sweep_id"],
                          trial_key=job["trial_key"], workers=workers,
                          sweep_trial=SweepRecord(**dict(job["sweep_record"], ray_node=socket.gethostname())))
        finally:
            if workers is not None:
                workers.shutdown()
        keep = ("fid", "fid_ci_low", "fid_ci_high", "macs_analytic_all", "macs_analytic", "macs_fvcore",
                "time_median_s", "images_per_s", "method_label", "run_id", "speedup", "speedup_ci_low",
                "speedup_ci_high", "fid_delta", "fid_delta_ci_low", "fid_delta_ci_high", "timing_noisy")
        out = {k: row.get(k) for k in keep}
        # the whole row travels back too: on a multi-node cluster the worker's disk may not be the driver's
        out.update(status="ok", trial_s=round(time.time() - t0, 2), row_json=row_json(row))
        return out
    except BenchError as e:   # RowNotStored carries the finished row: the driver stores it (ensure_row)
        return dict(status="error", error=str(e), traceback="", trial_s=round(time.time() - t0, 2),
                    row_json=getattr(e, "row_json", None))
    except Exception as e:  # a bug: keep the traceback for the driver to print
        return dict(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(),
                    trial_s=round(time.time() - t0, 2))


def generation_worker_count(requested: int, samples: int, min_samples: int = GENERATION_MIN_SAMPLES) -> int:
    """Processes generating each trial's samples: the requested count for trials of at least `min_samples`
    samples, else 1 (a worker costs a model load, which only many samples repay)."""
    return requested if requested > 1 and samples >= min_samples else 1


def generation_workers(job: dict):
    """The trial's generation workers (bench/sweep/workers.py): job["generation_workers"] - 1 Ray actors, or None
    (one process, or not inside Ray)."""
    n = int(job.get("generation_workers") or 1)
    if n <= 1:
        return None
    import ray
    if not ray.is_initialized():
        logger.warning("generation workers: not inside Ray, so the trial generates all of its samples itself")
        return None
    from bench.sweep.workers import GenerationWorkers   # lazy: pulls torch; the CLI imports this module
    return GenerationWorkers(job, n - 1, job["worker_resources"])


def _trainable(config):
    from ray import tune
    job = config["job"]
    # the worker's messages: only with -v (then prefixed with the trial), else warnings only
    setup_logging(0 if job.get("verbose") else -1, stream=sys.stdout, prefix=f"[{job['point_id']}] ")
    tune.report(run_trial(job))


# ================================================================================================ the driver
def _fmt_macs(v) -> str:
    return "-" if v is None else f"{v / 1e9:.4g} GMACs"


def _fmt(v, spec=".4g") -> str:
    try:
        return "-" if v is None or v != v else format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def trial_line(done: int, total: int, trial: Trial, res: dict) -> str:
    head = f"[{done}/{total}] {trial.point_id}"
    if res.get("status") != "ok":
        return f"{head}: FAILED ({res.get('trial_s', 0):.0f} s): {res.get('error', 'no result')}"
    ci = f" [{_fmt(res.get('fid_ci_low'))}, {_fmt(res.get('fid_ci_high'))}]"
    paired = ""
    if res.get("speedup") is not None:
        paired = (f" | speedup {_fmt(res.get('speedup'), '.3f')}x [{_fmt(res.get('speedup_ci_low'), '.3f')}, "
                  f"{_fmt(res.get('speedup_ci_high'), '.3f')}]{' (noisy)' if res.get('timing_noisy') else ''}")
    if res.get("fid_delta") is not None:
        paired += (f" | ΔFID {_fmt(res.get('fid_delta'), '+.3g')} [{_fmt(res.get('fid_delta_ci_low'), '+.3g')}, "
                   f"{_fmt(res.get('fid_delta_ci_high'), '+.3g')}]")
    return (f"{head}: FID {_fmt(res.get('fid'))}{ci} | {_fmt_macs(res.get('macs_analytic_all'))}/image | "
            f"{_fmt(res.get('time_median_s'))} s/batch{paired} | {res.get('trial_s', 0):.0f} s")


def trial_threads(cpus: float) -> int:
    """torch threads of a trial: one per CPU Ray gives it (at least one), so that a trial on a shared machine
    keeps to its share instead of spreading over every core."""
    return max(1, int(cpus))


class SweepRunner:
    """Runs the pending trials of one sweep invocation, phase by phase, through Ray Tune."""

    def __init__(self, spec: dict, trials: List[Trial], sweep_id: str, results_dir: str, ray_info: dict,
                 cpus: float, gpus: float, concurrent: int = 1, verbose: bool = False,
                 status_every_s: float = 60.0, generation_workers: int = 1, tracker=None):
        self.spec, self.trials, self.sweep_id = spec, trials, sweep_id
        self.results_dir = os.path.abspath(results_dir)
        self.ray_info, self.cpus, self.gpus, self.concurrent = ray_info, cpus, gpus, concurrent
        self.verbose, self.status_every_s = verbose, status_every_s
        self.workers = generation_workers     # processes per trial (generation_worker_count)
        self.failed: Dict[str, str] = {}
        self.skipped: Dict[str, str] = {}
        self.interrupted = False     # Ctrl-C: Ray Tune stops the phase; later phases are not started
        self.tracker = tracker       # bench.tracking.Tracker (--track): each reported row, once stored, as one run

    def job(self, t: Trial, params: dict) -> dict:
        """What one trial's process needs (plain values: Ray passes it to the trial's worker)."""
        s = self.spec
        record = SweepRecord(sweep_point=t.point_id, sweep_entry=t.entry, sweep_twin=t.twin, sweep_parent=t.parent,
                             sweep_axes=json.dumps(t.axes, sort_keys=True), sweep_quick=bool(s.get("quick_applied")),
                             ray_address=self.ray_info["address"], ray_version=self.ray_info["version"],
                             ray_num_cpus=self.ray_info["num_cpus"], ray_nodes=self.ray_info["nodes"],
                             ray_cpus_per_trial=self.cpus, ray_gpus_per_trial=self.gpus,
                             ray_concurrent_trials=self.concurrent, ray_generation_workers=self.workers)
        config = replace(measure_config(s), threads=trial_threads(self.cpus))
        return dict(point_id=t.point_id, model=t.model, method=t.method, params=params, device=s["device"],
                    spec_sampling={"sampling": dict(s["sampling"])}, config=config.as_dict(),
                    modules=list(s["modules"]), results_dir=self.results_dir, sweep=s["name"],
                    sweep_id=self.sweep_id, trial_key=t.key(self.sweep_id), sweep_record=record.row(),
                    verbose=self.verbose, generation_workers=self.workers,
                    worker_resources=trial_resources(self.cpus, self.gpus))

    def ensure_row(self, row_json: Optional[str]) -> None:
        """Store the trial's row here if the worker wrote it elsewhere (another node without shared storage)."""
        # looked up at call time: tests replace bench.results.append_row
        from bench.results import ROWS, append_row, row_filename
        if not row_json:
            return
        row = json.loads(row_json)
        if not os.path.exists(os.path.join(self.results_dir, ROWS, row_filename(row))):
            append_row(self.results_dir, row)
            logger.info(f"  (row of {row.get('trial_key')} written here: the trial ran on {row.get('ray_node')})")

    def run(self) -> Tuple[int, int]:
        """Returns (trials that reported now, trials failed or skipped). On a terminal a bar with ETA counts the
        trials; every finished trial is one log line either way."""
        rows = stored_rows(self.results_dir, self.sweep_id)
        before = len([t for t in self.trials if t.key(self.sweep_id) in rows])
        with counter_bar(len(self.trials), f"sweep {self.spec['name']}", "trial", initial=before) as self.bar:
            return self._run_phases()

    def _run_phases(self) -> Tuple[int, int]:
        total = len(self.trials)
        ran = 0
        for phase in sorted({t.phase for t in self.trials}):
            rows = stored_rows(self.results_dir, self.sweep_id)
            done = len([t for t in self.trials if t.key(self.sweep_id) in rows])
            jobs = []
            for t in self.trials:
                if t.phase != phase or t.key(self.sweep_id) in rows:
                    continue
                params = t.params
                if t.parent:
                    prow = rows.get(f"{self.sweep_id}/{t.parent}")
                    if prow is None:
                        self.skipped[t.point_id] = f"its parent {t.parent} has no row"
                        logger.info(f"[skip] {t.point_id}: its parent {t.parent} has no row")
                        self.bar.update(1)
                        continue
                    try:
                        params = derive_twin_params(t, prow)
                        create_method(t.method, **params)
                    except BenchError as e:
                        self.failed[t.point_id] = str(e)
                        logger.info(f"[{done}/{total}] {t.point_id}: FAILED: {e}")
                        self.bar.update(1)
                        continue
                jobs.append((t, self.job(t, params)))
            if jobs:
                ran += self._tune(jobs, done, total)
            if self.interrupted:
                break
        return ran, len(self.failed) + len(self.skipped)

    def _tune(self, jobs, done: int, total: int) -> int:
        """Run one phase's jobs as one Ray Tune grid; returns how many trials reported."""
        import shutil
        import tempfile
        from ray import tune
        by_id = {j["point_id"]: t for t, j in jobs}
        progress = tune_progress(self, by_id, done, total)
        res = trial_resources(self.cpus, self.gpus)
        if self.workers > 1:   # the trial and its workers are placed at once (bundle 0: the trial)
            res = tune.PlacementGroupFactory([res] * self.workers, strategy="PACK")
        storage = tempfile.mkdtemp(prefix="var-bench-ray-")
        try:
            tuner = tune.Tuner(
                tune.with_resources(_trainable, res),
                param_space={"job": tune.grid_search([j for _, j in jobs])},
                tune_config=tune.TuneConfig(max_concurrent_trials=self.concurrent, reuse_actors=True,
                                            trial_name_creator=lambda t: f"trial_{t.trial_id}",
                                            trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
                run_config=tune.RunConfig(name=self.sweep_id, storage_path=storage, verbose=0,
                                          callbacks=[progress], failure_config=tune.FailureConfig(max_failures=0),
                                          log_to_file=False))
            grid = tuner.fit()
            # Through Ray Client (ray://) the Tune loop and its callbacks run on the cluster, so the trials'
            # results reach this process only here, with the result grid: record those the callback did not see
            for r in grid:
                pid = ((r.config or {}).get("job") or {}).get("point_id")
                if pid in by_id and pid not in progress.seen and (r.metrics or r.error is not None):
                    progress.record(pid, r.metrics if r.metrics and "status" in r.metrics else None)
            if any(pid not in progress.seen for pid in by_id):    # stopped before every trial reported
                self.interrupted = True
        finally:
            shutil.rmtree(storage, ignore_errors=True)
        return len(progress.seen)


def interrupted_by_user() -> bool:
    """Ray Tune's SIGINT handler, on a Ctrl-C, ends the run and puts back the default handler (a second Ctrl-C then
    stops at once): a trial that ends without a result after that was interrupted, not crashed."""
    import signal
    return signal.getsignal(signal.SIGINT) is signal.SIG_DFL


class TrialProgress:
    """The log of one phase as Ray Tune reports it: one line per finished trial; Ray's own status in one line at most
    every runner.status_every_s. Ray Tune takes it as made by tune_progress()."""

    def __init__(self, runner: SweepRunner, trials_by_id: Dict[str, Trial], done: int, total: int):
        self.runner, self.trials_by_id, self.done, self.total = runner, trials_by_id, done, total
        self.started = self.last = time.time()
        self.seen = set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.record(trial.config["job"]["point_id"], result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.record(trial.config["job"]["point_id"], None)

    def record(self, pid, result):
        """One finished trial (result None: its worker died), once."""
        if pid in self.seen:
            return
        self.seen.add(pid)
        self.done += 1
        runner = self.runner
        runner.bar.update(1)
        if result is None:
            if interrupted_by_user():
                runner.interrupted = True
                runner.skipped[pid] = "interrupted (Ctrl-C); its finished batches are kept for --resume"
                logger.info(f"[{self.done}/{self.total}] {pid}: interrupted (Ctrl-C); its finished batches are kept, "
                            f"--resume continues from them")
                return
            runner.failed[pid] = "the trial's worker died"
            logger.info(f"[{self.done}/{self.total}] {pid}: FAILED: the trial's worker died (see Ray's log)")
            return
        if result.get("row_json"):   # also a trial whose worker could not write its finished row
            try:
                runner.ensure_row(result["row_json"])
                result["status"] = "ok"
            except OSError as e:
                logger.error(f"{pid}: the row could not be stored here either ({e.strerror or e}); the row: "
                             f"{result['row_json']}")
        if result.get("status") != "ok":
            runner.failed[pid] = result.get("error", "")
        logger.info(trial_line(self.done, self.total, self.trials_by_id[pid], result))
        if result.get("traceback"):
            logger.info(result["traceback"].rstrip())
        if runner.tracker is not None and result.get("status") == "ok" and result.get("row_json"):
            runner.tracker.track(json.loads(result["row_json"]))   # here, the driver: rows from any node

    def on_step_end(self, iteration, trials, **info):
        if time.time() - self.last >= self.runner.status_every_s:
            self.last = time.time()
            from collections import Counter
            c = Counter(t.status for t in trials)
            running = [t.config["job"]["point_id"] for t in trials if t.status == "RUNNING"]
            logger.info(f"ray: {', '.join(f'{n} {s}' for s, n in sorted(c.items()))} | "
                        f"{self.done}/{self.total} done | {time.time() - self.started:.0f} s"
                        + (f" | running {', '.join(running)}" if running else ""))


def tune_progress(runner: SweepRunner, trials_by_id: Dict[str, Trial], done: int, total: int) -> TrialProgress:
    """A TrialProgress that is also a Ray Tune callback (its base class is added here: importing ray.tune is slow)."""
    from ray import tune
    callback_class = types.new_class("TuneTrialProgress", (TrialProgress, tune.Callback),
                                     exec_body=lambda ns: ns.update(__module__=__name__))
    return callback_class(runner, trials_by_id, done, total)
