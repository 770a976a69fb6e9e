"""The one measurement path every method goes through: one call, one tidy results row.

    row = measure(bundle, create_method("dmoe", tau=0.8), MeasureConfig(samples=1000, seed=0))
    row = measure(bundle, "dense", samples=64)           # settings as keywords: the same config

What happens, in order (nothing is written before step 1 has passed):
  1. validate everything: the settings (bench/measure_config.py: counts, seeds, their bounds, resolve's plan),
     sampling settings against the model, method.check_model(bundle),
     the results and cache directories, and the quality reference (bench.quality.check_reference);
  2. build the method's network (method.build);
  3. FLOPs: generate `flop_images` images with every scale traced by fvcore (bench/flops.py) and the decoder
     counted separately; the analytic count (method.analytic_macs, or the dense formula of bench/analytic.py)
     uses the statistics of that same generation;
  4. the N samples, in batches of B: labels[i] = i mod num_classes, batch b seeded with batch_seed(seed, b)
     (SEED_SCHEME). These batches are also the absolute timing (the first `warmup_batches` excluded) and the peak
     memory measurement; the method's statistics (reset_stats protocol) cover all of them (row_metrics,
     macs_analytic_all: the routed work; macs_executed_all: what the expert kernels ran). The first
     `timing_rounds` full batches after the warm-up are paired rounds: dense runs the same batch right before or
     after (ABBA, bench.timing.PAIRED_PROTOCOL), giving `speedup` with its
     interval; too few batches are made up by extra rounds whose outputs are discarded. Batches a killed run
     finished are read back (bench/resume.py); with `workers` (GenerationWorkerPool, e.g. other GPUs of a sweep
     trial), other processes generate batches from the last one down while this one generates and times its own;
  5. dense outputs with the same labels and seeds, from the dense cache (keyed by everything they depend on) or
     generated once and cached (a dense run stores its own, and reads its batches from that cache and dense's
     batch store first: bench.dense_cache.generation_store): same-seed fidelity;
  6. quality (bench.quality.quality_metrics) of the N images, and paired with dense's images of step 5:
     `fid_delta` with a paired class-stratified bootstrap interval;
  7. append the row atomically (bench/results.py).
With `resolve` (bench/resolve.py), steps 5-6 are a look at the first N samples of a fixed schedule of looks; while
none decides, the method's samples grow to the next look (its earlier batches read back from their checkpoints,
dense's from the cache) and steps 5-6 run again at the schedule's corrected level; the row holds the last look.
"""
import contextlib
import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

# The seed scheme, the bounds of the counts a user sets and the defaults are defined in bench.defaults (where the CLI
# parsers read them without importing torch) and re-exported here, as are the names of the modules split out of this
# one (bench.generation: the generation loop; bench.dense_cache: cache keys and the dense-output cache).
from bench.defaults import (DEFAULT_BATCH_SIZE, DEFAULT_FLOP_IMAGES, DEFAULT_TIMING_ROUNDS, MAX_BOOTSTRAP,  # noqa: F401
                            MAX_SEED, MAX_THREADS, MAX_TIMING_ROUNDS, MAX_WARMUP_BATCHES, QUALITY_METRICS,
                            SEED_MULTIPLIER, SEED_SCHEME)
from bench.dense_cache import (DENSE_CACHE_VERSION, batch_store_key, dense_cache_dir, dense_cache_key,  # noqa: F401
                               dense_cache_path, expert_execution, generation_key, generation_role, generation_store,
                               load_dense_outputs, net_fingerprint, store_dense_outputs)
from bench.errors import BenchError, RowNotStored
from bench.generation import (GenerationSession, GenerationWorkerPool, _to_uint8, batch_ranges,  # noqa: F401
                              batch_seed, dense_batch, finish_rounds, generate_all, sample_labels, timed_batch)
