"""One sweep invocation, from a sweep name to its rows in the store: plan_sweep (the spec with its overrides, the
invocation it starts or resumes, the trials still to run; writes nothing) and run_sweep (Ray started or joined,
the manifest written, the pending trials run, Ray shut down).

    from bench.sweep.session import SweepOptions, plan_sweep, run_sweep
    plan = plan_sweep("tau", "results", quick=True)
    outcome = run_sweep(plan, SweepOptions())      # outcome.complete, outcome.failed, ...
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.errors import BenchError
from bench.log import get_logger
from bench.results import check_results_dir
from bench.sweep import (GENERATION_MIN_SAMPLES, Invocation, SweepRunner, Trial, absolutize_paths, check_address,
                         connect_ray, ensure_manifest, generation_worker_count, list_sweeps, load_spec, plan,
                         read_yaml, resolve_invocation, resources, stored_rows, sweep_path, trial_threads,
                         validate_invocation)

log = get_logger(__name__)


def sweep_descriptions() -> List[Tuple[str, str, str]]:
    """(name, description, figure) of each shipped sweep; an unreadable one says why in its description."""
    out = []
    for name in list_sweeps():
        try:
            d = read_yaml(sweep_path(name))
            out.append((name, d.get("description", "") or "", d.get("figure", "") or ""))
        except BenchError as e:
            out.append((name, f"(unreadable: {e})", ""))
    return out


@dataclass
class SweepOptions:
    """How the trials run (not what they measure: that is the spec)."""
    address: Optional[str] = None               # an existing Ray cluster (default: a private local Ray)
    cpus_per_trial: Optional[float] = None      # default: a whole node, so trials do not share a machine
    gpus_per_trial: Optional[float] = None      # default: a whole node's GPUs when the device is cuda, else 0
    concurrent: int = 1                         # trials at a time
    generation_workers: int = 1                 # processes generating each large trial's samples, the trial's own too
    generation_min_samples: Optional[int] = None   # from this sample count (default GENERATION_MIN_SAMPLES)
    status_every: float = 60.0                  # seconds between Ray status lines
    verbose: bool = False                       # each trial's measurement log and Ray worker output
    tracker: Any = None                         # bench.tracking tracker of each trial's row


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(o: SweepOptions, label: Callable[[str], str] = _flag) -> None:
    """One line (BenchError) for an option that cannot run, naming it by label(field name); creates nothing."""
    for name, low in (("concurrent", 1), ("generation_workers", 1), ("generation_min_samples", 1)):
        v = getattr(o, name)
        if v is not None and v < low:
            raise BenchError(f"{label(name)} must be >= {low}, got {v}")
    if not 0 < o.status_every < math.inf:        # NaN fails too
        raise BenchError(f"{label('status_every')} must be a finite number of seconds > 0, got "
                         f"{o.status_every:g}")
    for name in ("cpus_per_trial", "gpus_per_trial"):
        v = getattr(o, name)
        if v is not None and not 0 <= v < math.inf:
            raise BenchError(f"{label(name)} must be a finite number >= 0, got {v:g}")


@dataclass
class SweepPlan:
    """A sweep invocation ready to run: its spec, trials, id and the trials without a row."""
    invocation: Invocation
    models: Dict[str, dict]         # model name -> what identifies it (recorded in the manifest)
    pending: List[Trial]
    results: str

    @property
    def spec(self) -> dict:
        return self.invocation.spec

    @property
    def trials(self) -> List[Trial]:
        return self.invocation.trials

    @property
    def sweep_id(self) -> str:
        return self.invocation.sweep_id


def plan_sweep(name: str, results: str, sets: Sequence[str] = (), quick: bool = False, resume: bool = False,
               address: Optional[str] = None, rerun: Sequence[str] = ()) -> SweepPlan:
    """The sweep `name` (shipped, or a .yaml path) with its `quick:` form and `sets` overrides, checked, as a new
    invocation or (resume) the latest one in `results` (invocation.note says which; `rerun`: its entries that run
    again, bench.sweep.store.resolve_invocation); its trials validated. Writes nothing."""
    spec = load_spec(name, quick=quick, sets=list(sets))
    absolutize_paths(spec)
    check_results_dir(results)
    if address is not None:
        check_address(address)
    invocation = resolve_invocation(spec, results, resume, quick=quick, sets=list(sets), rerun=list(rerun))
    models = validate_invocation(invocation)
    return SweepPlan(invocation=invocation, models=models, results=results,
                     pending=plan(invocation.spec, invocation.trials, invocation.sweep_id, results,
                                  invocation.rerun_keys))


@dataclass
class SweepOutcome:
    ran: int                        # trials that reported a row in this run
    bad: int                        # trials that failed or were skipped
    have: int                       # trials of the sweep with a row in the store
    total: int
    failed: Dict[str, str] = field(default_factory=dict)    # point id -> why
    skipped: Dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.have == self.total


def run_sweep(p: SweepPlan, o: Optional[SweepOptions] = None,
              say: Optional[Callable[[str], None]] = None) -> SweepOutcome:
    """Run the plan's pending trials on Ray (started locally, or joined at o.address) and shut Ray down; `say` gets
    the line on Ray and the resources per trial (default: logged)."""
    o = o or SweepOptions()
    check_options(o)
    say = say or log.info
    spec = p.spec
    address = check_address(o.address) if o.address is not None else None
    t0 = time.time()
    info = connect_ray(address, o.verbose)
    try:
        workers = generation_worker_count(o.generation_workers, spec["samples"],
                                          o.generation_min_samples or GENERATION_MIN_SAMPLES)
        cpus, gpus = resources(info, spec["device"], o.cpus_per_trial, o.gpus_per_trial, workers)
        say(f"ray {info['version']} {info['address']}: {info['nodes']} node(s), {info['num_cpus']:g} CPUs "
            f"(started in {info['start_s']:.1f} s); {cpus:g} CPU(s){f', {gpus:g} GPU(s)' if gpus else ''} per "
            f"trial ({trial_threads(cpus)} torch thread(s) each: one per CPU), {o.concurrent} at a time"
            + (f"; {workers} generation workers per trial" if workers > 1 else ""))
        ensure_manifest(p.results, p.invocation, p.models)
        runner = SweepRunner(spec, p.trials, p.sweep_id, p.results, info, cpus, gpus, o.concurrent, o.verbose,
                             status_every_s=o.status_every, generation_workers=workers, tracker=o.tracker)
        ran, bad = runner.run()
    finally:
        import ray   # heavy and only needed here: the sweep package imports it where trials run
        ray.shutdown()
    rows = stored_rows(p.results, p.sweep_id)
    return SweepOutcome(ran=ran, bad=bad, have=sum(1 for t in p.trials if t.key(p.sweep_id) in rows),
                        total=len(p.trials), failed=dict(runner.failed), skipped=dict(runner.skipped),
                        interrupted=bool(runner.interrupted), elapsed_s=time.time() - t0)
