"""`python -m bench run --method NAME`: measure one method, append one row to the results store."""
from __future__ import annotations

from bench.commands._common import add_model_args, add_sampling_args, bundle_from_args, check_device, sampling_from_args
from bench.defaults import SEED_SCHEME
from bench.measure_config import SETTINGS, MeasureConfig, flag_name, setting_kind
from bench.presets import check_preset_model, resolve_preset
from bench.registry import create_method, parse_overrides
from bench.results import check_results_dir
from bench.tracking import add_track_args, tracker_from_args

ORDER = 20


def register(sub):
    p = sub.add_parser("run", help="measure a method: FLOPs, time, memory, quality, fidelity -> one results row",
                       description="Generate N samples with a method and append one tidy row (FLOPs by fvcore and by "
                                   "formula, time, peak memory, FID/IS/PR/KID, same-seed fidelity vs dense) to the "
                                   f"results store. Seed scheme: {SEED_SCHEME}.")
    p.add_argument("--method", default="dense",
                   help="registered method name (default dense; an unknown name lists the valid ones)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, repeatable; lists comma-separated (e.g. --set tau=0.8,0.8,0.78)")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a named protocol (bench/presets.py): imagenet = the VAR paper's FID setting, 50 samples per "
                        "class (50,000), cfg 1.5, top-k 900, top-p 0.96, against --reference (ADM's "
                        "VIRTUAL_imagenet256_labeled.npz) with --inception-weights; both files required; explicit "
                        "flags override its values")
    add_measure_args(p)
    p.add_argument("--results", default="results", help="results directory (default ./results)")
    p.add_argument("--sweep", default="", help="sweep name recorded in the row")
    p.add_argument("--trial-key", default=None, help="store the row under this key (re-running replaces it)")
    add_track_args(p, "the row")
    p.set_defaults(func=run)


def add_measure_args(p):
    """One flag per measurement setting (bench.measure_config.MeasureConfig: its type, default and help); a flag
    left out is None, the setting's default (or the --preset's)."""
    groups = {"": p}
    for name, f in SETTINGS.items():
        group = f.metadata["group"]
        if group not in groups:
            groups[group] = p.add_argument_group(group)
        kind = setting_kind(name)
        default = ",".join(f.default) if kind is tuple else f.default
        shown = "" if default is None else f" (default {default})"
        groups[group].add_argument(flag_name(name), type=kind if kind in (int, float) else str, default=None,
                                   metavar=f.metadata["metavar"],
                                   help=(f.metadata["help"] + shown).replace("%", "%%"))


def run(a):
    from bench.checkpoints import check_writable_dir   # lazy: --help stays instant (no torch)
    from bench.measure import dense_cache_dir, measure   # lazy: --help stays instant (no torch)
    from bench.precision import check_dtype   # lazy: --help stays instant (no torch)
    preset = _apply_preset(a)
    # cheap checks first, in the order a user fixes them; nothing is written before measure() has validated all
    config = MeasureConfig.from_args(a)
    method = create_method(a.method, **parse_overrides(a.set))
    check_results_dir(a.results)
    check_writable_dir(dense_cache_dir(config.cache_dir), "cache directory")
    tracker = tracker_from_args(a)
    check_dtype(config.dtype, check_device(a.device))
    bundle = bundle_from_args(a)
    if preset is not None:
        check_preset_model(a.preset, bundle.num_classes, bundle.name)
    sampling = sampling_from_args(a, bundle)
    row = measure(bundle, method, config, sampling=sampling, results_dir=a.results, sweep=a.sweep,
                  trial_key=a.trial_key, extra=dict(preset=a.preset) if a.preset else None)
    if tracker is not None:   # the row is stored: a tracking failure only warns
        tracker.track(row)
    giga = lambda v: v / 1e9 if v else float("nan")  # noqa: E731  (no FLOP count with --flop-images 0)
    print(f"{row['method_label']} on {row['model']} ({row['dtype']}): {giga(row['macs_total']):.4g} GMACs/image (transformer "
          f"{giga(row['macs_fvcore']):.4g}), "
          f"{row['images_per_s']:.4g} images/s, speedup vs dense {_num(row.get('speedup'), '.3f')} "
          f"[{_num(row.get('speedup_ci_low'), '.3f')}, {_num(row.get('speedup_ci_high'), '.3f')}], FID "
          f"{row['fid']:.4g}, ΔFID vs dense {_num(row.get('fid_delta'), '+.3g')} "
          f"[{_num(row.get('fid_delta_ci_low'), '+.3g')}, {_num(row.get('fid_delta_ci_high'), '+.3g')}], "
          f"token agreement vs dense "
          f"{row['fidelity_token_agreement']:.4f}"
          + (f"; {row['samples']} samples, {'resolved' if row['resolved'] else 'not resolved'} "
             f"({row['resolve_stop_reason']}) at ±{row['resolve_target_pct']:g}%, level {row['resolve_level']:.4f}"
             if row.get("resolve_target_pct") is not None else "")
          + f"; row appended to {a.results}")
    return 0


def _apply_preset(a):
    """Fill the flags a preset sets and the user did not give (their own flags win); None without --preset."""
    if a.preset is None:
        if a.samples is None:
            a.samples = SETTINGS["samples"].default
        return None
    p = resolve_preset(a.preset, a.reference, a.inception_weights)
    if a.samples is None:
        a.samples = p.samples
    for k, v in p.sampling.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return p


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)
