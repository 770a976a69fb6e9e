"""`python -m bench run --method NAME`: measure one method, append one row to the results store."""
from __future__ import annotations

from bench.commands._common import add_dtype_arg, add_model_args, add_sampling_args
from bench.tracking import add_track_args

ORDER = 20


def register(sub):
    from bench.defaults import (DEFAULT_BATCH_SIZE, DEFAULT_FLOP_IMAGES, DEFAULT_TIMING_ROUNDS, QUALITY_METRICS,
                                SEED_SCHEME)
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
    add_dtype_arg(p)
    p.add_argument("--samples", type=int, default=None,
                   help="images to generate (quality, timing) (default 1000, or the preset's)")
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="a named protocol (bench/presets.py): imagenet = the VAR paper's FID setting, 50 samples per "
                        "class (50,000), cfg 1.5, top-k 900, top-p 0.96, against --reference (ADM's "
                        "VIRTUAL_imagenet256_labeled.npz) with --inception-weights; both files required; explicit "
                        "flags override its values")
    p.add_argument("--seed", type=int, default=0, help="base seed of the seed scheme (default 0)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per generation batch")
    p.add_argument("--flop-images", type=int, default=DEFAULT_FLOP_IMAGES,
                   help="images of the fvcore-counted generation (default %(default)s)")
    p.add_argument("--warmup-batches", type=int, default=1, help="leading batches left out of the time statistics")
    p.add_argument("--timing-rounds", type=int, default=DEFAULT_TIMING_ROUNDS,
                   help="paired ABBA rounds against dense for `speedup` (0: off; default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's; recorded)")
    p.add_argument("--results", default="results", help="results directory (default ./results)")
    p.add_argument("--cache-dir", default=None, help="cache root for dense outputs and reference statistics "
                                                     "(default VARBENCH_CACHE or ~/.cache/var-bench)")
    g = p.add_argument_group("quality")
    g.add_argument("--reference", default=None, help="reference set: shapes[:val|test], an image folder, or an .npz "
                                                     "(default: the embedded model's held-out set)")
    g.add_argument("--reference-count", type=int, default=None, help="reference images to use (default: all / 5000)")
    g.add_argument("--inception-weights", default=None, help="torch-fidelity Inception weights file (Inception "
                                                             "features instead of the shipped classifier)")
    g.add_argument("--classifier", default=None, help="classifier .safetensors as feature extractor "
                                                      "(default: the model's shipped one)")
    g.add_argument("--metrics", default=",".join(QUALITY_METRICS), help="comma-separated subset of %(default)s")
    g.add_argument("--bootstrap", type=int, default=100, help="FID bootstrap resamples (default 100)")
    g.add_argument("--resolve", type=float, default=None, metavar="PCT",
                   help="sample size as a target: --samples is the first look; the method's samples double (dense's "
                        "reused from the cache) until the paired ΔFID interval's half-width is <= PCT %% of dense FID, "
                        "or it excludes 0, or --max-samples is reached; intervals corrected for the repeated looks "
                        "(bench/resolve.py)")
    g.add_argument("--max-samples", type=int, default=None,
                   help="the budget of --resolve: its last look (default 20 x --samples)")
    p.add_argument("--sweep", default="", help="sweep name recorded in the row")
    p.add_argument("--trial-key", default=None, help="store the row under this key (re-running replaces it)")
    add_track_args(p, "the row")
    p.set_defaults(func=run)


def run(a):
    import torch
    from bench.commands._common import bundle_from_args, check_device, check_flags, sampling_from_args
    from bench.checkpoints import check_writable_dir
    from bench.measure import (MAX_BOOTSTRAP, MAX_SEED, MAX_THREADS, MAX_TIMING_ROUNDS, MAX_WARMUP_BATCHES,
                               check_resolve, dense_cache_dir, measure)
    from bench.precision import check_dtype
    from bench.registry import create_method, parse_overrides
    from bench.results import check_results_dir
    from bench.tracking import tracker_from_args
    preset = _apply_preset(a)
    # cheap checks first, in the order a user fixes them; nothing is written before measure() has validated all
    check_flags(a, samples=(1,), seed=(0, MAX_SEED), batch_size=(1,), flop_images=(0,),
                warmup_batches=(0, MAX_WARMUP_BATCHES), timing_rounds=(0, MAX_TIMING_ROUNDS),
                threads=(1, MAX_THREADS), bootstrap=(0, MAX_BOOTSTRAP))
    metrics = tuple(m.strip() for m in a.metrics.split(",") if m.strip())
    check_resolve(a.resolve, a.max_samples, a.samples, a.batch_size, a.bootstrap, metrics)
    method = create_method(a.method, **parse_overrides(a.set))
    check_results_dir(a.results)
    check_writable_dir(dense_cache_dir(a.cache_dir), "cache directory")
    tracker = tracker_from_args(a)
    dtype = check_dtype(a.dtype, check_device(a.device))
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    bundle = bundle_from_args(a)
    if preset is not None:
        from bench.presets import check_preset_model
        check_preset_model(a.preset, bundle.num_classes, bundle.name)
    sampling = sampling_from_args(a, bundle)
    row = measure(bundle, method, samples=a.samples, seed=a.seed, sampling=sampling, batch_size=a.batch_size,
                  results_dir=a.results, reference=a.reference, inception_weights=a.inception_weights,
                  flop_images=a.flop_images, warmup_batches=a.warmup_batches, sweep=a.sweep,
                  trial_key=a.trial_key, cache_dir=a.cache_dir, metrics=metrics, bootstrap=a.bootstrap,
                  classifier=a.classifier, reference_count=a.reference_count, timing_rounds=a.timing_rounds,
                  dtype=dtype, extra=dict(preset=a.preset) if a.preset else None, resolve=a.resolve,
                  max_samples=a.max_samples)
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
            a.samples = 1000
        return None
    from bench.presets import resolve_preset
    p = resolve_preset(a.preset, a.reference, a.inception_weights)
    if a.samples is None:
        a.samples = p.samples
    for k, v in p.sampling.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return p


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)