from bench.analytic import counting_executed, dense_scale_macs
from bench.checkpoints import check_writable_dir
from bench.env import environment
from bench.fidelity import same_seed_fidelity
from bench.flops import count_generation
from bench.log import get_logger
from bench.measure_config import MeasureConfig
from bench.models.var import KVCache, SelfAttention
from bench.precision import check_dtype, forward_autocast, generation_dtype
from bench.quality import check_reference, quality_metrics
from bench.records import (EnvironmentRecord, FidelityRecord, FlopsRecord, MemoryRecord, MethodSetup,
                           PairedQualityRecord, PairedTimingRecord, QualityRecord, ResolveRecord, RunIdentity,
                           RunSetup, RunTimes, SweepRecord, TimingRecord)
from bench.registry import Method, create_method
from bench.resolve import Look, run_looks
from bench.results import check_results_dir
from bench.resume import BatchStore
from bench.sampling import validate_sampling
from bench.stored_images import Images
from bench.timing import (NOISY_RULE, BatchTimer, MachineWatch, PairedRounds, paired_summary, summarize,
                          time_flop_efficiency)

logger = get_logger(__name__)


def expert_paths(net) -> Optional[str]:
    """The stats protocol's expert-execution record (methods/_experts.record: stats[si]['paths'] of each layer)
    summed over the net, as the expert_paths column; None when no layer ran experts."""
    mods = list(net.modules()) if isinstance(net, torch.nn.Module) else [net]
    calls: Dict[str, int] = {}
    choosers = set()
    for m in mods:
        stats = getattr(m, "stats", None)
        for st in (stats.values() if isinstance(stats, dict) else ()):
            if isinstance(st, dict) and "paths" in st:
                for path, n in st["paths"].items():
                    calls[path] = calls.get(path, 0) + n
                choosers.add(st.get("chooser", ""))
    return json.dumps(dict(calls=dict(sorted(calls.items())), chooser=", ".join(sorted(choosers)))) if calls else None


def reset_stats(net) -> int:
    """The stats protocol: call reset_stats() on every module of the net that has it; returns how many."""
    mods = list(net.modules()) if isinstance(net, torch.nn.Module) else [net]
    n = 0
    for m in mods:
        if callable(getattr(m, "reset_stats", None)):
            m.reset_stats()
            n += 1
    return n


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- validation
def validate(bundle, method, config: MeasureConfig, sampling, results_dir: str) -> dict:
    """Every check that can fail, before anything is generated or written (the config's own values were checked
    when it was made): sampling against the model, the dtype on its device, the method against the model, the
    results and cache directories, the quality reference. Returns check_reference's findings."""
    validate_sampling(sampling, bundle.var.V)
    check_dtype(config.dtype, bundle.device)
    method.check_model(bundle)
    check_results_dir(results_dir)
    check_writable_dir(dense_cache_dir(config.cache_dir), "cache directory")
    return check_reference(bundle, config.samples, config.reference, config.inception_weights, config.metrics,
                           reference_count=config.reference_count, classifier=config.classifier)


def bytes_to_write(bundle, samples: int) -> Dict[str, int]:
    """An upper estimate of what one measurement writes: the row, and in the cache the dense outputs (uint8
    images, tokens), the same again as batch checkpoints while generating (bench.resume) and the quality features
    of samples and reference."""
    side = int(bundle.image_size)
    tokens = sum(p * p for p in bundle.var.patch_nums)
    dense = samples * (3 * side * side + 8 * tokens)
    features = 2 * samples * 4 * 2048 * 2          # samples + reference, features + logits, <= 2048-d float32
    return {"results": 4 << 20, "cache": 2 * dense + features + (16 << 20)}


def check_free_space(bundle, samples: int, results_dir: str, cache_dir: Optional[str]) -> None:
    """Refuse to start a measurement whose outputs cannot fit on disk (rather than lose it after computing)."""
    import shutil
    need = bytes_to_write(bundle, samples)
    for what, path in (("results", results_dir), ("cache", dense_cache_dir(cache_dir))):
        probe = os.path.abspath(path)
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe).free
        if free < need[what]:
            raise BenchError(f"not enough free disk space for the {what} ({path}): {free / 2**20:.1f} MiB free, "
                             f"this run writes up to {need[what] / 2**20:.1f} MiB; free some space or choose another "
                             f"{'--results' if what == 'results' else '--cache-dir'}")


