"""The sweep store and resume: each invocation's manifest (`<results>/sweeps/<sweep_id>.json`) and rows, and
which invocation a run is: a new one, or the one `--resume` continues."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

from bench.errors import BenchError
from bench.log import get_logger
from bench.registry import create_method
from bench.results import ROWS, load_results, row_files
from bench.sweep.spec import import_modules
from bench.sweep.trials import Trial, expand, validate_trials

logger = get_logger(__package__)    # var_bench.sweep: one logger for the whole package

MANIFEST_DIR = "sweeps"           # under the results directory, next to rows/
SPEC_VERSION = 1


def manifest_dir(results_dir: str) -> str:
    return os.path.join(results_dir, MANIFEST_DIR)


def new_sweep_id(name: str) -> str:
    """A new invocation's id: `<sweep>-<UTC time>-<4 hex>`."""
    ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{name}-{ts}-{secrets.token_hex(2)}"


def write_manifest(results_dir: str, manifest: dict) -> str:
    from bench.atomic import atomic_write_text   # looked up at call time: tests replace bench.atomic.atomic_write_text
    d = manifest_dir(results_dir)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, manifest["sweep_id"] + ".json")
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True, default=str))
    return path


def _manifest_shape_ok(m) -> bool:
    """What readers rely on (reports: sweep, sweep_id, trials; resume also spec and models)."""
    return (isinstance(m, dict) and isinstance(m.get("sweep_id"), str) and isinstance(m.get("trials"), list)
            and all(isinstance(t, dict) for t in m["trials"]) and isinstance(m.get("spec", {}), dict)
            and isinstance(m.get("models", []), (list, dict)))


def read_manifests(results_dir: str, name: Optional[str] = None) -> List[dict]:
    """Sweep manifests of the store, oldest first (by creation time)."""
    d = manifest_dir(results_dir)
    out = []
    if os.path.isdir(d):
        for f in sorted(os.listdir(d)):
            if f.endswith(".json") and not f.startswith("."):
                try:
                    with open(os.path.join(d, f)) as fh:
                        m = json.load(fh)
                except (OSError, ValueError) as e:
                    logger.warning(f"skipping unreadable sweep manifest {f}: {e}")
                    continue
                if not _manifest_shape_ok(m):
                    logger.warning(f"skipping sweep manifest {f}: not a manifest (expects an object with sweep_id, "
                                   f"spec, models and a list of trial objects)")
                    continue
                if name is None or m.get("sweep") == name:
                    out.append(m)
    return sorted(out, key=lambda m: (m.get("created_at", ""), m.get("sweep_id", "")))


def stored_rows(results_dir: str, sweep_id: str):
    """{trial_key: row dict} of a sweep invocation."""
    if not os.path.isdir(results_dir):
        return {}
    df = load_results(results_dir)
    if df.empty or "sweep_id" not in df.columns:
        return {}
    df = df[df["sweep_id"] == sweep_id]
    return {r["trial_key"]: r for r in df.to_dict("records")}


def plan(spec: dict, trials: List[Trial], sweep_id: str, results_dir: str, rerun_keys: Sequence[str] = ()
         ) -> List[Trial]:
    """The trials still to run: those without a stored row, and those a --rerun runs again."""
    rerun_keys = set(rerun_keys)
    rows = stored_rows(results_dir, sweep_id)
    return [t for t in trials if t.key(sweep_id) not in rows or t.key(sweep_id) in rerun_keys]


def manifest_for(spec: dict, trials: List[Trial], sweep_id: str, models: Dict[str, dict]) -> dict:
    return dict(version=SPEC_VERSION, sweep=spec["name"], sweep_id=sweep_id,
                created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                spec={k: v for k, v in spec.items()}, models=models,
                trials=[dict(asdict(t), key=t.key(sweep_id)) for t in trials])


