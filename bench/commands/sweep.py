"""`python -m bench sweep NAME`: run a sweep (sweeps/NAME.yaml) as a Ray Tune grid, one results row per trial."""
from __future__ import annotations

from bench import sweep as S
from bench.errors import BenchError
from bench.sweep.session import SweepOptions, check_options, plan_sweep, run_sweep, sweep_descriptions
from bench.tracking import add_track_args, tracker_from_args

ORDER = 25


def register(sub):
    p = sub.add_parser(
        "sweep", help="run a sweep of sweeps/*.yaml (Ray Tune grid; one results row per trial)",
        description="Run a sweep: every point of the YAML grid is one Ray Tune trial that measures the method "
                    "(bench.measure) and appends one row to the results store. Ray starts locally by default. "
                    "By default each trial gets a whole machine and trials run one at a time, because concurrent "
                    "trials on one machine would distort each other's timings. "
                    "Schema and trial keys: bench/sweep/spec.py.")
    p.add_argument("name", nargs="?", help="sweep name (see --list) or a path to a .yaml file")
    p.add_argument("--list", action="store_true", help="list the shipped sweeps and exit")
    p.add_argument("--quick", action="store_true", help="the smoke-sized form the YAML declares (few points/samples)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a YAML key by dotted path, repeatable (e.g. samples=200, "
                        "points.dmoe.grid.tau=0.9,0.7, sampling.cfg=2); unknown keys list the valid ones")
    p.add_argument("--model", default=None, help="shortcut for --set models=NAME[,NAME]")
    p.add_argument("--device", default=None, help="shortcut for --set device=DEV (cpu, cuda, cuda:N)")
    p.add_argument("--resolve", default=None, metavar="PCT",
                   help="shortcut for --set measure.resolve=PCT: each trial's samples grow by looks until its paired "
                        "ΔFID interval is within ±PCT%% of dense FID or excludes 0 (bench/resolve.py)")
    p.add_argument("--max-samples", default=None, metavar="N", help="shortcut for --set measure.max_samples=N "
                                                                     "(the budget of --resolve)")
    p.add_argument("--results", default="results", help="results store directory (default ./results)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest sweep of this name in the store (same sweep_id): run only the trials "
                        "without a row; starts a new sweep if there is none")
    p.add_argument("--rerun", default="", metavar="POINT[,POINT]",
                   help="with --resume: run these points again as the sweep file defines them now (twins too); their "
                        "earlier rows are kept under <results>/rows/superseded/")
    p.add_argument("--dry-run", action="store_true", help="validate and print the trials; run and write nothing")
    g = p.add_argument_group("Ray")
    g.add_argument("--address", default=None,
                   help="existing Ray cluster: auto, HOST:PORT (GCS address) or ray://HOST:PORT (Ray Client; "
                        "needs ray[client] and a results directory the cluster shares) (default: start a private "
                        "local Ray with this machine's CPUs). Each row also comes back to this process, which "
                        "stores it if the worker's node does not share the store")
    g.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs per trial (default: a whole node, so trials do not share a machine)")
    g.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial (default: a whole node's GPUs when the device is cuda, else 0)")
    g.add_argument("--concurrent", type=int, default=1,
                   help="trials at a time (default 1; more only on a multi-node cluster: trials sharing a machine "
                        "distort each other's timings)")
    g.add_argument("--generation-workers", type=int, default=1, metavar="N",
                   help="processes generating each trial's samples, the trial included (default 1): N-1 Ray actors "
                        "with the trial's CPUs/GPUs each generate batches while the trial generates and times its "
                        "own (e.g. 8 GPUs for one 50,000-sample ImageNet trial: --gpus-per-trial 1 "
                        "--generation-workers 8); only for trials of at least --generation-min-samples samples")
    g.add_argument("--generation-min-samples", type=int, default=None, metavar="N",
                   help="the sample count from which --generation-workers applies (default 2000)")
    g.add_argument("--status-every", type=float, default=60.0, metavar="S",
                   help="seconds between Ray status lines while trials run (default 60)")
    add_track_args(p, "each trial's row (from this process, as the trial reports; tagged with the sweep id)")
    p.set_defaults(func=run)


def print_list():
    sweeps = sweep_descriptions()
    width = max((len(name) for name, _, _ in sweeps), default=0)
    for name, desc, fig in sweeps:
        print(f"{name:<{width}}  {desc}" + (f"  [{fig}]" if fig else ""))
    return 0


def resume_command(a) -> str:
    """The command that finishes this sweep: every flag it was started with, and --resume."""
    import shlex
    words = ["python", "-m", "bench", "sweep", a.name, "--resume"]
    if a.quick:
        words.append("--quick")
    for s in a.set:
        words += ["--set", s]
    for flag, value in (("--model", a.model), ("--device", a.device), ("--resolve", a.resolve),
                        ("--max-samples", a.max_samples), ("--results", a.results), ("--address", a.address),
                        ("--cpus-per-trial", a.cpus_per_trial), ("--gpus-per-trial", a.gpus_per_trial),
                        ("--generation-min-samples", a.generation_min_samples)):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    for flag, value, default in (("--concurrent", a.concurrent, 1), ("--generation-workers", a.generation_workers, 1),
                                 ("--status-every", a.status_every, 60.0)):
        if value != default:
            words += [flag, f"{value:g}"]
    for backend in getattr(a, "track", None) or []:
        words += ["--track", backend]
    if getattr(a, "track_dir", None):
        words += ["--track-dir", a.track_dir]
    if getattr(a, "verbose", 0):
        words.insert(3, "-" + "v" * a.verbose)
    return shlex.join(words)


def run(a):
    if a.list:
        return print_list()
    if not a.name:
        raise BenchError(f"give a sweep name; valid: {', '.join(S.list_sweeps())} (or a .yaml path)")
    options = SweepOptions(address=a.address, cpus_per_trial=a.cpus_per_trial, gpus_per_trial=a.gpus_per_trial,
                           concurrent=a.concurrent, generation_workers=a.generation_workers,
                           generation_min_samples=a.generation_min_samples, status_every=a.status_every,
                           verbose=getattr(a, "verbose", 0) > 0)   # -v: each trial's log and Ray worker output
    check_options(options)
    options.tracker = tracker_from_args(a)
    sets = list(a.set)
    for key, value in (("models", a.model), ("device", a.device), ("measure.resolve", a.resolve),
                       ("measure.max_samples", a.max_samples)):
        if value is not None:
            sets.append(f"{key}={value}")
    p = plan_sweep(a.name, a.results, sets, quick=a.quick, resume=a.resume, address=a.address,
                  rerun=[e for e in a.rerun.split(",") if e])
    if p.invocation.note:
        print(p.invocation.note)
    spec = p.spec
    print(f"sweep {spec['name']}{' (quick form)' if spec.get('quick_applied') else ''}: {p.sweep_id}"
          f"{' (resumed)' if p.invocation.resumed else ''}: {len(p.trials)} trials, {len(p.pending)} to run; models "
          f"{', '.join(p.models)}; {spec['samples']} samples, batch {spec['batch_size']}, seed {spec['seed']}, "
          f"{spec['device']}; store {a.results}")
    if a.dry_run:
        for t in p.trials:
            extra = f"  params from {t.parent}: {t.from_parent}" if t.parent else ""
            print(f"  {t.key(p.sweep_id)}  [{'to run' if t in p.pending else 'has a row'}]  {t.method} "
                  f"{S.value_text(t.params)}{extra}")
        return 0
    if not p.pending:
        print(f"sweep {p.sweep_id} is complete ({len(p.trials)}/{len(p.trials)} rows); nothing to do")
        return 0
    out = run_sweep(p, options, say=print)
    print(f"sweep {p.sweep_id}: {out.have}/{out.total} trials have rows ({out.ran} reported now, {out.bad} failed or "
          f"skipped) in {out.elapsed_s:.0f} s; report: python -m bench report --sweep {spec['name']} --results "
          f"{a.results}")
    for pid, why in list(out.failed.items()) + list(out.skipped.items()):
        print(f"  not done: {pid}: {why}")
    if not out.complete:
        if out.interrupted:
            print("  interrupted: the remaining trials were not started")
        print(f"  rerun the missing trials with: {resume_command(a)}")
        return 130 if out.interrupted else 1
    return 0