def time_paired(method, net, bundle, labels, seed: int, sampling, batch_size: int, rounds: int = DEFAULT_TIMING_ROUNDS,
                warmup_batches: int = 1) -> dict:
    """The paired timing of measure() alone (no FLOPs, quality or row): the generation phase of `net`
    (method.build's) on the N = len(labels) samples. Returns the PairedTimingRecord's columns (with the method's
    statistics in `macs_ratio`) and the absolute median batch time in `time_median_s`."""
    _, timing, paired, _ = generate_and_time(method, net, bundle, labels, seed, sampling, batch_size, warmup_batches,
                                             rounds)
    return dict(paired.row(), time_median_s=timing.time_median_s)


def analytic_per_scale(method, net, bundle, batch: int) -> List[float]:
    """The method's analytic MACs per scale (None or no formula: the dense formula)."""
    m = method.analytic_macs(net, bundle, batch) if method is not None else None
    if m is None:
        m = [s.total for s in dense_scale_macs(bundle.var.cfg, batch)]
    return [float(x) for x in m]


def kv_element_bytes(bundle) -> float:
    """Mean of the key and value element sizes the attention caches store under the current --dtype on the bundle's
    device, probed with one attention call: autocast's rules differ by device (where `norm` runs in float32, the
    l2-normalised keys come out float32 while the values are in the autocast dtype)."""
    dev = bundle.device
    att, cache = SelfAttention(8, 2, bundle.var.cfg.attn_l2_norm).to(dev), KVCache()
    with torch.no_grad(), forward_autocast(dev.type):
        att(torch.zeros(1, 1, 8, device=dev), None, cache)
    return (cache.k.element_size() + cache.v.element_size()) / 2


# ---------------------------------------------------------------------------------------------- the phases
def count_flops(method, net, bundle, labels, seed: int, sampling, flop_images: int):
    """FLOPs phase: a traced generation of the first flop_images images (fvcore) beside the analytic count."""
    rec = FlopsRecord(flop_images=flop_images)
    if flop_images > 0:
        reset_stats(net)
        mc = count_generation(net, bundle.vqvae, labels[:flop_images].to(bundle.device), batch_seed(seed, 0),
                              sampling)
        fv = [m / flop_images for m in mc.per_scale]
        an = [m / flop_images for m in analytic_per_scale(method, net, bundle, flop_images)]
        rec = FlopsRecord(macs_fvcore=sum(fv), macs_fvcore_per_scale=fv, macs_decoder=mc.decoder / flop_images,
                          macs_total=sum(fv) + mc.decoder / flop_images, macs_analytic=sum(an),
                          macs_analytic_per_scale=an,
                          macs_fvcore_over_analytic=sum(fv) / sum(an) if sum(an) else None,
                          macs_uncounted_ops=json.dumps(dict(sorted(mc.uncounted.items()))),
                          macs_dynamic_ops=json.dumps(dict(sorted(mc.dynamic.items()))), flop_images=flop_images)
    return rec


@dataclass
class Generated:
    """What the generation phase produced besides its records."""
    tokens: List[torch.Tensor]             # per scale, (N, pn²)
    images: Images                         # uint8 (N, 3, H, W); StoredImages (read from disk) in measure()
    macs_all_per_scale: List[float]        # analytic MACs per image over every image the statistics saw (routed)
    macs_executed_all: float               # the same, counting what the expert kernels ran
    method_extras: Dict[str, Any]          # method.row_metrics of the N samples


