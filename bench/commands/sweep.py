"""`python -m bench sweep NAME`: run a sweep (sweeps/NAME.yaml) as a Ray Tune grid, one results row per trial."""
from __future__ import annotations

import time

from bench.errors import BenchError
from bench.tracking import add_track_args

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
    from bench.sweep import list_sweeps, read_yaml, sweep_path
    names = list_sweeps()
    width = max(len(n) for n in names) if names else 0
    for n in names:
        try:
            d = read_yaml(sweep_path(n))
            desc = d.get("description", "") or ""
            fig = d.get("figure", "") or ""
        except BenchError as e:
            desc, fig = f"(unreadable: {e})", ""
        print(f"{n:<{width}}  {desc}" + (f"  [{fig}]" if fig else ""))
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
    from bench import sweep as S
    from bench.results import check_results_dir
    if a.list:
        return print_list()
    if not a.name:
        raise BenchError(f"give a sweep name; valid: {', '.join(S.list_sweeps())} (or a .yaml path)")
    if a.concurrent < 1:
        raise BenchError(f"--concurrent must be >= 1, got {a.concurrent}")
    if a.generation_workers < 1:
        raise BenchError(f"--generation-workers must be >= 1, got {a.generation_workers}")
    if a.generation_min_samples is not None and a.generation_min_samples < 1:
        raise BenchError(f"--generation-min-samples must be >= 1, got {a.generation_min_samples}")
    if not 0 < a.status_every < float("inf"):        # NaN fails too
        raise BenchError(f"--status-every must be a finite number of seconds > 0, got {a.status_every:g}")
    for flag, v in (("--cpus-per-trial", a.cpus_per_trial), ("--gpus-per-trial", a.gpus_per_trial)):
        if v is not None and not 0 <= v < float("inf"):
            raise BenchError(f"{flag} must be a finite number >= 0, got {v:g}")
    from bench.tracking import tracker_from_args
    tracker = tracker_from_args(a)
    sets = list(a.set)
    if a.model:
        sets.append(f"models={a.model}")
    if a.device:
        sets.append(f"device={a.device}")
    if a.resolve is not None:
        sets.append(f"measure.resolve={a.resolve}")
    if a.max_samples is not None:
        sets.append(f"measure.max_samples={a.max_samples}")
    spec = S.load_spec(a.name, quick=a.quick, sets=sets)
    S.absolutize_paths(spec)
    check_results_dir(a.results)
    address = S.check_address(a.address) if a.address is not None else None
    invocation = S.resolve_invocation(spec, a.results, a.resume, quick=a.quick, sets=sets)
    if invocation.note:
        print(invocation.note)
    spec, trials, sweep_id, resumed = invocation.spec, invocation.trials, invocation.sweep_id, invocation.resumed
    models = S.validate_invocation(invocation)
    pending = S.plan(spec, trials, sweep_id, a.results)
    quick = " (quick form)" if spec.get("quick_applied") else ""
    print(f"sweep {spec['name']}{quick}: {sweep_id}{' (resumed)' if resumed else ''}: {len(trials)} trials, "
          f"{len(pending)} to run; models {', '.join(models)}; {spec['samples']} samples, batch {spec['batch_size']}, "
          f"seed {spec['seed']}, {spec['device']}; store {a.results}")
    if a.dry_run:
        for t in trials:
            state = "to run" if t in pending else "has a row"
            extra = f"  params from {t.parent}: {t.from_parent}" if t.parent else ""
            print(f"  {t.key(sweep_id)}  [{state}]  {t.method} {S.value_text(t.params)}{extra}")
        return 0
    if not pending:
        print(f"sweep {sweep_id} is complete ({len(trials)}/{len(trials)} rows); nothing to do")
        return 0

    t0 = time.time()
    verbose = getattr(a, "verbose", 0) > 0     # -v: each trial's measurement log and Ray worker output
    info = S.connect_ray(address, verbose)
    try:
        workers = S.generation_worker_count(a.generation_workers, spec["samples"],
                                            a.generation_min_samples or S.GENERATION_MIN_SAMPLES)
        cpus, gpus = S.resources(info, spec["device"], a.cpus_per_trial, a.gpus_per_trial, workers)
        print(f"ray {info['version']} {info['address']}: {info['nodes']} node(s), {info['num_cpus']:g} CPUs "
              f"(started in {info['start_s']:.1f} s); {cpus:g} CPU(s){f', {gpus:g} GPU(s)' if gpus else ''} per "
              f"trial ({S.trial_threads(cpus)} torch thread(s) each: one per CPU), {a.concurrent} at a time"
              + (f"; {workers} generation workers per trial" if workers > 1 else ""))
        S.ensure_manifest(a.results, invocation, models)
        runner = S.SweepRunner(spec, trials, sweep_id, a.results, info, cpus, gpus, a.concurrent, verbose,
                               status_every_s=a.status_every, generation_workers=workers, tracker=tracker)
        ran, bad = runner.run()
    finally:
        import ray
        ray.shutdown()
    rows = S.stored_rows(a.results, sweep_id)
    have = sum(1 for t in trials if t.key(sweep_id) in rows)
    print(f"sweep {sweep_id}: {have}/{len(trials)} trials have rows ({ran} reported now, {bad} failed or skipped) in "
          f"{time.time() - t0:.0f} s; report: python -m bench report --sweep {spec['name']} --results {a.results}")
    for pid, why in list(runner.failed.items()) + list(runner.skipped.items()):
        print(f"  not done: {pid}: {why}")
    if have < len(trials):
        if runner.interrupted:
            print("  interrupted: the remaining trials were not started")
        print(f"  rerun the missing trials with: {resume_command(a)}")
        return 130 if runner.interrupted else 1
    return 0