def spec_fingerprint(spec: dict) -> str:
    """What makes two invocations the same sweep (not description or where the file lives)."""
    keep = {k: spec[k] for k in ("models", "device", "samples", "batch_size", "seed", "sampling", "reference",
                                 "measure", "modules", "points")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ================================================================================================ resume
def latest_sweep_id_in_rows(results: str, spec: dict):
    """The latest invocation of this sweep found in the rows themselves, if its rows match the settings."""
    if not os.path.isdir(results):
        return None
    df = load_results(results, sweep=spec["name"])
    if df.empty or "sweep_id" not in df.columns:
        return None
    last = df.sort_values("started_at").iloc[-1]
    rows = df[df["sweep_id"] == last["sweep_id"]]
    sid = str(last["sweep_id"])
    fix = "give the same --quick/--set, or start a new sweep without --resume"
    for col in ("samples", "seed", "batch_size"):
        if set(rows[col].dropna().astype(int)) - {int(spec[col])}:
            raise BenchError(f"--resume: sweep {sid} (rows only, no manifest) has {col}="
                             f"{sorted(set(rows[col].dropna().astype(int)))}, not {spec[col]}; {fix}")
    for col, want in spec["sampling"].items():   # settings the sweep fixes (None: each model's own)
        if want is not None and col in rows.columns and set(rows[col].dropna()) - {want}:
            raise BenchError(f"--resume: sweep {sid} (rows only, no manifest) has {col}="
                             f"{sorted(set(rows[col].dropna()))}, not {want}; {fix}")
    trials = {t.key(sid): t for t in expand(spec)}
    for r in rows.to_dict("records"):   # a stored trial must be the trial of the same key now: same parameters
        t = trials.get(r.get("trial_key"))
        if t is None or t.parent:        # (a twin's parameters come from its parent's row)
            continue
        config = json.loads(r.get("method_config") or "{}")
        now = json.loads(json.dumps(create_method(t.method, **t.params).config, sort_keys=True, default=str))
        differ = sorted(k for k in t.params if k in config and config[k] != now.get(k))
        if differ or r.get("method") != t.method:
            raise BenchError(f"--resume: sweep {sid}'s row of {t.point_id} was run with other settings "
                             f"({', '.join(f'{k}={config[k]!r}' for k in differ) or 'method ' + str(r.get('method'))}"
                             f"); {fix}")
    return sid


@dataclass
class Invocation:
    """One run of a sweep: a new invocation, or the earlier one that --resume continues."""
    spec: dict
    trials: List[Trial]
    sweep_id: str
    resumed: bool = False
    models_before: Optional[Dict[str, dict]] = None   # the models its manifest recorded; None: no manifest yet
    note: str = ""                                     # how --resume decided, for the user
    rerun: Optional[Rerun] = None                      # --rerun: applied by ensure_manifest, after every check

    @property
    def needs_manifest(self) -> bool:
        return self.models_before is None or self.rerun is not None

    @property
    def rerun_keys(self) -> List[str]:
        return self.rerun.keys if self.rerun is not None else []


SUPERSEDED = "superseded"   # rows/superseded/: rows a --rerun replaced, kept (results are never lost), not loaded


@dataclass
class Rerun:
    """A --rerun decided but not yet applied: the manifest as it will be, and the stored rows it supersedes.
    Applied (rows moved to rows/superseded/, manifest written) only after every check, so a refused run writes
    nothing."""
    manifest: dict
    keys: List[str]        # trial keys that run again
    row_files: List[str]   # their stored rows


def rerun_entries(m: dict, spec: dict, rerun: Sequence[str], results_dir: str) -> Rerun:
    """The manifest `m` of a resumed invocation with the entries `rerun` redefined as the sweep file (`spec`) has them
    now: the manifest's spec and trials updated (the rest as recorded) and the rerun recorded in its `reruns`; the
    entries' stored rows — twins included, since a twin derives its parameters from its parent's row — superseded."""
    unknown = sorted(set(rerun) - set(spec["points"]))
    if unknown:
        raise BenchError(f"--rerun: no point {unknown[0]!r} in the sweep file {spec['name']}; valid: "
                         f"{', '.join(spec['points'])}")
    missing = sorted(set(rerun) - set(m["spec"].get("points", {})))
    if missing:
        raise BenchError(f"--rerun: sweep {m['sweep_id']} has no point {missing[0]!r} (its points: "
                         f"{', '.join(m['spec'].get('points', {}))}); a new point needs a new sweep without --resume")
    new_spec = json.loads(json.dumps(m["spec"], default=str))
    for entry in rerun:
        new_spec["points"][entry] = spec["points"][entry]
    trials = expand(new_spec)
    keys = {t.key(m["sweep_id"]) for t in trials if t.entry in rerun}
    keys |= {t.get("key") for t in m["trials"] if t.get("entry") in rerun}
    files = []
    import pandas as pd
    for f in row_files(results_dir):
        try:
            key = pd.read_parquet(f, columns=["trial_key"])["trial_key"].iloc[0]
        except Exception:   # an unreadable row file is the loader's to report, not this one's to move
            continue
        if key in keys:
            files.append(f)
    manifest = dict(m, spec=new_spec, trials=[dict(asdict(t), key=t.key(m["sweep_id"])) for t in trials])
    manifest["reruns"] = list(m.get("reruns", [])) + [dict(
        entries=list(rerun), at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        superseded_rows=[os.path.join(SUPERSEDED, os.path.basename(f)) for f in files],
        previous_points={e: m["spec"]["points"][e] for e in rerun})]
    return Rerun(manifest, sorted(k for k in keys if k), files)


def apply_rerun(results_dir: str, rerun: Rerun) -> None:
    """Move the superseded rows to rows/superseded/ (kept: results are never lost; not loaded), then write the
    updated manifest, so that a later plain --resume continues the rerun."""
    dest_dir = os.path.join(results_dir, ROWS, SUPERSEDED)
    for f in rerun.row_files:
        os.makedirs(dest_dir, exist_ok=True)
        dest = os.path.join(dest_dir, os.path.basename(f))
        if os.path.exists(dest):     # superseded twice: keep both
            root, ext = os.path.splitext(dest)
            dest = f"{root}-{secrets.token_hex(3)}{ext}"
        os.replace(f, dest)
    write_manifest(results_dir, rerun.manifest)
    logger.info(f"--rerun: {len(rerun.row_files)} earlier row(s) kept under {dest_dir}")


def resolve_invocation(spec: dict, results_dir: str, resume: bool, quick: bool = False,
                       sets: Sequence[str] = (), rerun: Sequence[str] = ()) -> Invocation:
    """Without resume a new invocation of `spec`. With it the latest invocation of this sweep in the store: from its
    manifest (its own spec and trials; refused if --quick/--set give other settings), else from its rows alone
    (the current settings must match them), else a new one. `rerun` (with resume and a manifest): these entries run
    again as the sweep file defines them now (rerun_entries); the manifest is rewritten before any trial runs."""
    note = ""
    if rerun and not resume:
        raise BenchError("--rerun needs --resume: it re-runs points of the latest sweep of this name in the store")
    if resume:
        previous = read_manifests(results_dir, spec["name"])
        if previous:
            m = previous[-1]
            if not isinstance(m.get("spec"), dict) or "models" not in m:
                raise BenchError(f"--resume: the manifest of sweep {m['sweep_id']} has no spec or models; start a new "
                                 f"sweep without --resume")
            if (quick or sets) and spec_fingerprint(spec) != spec_fingerprint(m["spec"]):
                raise BenchError(f"--resume: sweep {m['sweep_id']} was run with other settings "
                                 f"(quick={m['spec'].get('quick_applied')}, set={m['spec'].get('sets')}); resume "
                                 f"it without --quick/--set, or start a new sweep without --resume")
            try:
                trials = [Trial(**{k: v for k, v in t.items() if k != "key"}) for t in m["trials"]]
            except TypeError as e:
                raise BenchError(f"--resume: the manifest of sweep {m['sweep_id']} has a malformed trial ({e}); start "
                                 f"a new sweep without --resume") from None
            pending_rerun = None
            if rerun:
                pending_rerun = rerun_entries(m, spec, rerun, results_dir)
                m = pending_rerun.manifest
                trials = [Trial(**{k: v for k, v in t.items() if k != "key"}) for t in m["trials"]]
            changed = "" if spec_fingerprint(spec) == spec_fingerprint(m["spec"]) else (
                f"the sweep file's settings differ from those sweep {m['sweep_id']} started with; resuming it as "
                f"recorded in its manifest (start a new sweep without --resume to run the file as it is now"
                f"{'' if rerun else ', or --rerun POINT to run changed points again'})")
            return Invocation(m["spec"], trials, m["sweep_id"], resumed=True, models_before=m["models"], note=changed,
                              rerun=pending_rerun)
        if rerun:
            raise BenchError(f"--rerun: no manifest of an earlier {spec['name']} sweep in {results_dir}; start the "
                             f"sweep without --resume/--rerun")
        sweep_id = latest_sweep_id_in_rows(results_dir, spec)
        if sweep_id:   # rows without their manifest (e.g. a copied store): the current settings must match
            return Invocation(spec, expand(spec), sweep_id, resumed=True,
                              note=f"no manifest of {sweep_id} in {results_dir}; resuming it with the current settings")
        note = f"no earlier {spec['name']} sweep in {results_dir}; starting a new one"
    return Invocation(spec, expand(spec), new_sweep_id(spec["name"]), note=note)


def validate_invocation(invocation: Invocation) -> Dict[str, dict]:
    """Every check before the first trial: the sweep's modules imported, its trials and models validated
    (validate_trials), and for a resumed sweep the models unchanged since it started. Returns {model key: info}."""
    spec, sweep_id = invocation.spec, invocation.sweep_id
    import_modules(spec["modules"])
    models = validate_trials(spec, invocation.trials)
    if invocation.resumed:
        for k, info in models.items():
            before = (invocation.models_before or {}).get(k, {}).get("model_id")
            if before and info.get("model_id") and before != info["model_id"]:
                raise BenchError(f"--resume: model {k} changed since sweep {sweep_id} started ({before} -> "
                                 f"{info['model_id']}); start a new sweep without --resume")
    return models


def ensure_manifest(results_dir: str, invocation: Invocation, models: Dict[str, dict]) -> None:
    """Record the invocation before its first trial runs, unless it has a manifest already (a new invocation, or one
    resumed from its rows alone, has none)."""
    if not invocation.needs_manifest:
        return
    if invocation.rerun is not None:
        apply_rerun(results_dir, invocation.rerun)
        return
    manifest = manifest_for(invocation.spec, invocation.trials, invocation.sweep_id, models)
    existed = os.path.isdir(manifest_dir(results_dir))
    try:
        write_manifest(results_dir, manifest)
    except OSError as e:   # a full disk (ENOSPC), a quota, a store gone read-only: one line, no trial started
        if not existed:
            try:
                os.rmdir(manifest_dir(results_dir))   # the folder write_manifest made, still empty
            except OSError:
                pass
        raise BenchError(f"sweep {invocation.sweep_id}: cannot write its manifest to "
                         f"{manifest_dir(results_dir)} ({e.strerror or e}); no trial was started; free space there "
                         f"or give another --results") from None