def generate_and_time(method, net, bundle, labels, seed: int, sampling, batch_size: int, warmup_batches: int,
                      timing_rounds: int, store=None, workers: Optional[GenerationWorkerPool] = None,
                      role: str = "method"):
    """Generation phase: the N samples, timed batch by batch with memory probes, the first `timing_rounds` full
    batches after the warm-up paired with dense (ABBA). Returns (Generated, TimingRecord, PairedTimingRecord,
    MemoryRecord). With `store`, batches of a killed run are resumed (generate_all): timing and the method's
    statistics then cover the batches generated here (TimingRecord.resumed_batches says how many were not; with
    `workers`, TimingRecord.worker_batches those that other processes generated). `role`: the pass's role for the
    workers (bench.dense_cache.generation_role)."""
    from bench.memory import PeakMemory   # looked up at call time: tests replace bench.memory.PeakMemory
    samples, S = len(labels), len(bundle.var.patch_nums)
    reset_stats(net)
    timer, probe = BatchTimer(bundle.device), PeakMemory(bundle.device)
    self_paired = method.name == "dense"
    dense_net = net if self_paired else bundle.var
    paired = PairedRounds(timing_rounds, warmup_batches, min(batch_size, samples)) if timing_rounds > 0 else None
    watch = MachineWatch().start()
    tokens, images, laps, peaks, sizes = generate_all(net, bundle, labels, seed, sampling, batch_size, timer=timer,
                                                      probe=probe, paired=paired, dense_net=dense_net, store=store,
                                                      workers=workers, role=role, keep_images=False)
    extra_timing = 0
    last = len(batch_ranges(samples, batch_size)) - 1
    s, e = batch_ranges(samples, batch_size)[-1]
    while len(laps) <= warmup_batches:  # too few batches to time after warm-up: repeat the last batch
        (_, peak), lap = timed_batch(net, bundle, labels[s:e], batch_seed(seed, last), sampling, timer, probe)()
        laps.append(lap)
        peaks.append(peak)
        sizes.append(e - s)
        extra_timing += 1
    method_extras = dict(method.row_metrics(net, bundle) or {})   # statistics of the N samples (+ repeats)
    n_all = sum(sizes)
    macs_all = [m / n_all for m in analytic_per_scale(method, net, bundle, n_all)]
    with counting_executed():
        macs_executed = sum(analytic_per_scale(method, net, bundle, n_all)) / n_all
    if paired is not None:   # rounds the N samples did not provide; after the statistics were read
        rounds_before = len(paired.done)
        finish_rounds(paired, net, dense_net, bundle, labels, seed, sampling, batch_size, timer)
        extra_timing += 2 * (len(paired.done) - rounds_before)
    machine = watch.stop()
    if extra_timing:
        logger.info(f"timing: {extra_timing} extra batch(es) for timing (outputs discarded)")
    t = summarize(laps, sizes, warmup_batches, S)
    timing = TimingRecord(time_median_s=t["time_median_s"], time_p10_s=t["time_p10_s"], time_p90_s=t["time_p90_s"],
                          time_per_scale_median_s=t["time_per_scale_median_s"],
                          time_decode_median_s=t["time_decode_median_s"], images_per_s=t["images_per_s"],
                          timing_batches=t["timing_batches"], warmup_batches=warmup_batches,
                          timing_extra_batches=extra_timing, timer=timer.kind,
                          resumed_batches=store.resumed if store is not None else 0,
                          worker_batches=workers.received.get(role, 0) if workers is not None else 0)
    dense_macs = sum(x.total for x in dense_scale_macs(bundle.var.cfg, 1))
    macs_ratio = sum(macs_all) / dense_macs if dense_macs else None
    pairing: Dict[str, Any] = dict(timing_rounds=0)
    if paired is not None:
        pairing = paired_summary(paired.done, S, machine, cuda=timer.cuda, self_paired=self_paired, seed=seed)
    pairing.update(macs_ratio=macs_ratio, macs_executed_ratio=macs_executed / dense_macs if dense_macs else None,
                   timing_noisy_rule=NOISY_RULE,
                   time_flop_efficiency=time_flop_efficiency(pairing.get("speedup"), macs_ratio))
    mem = [p for p in peaks if p is not None]
    kv = method.kv_cache_bytes(net, bundle, kv_element_bytes(bundle))
    memory = MemoryRecord(mem_peak_bytes=max(mem) if mem else None, mem_kind=probe.kind,
                          kv_cache_bytes_peak=None if kv is None else int(round(kv)))
    return (Generated(tokens, images, macs_all, macs_executed, method_extras), timing, PairedTimingRecord(**pairing),
            memory)


def dense_reference(method, bundle, labels, seed: int, sampling, batch_size: int, cache_dir, gen: Generated,
                    workers: Optional[GenerationWorkerPool] = None, keep_batches: bool = False,
                    bootstrap: int = 100, level: float = 0.95):
    """Dense outputs with the same labels and seeds (cached), and the same-seed fidelity against them (intervals
    from `bootstrap` resamples at `level`). keep_batches: leave dense's batch checkpoints in the cache (--resolve:
    a later look, or the next point, reads them back instead of generating them again).
    Returns (dense uint8 images, FidelityRecord, the cache entry's path)."""
    key = dense_cache_key(bundle, sampling, seed, len(labels), batch_size, bundle.device)
    path = dense_cache_path(key, cache_dir)
    cached = load_dense_outputs(path, lazy_images=True)   # images read a chunk at a time (bench.stored_images)
    if method.name == "dense":
        ref = cached if cached is not None else (gen.tokens, gen.images)
        status = "reused" if cached is not None else "stored"
        if cached is None:
            store_dense_outputs(path, key, gen.tokens, gen.images)
    elif cached is not None:
        ref, status = cached, "reused"
    else:
        logger.info("dense reference: generating the same samples with the dense model")
        store = BatchStore.for_key(batch_store_key("dense", method, None, bundle, sampling, seed, len(labels),
                                                   batch_size, bundle.device), cache_dir)
        ref = generate_all(bundle.var, bundle, labels, seed, sampling, batch_size, what="dense reference",
                           store=store, workers=workers, role="dense", keep_images=False)[:2]
        store_dense_outputs(path, key, *ref)
        ref = load_dense_outputs(path, lazy_images=True)   # read from the entry: the batches may go now
        if ref is None:
            raise BenchError(f"the dense cache entry just written could not be read back: {path}")
        if not keep_batches:
            store.clear()    # the dense cache holds them now
        status = "generated"
    logger.info(f"dense reference: {'reused cached outputs' if status == 'reused' else 'stored in the cache'} ({path})")
    # uint8 as they are: same_seed_fidelity converts them chunk by chunk (no float copy of either set)
    f = same_seed_fidelity(gen.tokens, ref[0], gen.images, ref[1], labels=labels, resamples=bootstrap, seed=seed,
                           level=level)
    return ref[1], FidelityRecord(dense_cache=status, **f), path


def quality_records(q: dict):
    """QualityRecord and PairedQualityRecord from bench.quality.quality_metrics' flat dict; the rest of its
    quality_* keys go to the row as they are."""
    pick = lambda rec: rec(**{k: q.get(k) for k in rec.schema()})   # noqa: E731
    return pick(QualityRecord), pick(PairedQualityRecord), {k: v for k, v in q.items() if k.startswith("quality_")}


# ---------------------------------------------------------------------------------------------- the call
def measure(bundle, method, config: Optional[MeasureConfig] = None, *, sampling=None, results_dir: str = "results",
            sweep: str = "", sweep_id: str = "", trial_key: Optional[str] = None, sweep_trial=None,
            extra: Optional[Dict[str, Any]] = None, workers: Optional[GenerationWorkerPool] = None,
            **settings) -> dict:
    """Measure `method` (a bench.registry.Method or a registered name) on `bundle` under `config` (bench/
    measure_config.py: samples, seed, batch size, timing, quality, resolve ...; `settings` given as keywords
    change it, e.g. measure(bundle, "dense", samples=64)); append and return the row.

    Each phase returns typed records (bench/records.py) that log themselves; the row is their columns, the
    method's parameters (param_*) and statistics (row_metrics), then `extra` as given. With `trial_key`, the
    stored row replaces that trial's earlier row; `sweep_trial` (bench.records.SweepRecord): the sweep trial's
    columns (null without). config.dtype (bench/precision.py): the autocast of the
    transformer forward in every generation of the measurement (FLOP count, timed batches and their paired dense
    batches, dense reference). `workers` (GenerationWorkerPool): other processes (GPUs) that generate some of the
    N samples and of the dense reference alongside this one. config.resolve (a % of dense FID; bench/resolve.py):
    the samples are the first look of a fixed schedule up to config.max_samples; after each look the paired ΔFID
    interval (at the schedule's corrected level) decides whether the method's samples grow to the next look
    (dense's are read from the cache where an earlier point made them); FLOPs, timing and the method's statistics
    come from the first look, quality and fidelity from the last. The dense method's samples are the dense
    reference itself: they are read from (and kept in) the dense cache and batch store that method points use.
    Raises BenchError (nothing written) on bad input."""
    # looked up at call time: tests replace bench.results.append_row
    from bench.results import append_row, new_run_id, row_json

    t_start, started_at = time.perf_counter(), _now()
    config = MeasureConfig.from_values({**(config.as_dict() if config else {}), **settings})
    if not isinstance(method, Method):
        method = create_method(str(method))
    sampling = sampling or bundle.sampling
    qcheck = validate(bundle, method, config, sampling, results_dir)
    plan = config.resolve_plan()
    samples, seed, batch_size, dtype, cache_dir = (config.samples, config.seed, config.batch_size, config.dtype,
                                                   config.cache_dir)
    check_free_space(bundle, plan.max_samples if plan else samples, results_dir, cache_dir)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = bundle.device
    phases: Dict[str, float] = {}

    @contextlib.contextmanager
    def phase(name):
        t = time.perf_counter()
        yield
        phases[name] = round(phases.get(name, 0.0) + time.perf_counter() - t, 4)

    logger.info(f"measure {method.label} on {bundle.name} ({bundle.model_id}): {samples} samples, batch "
                f"{batch_size}, seed {seed}, {device}, {dtype}, {torch.get_num_threads()} threads")
    for note in qcheck.get("notes", []):
        logger.info(f"quality: {note}")
    with phase("build"):
        net = method.build(bundle)
        if isinstance(net, torch.nn.Module):
            net.eval()
    labels = sample_labels(plan.max_samples if plan else samples, bundle.num_classes)   # looks: prefixes
    with phase("flops"), generation_dtype(dtype):
        flops = count_flops(method, net, bundle, labels, seed, sampling, min(config.flop_images, samples))
        flops.log()
    role = generation_role(method)
    store = generation_store(role, method, net, bundle, sampling, config)
    with phase("generate"), generation_dtype(dtype):
        gen, timing, paired, memory = generate_and_time(method, net, bundle, labels[:samples], seed, sampling,
                                                        batch_size, config.warmup_batches, config.timing_rounds,
                                                        store=store, workers=workers, role=role)
        flops.macs_analytic_all, flops.macs_analytic_all_per_scale = sum(gen.macs_all_per_scale), gen.macs_all_per_scale
        flops.macs_executed_all = gen.macs_executed_all
        flops.expert_paths = expert_paths(net)
        if flops.expert_paths:
            logger.info(f"expert execution: {flops.expert_paths}")
        for rec in (timing, memory, paired):
            rec.log()
    level = plan.level if plan else 0.95
    found: Dict[str, Any] = {}

    def look(n: int, level: float):
        """Quality and fidelity of the first n samples (generating the method's missing batches, and dense's)."""
        if n > len(gen.images):
            with phase("generate"), generation_dtype(dtype):
                gen.tokens, gen.images = generate_all(net, bundle, labels[:n], seed, sampling, batch_size,
                                                      what=f"generating (look at {n})", store=store,
                                                      workers=workers, role=role, keep_images=False)[:2]
        with phase("dense_reference"), generation_dtype(dtype):
            dense_images, fidelity, dense_path = dense_reference(method, bundle, labels[:n], seed, sampling,
                                                                 batch_size, cache_dir, gen, workers,
                                                                 keep_batches=plan is not None,
                                                                 bootstrap=config.bootstrap, level=level)
        with phase("quality"):
            q = quality_metrics(gen.images.to(device), bundle, labels=labels[:n], reference=config.reference,
                                inception_weights=config.inception_weights, metrics=config.metrics,
                                bootstrap=config.bootstrap, seed=seed,
                                cache_dir=None if cache_dir is None else os.path.join(cache_dir, "quality"),
                                reference_count=config.reference_count, classifier=config.classifier,
                                paired_images=(gen.images if method.name == "dense" else dense_images).to(device),
                                paired_key=dense_path, level=level,
                                interval="normal" if plan is not None else "percentile")
        found.update(q=q, fidelity=fidelity)
        if plan is None:   # one look, nothing to decide (its metrics may not include FID)
            return None
        return Look(n, q["fid_delta"], q.get("fid_delta_ci_low"), q.get("fid_delta_ci_high"),
                    q["fid"] - q["fid_delta"])

    resolve_rec = ResolveRecord()
    if plan is None:
        look(samples, level)
    else:
        def said(lk, reason):
            hw = lk.halfwidth_pct
            logger.info(f"resolve: look at {lk.samples} samples: ΔFID {lk.delta:+.4g} [{lk.low:+.4g}, {lk.high:+.4g}] "
                        f"(level {plan.level:.4f}), half-width {hw:.3g}% of dense FID (target {plan.target_pct:g}%)"
                        f" -> {reason or 'next look'}")
        resolve_rec = ResolveRecord(**run_looks(plan, look, said).columns())
        resolve_rec.log()
    q, fidelity = found["q"], found["fidelity"]
    quality, paired_quality, quality_extras = quality_records(q)
    quality.log()
    paired_quality.log()
    samples = len(gen.images)

    identity = RunIdentity(run_id=new_run_id(), sweep=sweep or "", sweep_id=sweep_id or "", trial_key=trial_key or "")
    setup = MethodSetup(method=method.name, method_kind=method.kind, method_label=method.label,
                        method_config=json.dumps(method.config, sort_keys=True, default=str))
    params = {f"param_{k}": (json.dumps(v) if isinstance(v, (list, tuple, dict)) else v)
              for k, v in method.config.items()}
    run = RunSetup(model=bundle.name, model_id=bundle.model_id, model_depth=int(bundle.var.cfg.depth),
                   model_source=bundle.source, samples=samples, seed=seed, seed_scheme=SEED_SCHEME,
                   batch_size=batch_size, cfg=float(sampling.cfg), top_k=int(sampling.top_k),
                   top_p=float(sampling.top_p), more_smooth=bool(sampling.more_smooth), device=str(device),
                   dtype=dtype)
    row: Dict[str, Any] = {**identity.row(), **setup.row(), **params}
    for rec in (run, flops, timing, paired, memory, quality, paired_quality, fidelity, resolve_rec,
                sweep_trial or SweepRecord(), EnvironmentRecord(**environment(device))):
        row.update(rec.row())
    row.update(quality_extras)
    for k, v in gen.method_extras.items():
        row[f"method_{k}" if k in row else k] = v  # a method cannot overwrite a harness column
    for k, v in (extra or {}).items():
        row[k] = v
    row.update(RunTimes(started_at=started_at, finished_at=_now(), wall_s=round(time.perf_counter() - t_start, 4),
                        phase_s=json.dumps(phases)).row())
    try:
        path = append_row(results_dir, row)
    except OSError as e:
        raise RowNotStored(f"the measurement finished but its row could not be written to {results_dir} "
                           f"({e.strerror or e}); the row is printed on standard output as one JSON line",
                           row_json(row)) from None
    if role == "method" or plan is None:   # the row holds the measurement: its batch checkpoints are not needed
        store.clear()                       # (dense's, under --resolve, serve the looks of later points)
    logger.info(f"row {row['run_id']} -> {path} ({row['wall_s']:.1f} s)")
    return row
