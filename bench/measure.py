"""The one measurement path every method goes through: one call, one tidy results row.

    row = measure(bundle, create_method("dmoe", tau=0.8), samples=1000, seed=0)

What happens, in order (nothing is written before step 1 has passed):
  1. validate everything: counts and seeds, sampling settings against the model, method.check_model(bundle),
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
     generated once and cached (a dense run stores its own): same-seed fidelity;
  6. quality (bench.quality.quality_metrics) of the N images, and paired with dense's images of step 5:
     `fid_delta` with a paired class-stratified bootstrap interval;
  7. append the row atomically (bench/results.py).
With `resolve` (bench/resolve.py), steps 5-6 are a look at the first N samples of a fixed schedule of looks; while
none decides, the method's samples grow to the next look (its earlier batches read back from their checkpoints,
dense's from the cache) and steps 5-6 run again at the schedule's corrected level; the row holds the last look.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

# The seed scheme, the bounds of the counts a user sets and the defaults are defined in bench.defaults (where the CLI
# parsers read them without importing torch) and re-exported here.
from bench.defaults import (DEFAULT_BATCH_SIZE, DEFAULT_FLOP_IMAGES, DEFAULT_TIMING_ROUNDS, MAX_BOOTSTRAP,  # noqa: F401
                            MAX_SEED, MAX_THREADS, MAX_TIMING_ROUNDS, MAX_WARMUP_BATCHES, QUALITY_METRICS,
                            SEED_MULTIPLIER, SEED_SCHEME)
from bench.errors import BenchError, RowNotStored
from bench.log import get_logger
from bench.memory import release_freed_memory

logger = get_logger(__name__)

DENSE_CACHE_VERSION = 1


class GenerationSession(Protocol):
    """One generation pass (role "method": the method's N samples, or "dense": the dense reference) shared with
    generation workers."""
    busy: bool        # batches in flight
    received: int     # batches the workers returned
    used: int         # workers that returned any

    def feed(self, todo: Deque[int], keep: int) -> None:
        """Hand batch indices from the end of `todo` to idle workers, leaving `keep` of them."""

    def collect(self, wait: bool) -> List[Tuple[int, List[torch.Tensor], torch.Tensor]]:
        """Finished batches: (index, tokens per scale, uint8 images); wait: block for at least one."""

    def lost(self) -> List[int]:
        """Indices handed to workers that failed (this process generates them)."""

    def close(self) -> None:
        """End of the pass (the workers stay for the next one)."""


class GenerationWorkerPool(Protocol):
    """What measure(workers=...) expects: other processes that generate some of a pass's batches (bench/sweep/
    workers.py implements it with Ray actors, one GPU each; the tests with an in-process fake)."""
    received: Dict[str, int]     # {role: batches workers returned in this measurement} (the row's worker_batches)

    def session(self, role: str, key_text: str, ranges: List[Tuple[int, int]], labels: torch.Tensor,
                seed: int) -> Optional[GenerationSession]:
        """A pass's session; key_text is its BatchStore key (batch_store_key), which a worker must reproduce from
        its own build or not be used."""


def batch_seed(seed: int, b: int) -> int:
    """Seed of batch b: documented in SEED_SCHEME and recorded in every row."""
    return seed * SEED_MULTIPLIER + b


def sample_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n) % num_classes


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


def batch_ranges(samples: int, batch_size: int) -> List[tuple]:
    return [(s, min(s + batch_size, samples)) for s in range(0, samples, batch_size)]


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
def _check_int(name: str, value, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            value = int(value)
        except (TypeError, ValueError):
            raise BenchError(f"{name} must be an integer, got {value!r}") from None
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in {low}..{high}"
        raise BenchError(f"{name} must be {rng}, got {value}")
    return value


def dense_cache_dir(cache_dir: Optional[str]) -> str:
    from bench.artifacts import cache_root
    return os.path.join(cache_dir or cache_root(), "dense-outputs")


def validate(bundle, method, *, samples, seed, sampling, batch_size, flop_images, warmup_batches, results_dir,
             reference, inception_weights, metrics, cache_dir, classifier=None, reference_count=None, dtype=None):
    """Every check that can fail, before anything is generated or written. Returns normalised values (not the
    dtype: measure() normalises it after this has checked it)."""
    from bench.precision import check_dtype
    from bench.checkpoints import check_writable_dir
    from bench.sampling import validate_sampling
    from bench.quality import check_reference
    from bench.results import check_results_dir
    samples = _check_int("samples", samples, 1)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    batch_size = _check_int("batch size", batch_size, 1)
    flop_images = min(_check_int("flop images", flop_images, 0), samples)
    warmup_batches = _check_int("warm-up batches", warmup_batches, 0, MAX_WARMUP_BATCHES)
    validate_sampling(sampling, bundle.var.V)
    check_dtype(dtype, bundle.device)
    method.check_model(bundle)
    check_results_dir(results_dir)
    check_writable_dir(dense_cache_dir(cache_dir), "cache directory")
    quality = check_reference(bundle, samples, reference, inception_weights, metrics,
                              reference_count=reference_count, classifier=classifier)
    return samples, seed, batch_size, flop_images, warmup_batches, quality


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


# ---------------------------------------------------------------------------------------------- dense cache
def dense_cache_key(bundle, sampling, seed: int, samples: int, batch_size: int, device,
                    dtype: Optional[str] = None) -> dict:
    """What dense outputs depend on. `dtype` (default: the current bench.precision dtype, the one they are
    generated in) enters only when not fp32, so fp32 entries made before --dtype existed stay valid."""
    from bench.precision import DEFAULT_DTYPE, current_dtype, normalize_dtype
    dtype = normalize_dtype(dtype if dtype is not None else current_dtype())
    files = {}
    for k, p in sorted((bundle.files or {}).items()):  # official weights: the VQ-VAE file is not in model_id
        if k in ("var", "vqvae") and os.path.isfile(p):
            st = os.stat(p)
            files[k] = [os.path.realpath(p), st.st_size, st.st_mtime_ns]
    key = dict(version=DENSE_CACHE_VERSION, model_id=bundle.model_id, files=files, sampling=sampling.to_dict(),
               seed=seed, seed_scheme=SEED_SCHEME, samples=samples, batch_size=batch_size,
               device_type=torch.device(device).type, num_classes=bundle.num_classes)
    if dtype != DEFAULT_DTYPE:
        key["dtype"] = dtype
    return key


def net_fingerprint(net) -> List[float]:
    """One float64 sum per parameter and buffer: re-prepared artifacts under the same settings change it."""
    if not isinstance(net, torch.nn.Module):
        return []
    with torch.no_grad():
        return [float(t.detach().double().sum()) if t.is_floating_point() else float(t.sum())
                for t in list(net.parameters()) + list(net.buffers()) if t.numel()]


def generation_key(method, net, bundle, sampling, seed: int, samples: int, batch_size: int, device,
                   dtype: Optional[str] = None) -> dict:
    """Everything the method's N samples depend on: the checkpoints of killed runs (bench.resume) are keyed by it."""
    key = dict(dense_cache_key(bundle, sampling, seed, samples, batch_size, device, dtype), method=method.name,
               method_config=json.dumps(method.config, sort_keys=True, default=str),
               net=hashlib.sha256(json.dumps(net_fingerprint(net)).encode()).hexdigest()[:16])
    execution = expert_execution(net, device)
    if execution is not None:
        key["expert_execution"] = execution
    return key


def expert_execution(net, device) -> Optional[dict]:
    """The expert layers' protocol (methods/_experts.execution_key): what their choice of execution paths depends
    on (the requested path, the cost model), so that checkpoints and workers only share batches generated alike;
    None for nets without expert layers."""
    for m in (net.modules() if isinstance(net, torch.nn.Module) else ()):
        key_of = getattr(m, "expert_execution_key", None)
        if callable(key_of):
            dtype = next((p.dtype for p in m.parameters()), torch.float32)
            return key_of(torch.device(device), dtype)
    return None


def batch_store_key(role: str, method, net, bundle, sampling, seed: int, samples: int, batch_size: int, device,
                    dtype: Optional[str] = None) -> dict:
    """The key of a generation pass's batch checkpoints (bench.resume.BatchStore): role "method" (the method's N
    samples, generation_key) or "dense" (the dense reference). Generation workers compute it from their own build."""
    key = (dict(dense_cache_key(bundle, sampling, seed, samples, batch_size, device, dtype), purpose="dense reference")
           if role == "dense" else generation_key(method, net, bundle, sampling, seed, samples, batch_size, device, dtype))
    # batch b's outputs do not depend on N (SEED_SCHEME): a run with more samples, or --resolve's next look, reads
    # back the batches an earlier one made
    del key["samples"]
    return key


def dense_cache_path(key: dict, cache_dir: Optional[str]) -> str:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(dense_cache_dir(cache_dir), f"dense-{key['model_id']}-{h}.safetensors")


def load_dense_outputs(path: str):
    """(tokens per scale (N, pn²) int64, images uint8 (N,3,H,W)) or None if there is no (readable) entry."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        return None
    try:
        t = load_file(path)
    except (SafetensorError, OSError, ValueError):
        return None  # a damaged entry is regenerated, never trusted
    from bench.resume import checked_outputs
    return checked_outputs(t)   # None for a damaged or foreign entry: regenerated


def store_dense_outputs(path: str, key: dict, tokens: List[torch.Tensor], images: torch.Tensor) -> None:
    """Atomic (bench.atomic): a reader never sees a partial entry."""
    from safetensors.torch import save_file
    from bench.atomic import atomic_path
    tensors = {f"tokens.{si}": t.to(torch.int32).contiguous() for si, t in enumerate(tokens)}
    tensors["images"] = images.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"key": json.dumps(key, sort_keys=True), "created_at": _now()})


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    from bench.quality import to_uint8
    return to_uint8(images).cpu()


@torch.no_grad()
def generate_all(net, bundle, labels, seed, sampling, batch_size, *, timer=None, probe=None, what="generating",
                 paired=None, dense_net=None, store=None, workers: Optional[GenerationWorkerPool] = None,
                 role="method"):
    """The N samples batch by batch (SEED_SCHEME). Returns (tokens per scale, uint8 images, laps, peaks, sizes).

    With `paired` (bench.timing.PairedRounds) and `dense_net`, the batches it wants are paired rounds: dense runs
    the same batch (same labels and seeds) right before or after the method's, on the same timer.
    With `store` (bench.resume.BatchStore), batches a killed run finished are read back instead of generated (not
    timed: laps, peaks and sizes cover the batches generated here, the first of which is the warm-up) and every
    generated batch is saved.
    With `workers` and a store (the GenerationWorkerPool protocol), other processes generate batches from the end of
    the list while this one generates (and times) them from the start; what they return is saved like this
    process's batches, so a kill loses nothing either way."""
    from collections import deque
    from bench.log import progress
    ranges = batch_ranges(len(labels), batch_size)
    done: Dict[int, tuple] = {}
    for b, (s, e) in enumerate(ranges):
        got = store.load(b, e - s) if store is not None else None
        if got is not None:
            done[b] = got
    todo = deque(b for b in range(len(ranges)) if b not in done)
    if store is not None and store.resumed:
        logger.info(f"{what}: {store.resumed} of {len(ranges)} batches resumed from {store.path}")
    session = workers.session(role, store.key_text, ranges, labels, seed) \
        if workers is not None and store is not None and todo else None
    laps, peaks, sizes = [], [], []
    fresh = 0   # batches generated by this process: warm-up and pairing count these, not the batch index

    def keep() -> int:
        """Batches this process still needs for its warm-up and timing: never handed to workers."""
        if paired is not None and not paired.complete:
            return max(0, paired.warmup + paired.max_rounds - fresh)
        return max(0, 2 - fresh) if timer is not None else 0

    def finish(b, tokens, images):
        done[b] = (tokens, images)
        if store is not None:
            store.save(b, tokens, images)

    def batches():
        nonlocal fresh
        while todo or (session is not None and session.busy):
            if session is not None:
                session.feed(todo, keep())
                for b, tokens, images in session.collect(wait=not todo):
                    finish(b, tokens, images)
                    yield b
                todo.extendleft(reversed(session.lost()))   # a failed worker's batches: generated here next
                if not todo:
                    continue
            b = todo.popleft()
            s, e = ranges[b]
            run_method = timed_batch(net, bundle, labels[s:e], batch_seed(seed, b), sampling, timer, probe)
            if paired is not None and paired.wants(fresh, e - s):
                (gen, peak), lap = paired.run(b, run_method, dense_batch(dense_net, bundle, labels[s:e],
                                                                         batch_seed(seed, b), sampling, timer, probe))
            else:
                (gen, peak), lap = run_method()
            if timer is not None:
                laps.append(lap)
            if probe is not None:
                peaks.append(peak)
            sizes.append(e - s)
            fresh += 1
            finish(b, [t.cpu() for t in gen.tokens], _to_uint8(gen.images))
            del gen
            release_freed_memory()   # else glibc keeps each batch's freed buffers and RSS grows with N
            yield b

    try:
        for _ in progress(batches(), total=len(todo), desc=what, unit="batch", logger=logger):
            pass
    finally:
        if session is not None:
            session.close()
    if session is not None:
        logger.info(f"{what}: {session.received} of {len(ranges)} batches generated by {session.used} worker(s)")
    tokens = [done[b][0] for b in range(len(ranges))]
    images = [done[b][1] for b in range(len(ranges))]
    per_scale = [torch.cat([t[si] for t in tokens]) for si in range(len(tokens[0]))]
    return per_scale, torch.cat(images), laps, peaks, sizes


def timed_batch(net, bundle, labels, seed: int, sampling, timer=None, probe=None):
    """A callable generating one batch: () -> ((Generation, peak memory or None), laps or None)."""
    from bench.sampling import generate

    def run():
        if probe is not None:
            probe.start()
        if timer is not None:
            timer.start()
        gen = generate(net, bundle.vqvae, labels.to(bundle.device), seed, sampling, timer=timer)
        lap = timer.stop() if timer is not None else None
        return (gen, probe.stop() if probe is not None else None), lap
    return run


def dense_batch(dense_net, bundle, labels, seed: int, sampling, timer, probe=None):
    """A callable timing dense on one batch (outputs discarded): () -> laps. `probe`: the method's memory probe,
    run around dense's batch too (its reading discarded), so that whatever it costs (CPU's sampling thread) is
    paid by both arms of a round."""
    run = timed_batch(dense_net, bundle, labels, seed, sampling, timer, probe)
    return lambda: run()[1]


@torch.no_grad()
def finish_rounds(paired, net, dense_net, bundle, labels, seed, sampling, batch_size, timer) -> int:
    """Paired rounds the N samples did not provide (N/B too small), on the post-warm-up full batches in turn
    (else the last batch); their outputs are discarded (read the method's statistics before). Returns the
    method's images run."""
    ranges = batch_ranges(len(labels), batch_size)
    full = [b for b, (s, e) in enumerate(ranges) if b >= paired.warmup and e - s == paired.full_size]
    cycle = full or [len(ranges) - 1]
    images = 0
    while not paired.complete:
        b = cycle[len(paired.done) % len(cycle)]
        s, e = ranges[b]
        if not full:
            paired.full_size = e - s
        paired.run(b, timed_batch(net, bundle, labels[s:e], batch_seed(seed, b), sampling, timer),
                   dense_batch(dense_net, bundle, labels[s:e], batch_seed(seed, b), sampling, timer))
        images += e - s
    return images


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
    from bench.analytic import dense_scale_macs
    m = method.analytic_macs(net, bundle, batch) if method is not None else None
    if m is None:
        m = [s.total for s in dense_scale_macs(bundle.var.cfg, batch)]
    return [float(x) for x in m]


def kv_element_bytes(bundle) -> float:
    """Mean of the key and value element sizes the attention caches store under the current --dtype on the bundle's
    device, probed with one attention call: autocast's rules differ by device (where `norm` runs in float32, the
    l2-normalised keys come out float32 while the values are in the autocast dtype)."""
    from bench.models.var import KVCache, SelfAttention
    from bench.precision import forward_autocast
    dev = bundle.device
    att, cache = SelfAttention(8, 2, bundle.var.cfg.attn_l2_norm).to(dev), KVCache()
    with torch.no_grad(), forward_autocast(dev.type):
        att(torch.zeros(1, 1, 8, device=dev), None, cache)
    return (cache.k.element_size() + cache.v.element_size()) / 2


# ---------------------------------------------------------------------------------------------- the phases
def count_flops(method, net, bundle, labels, seed: int, sampling, flop_images: int):
    """FLOPs phase: a traced generation of the first flop_images images (fvcore) beside the analytic count."""
    from bench.flops import count_generation
    from bench.records import FlopsRecord
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
    images: torch.Tensor                   # uint8 (N, 3, H, W)
    macs_all_per_scale: List[float]        # analytic MACs per image over every image the statistics saw (routed)
    macs_executed_all: float               # the same, counting what the expert kernels ran
    method_extras: Dict[str, Any]          # method.row_metrics of the N samples


def generate_and_time(method, net, bundle, labels, seed: int, sampling, batch_size: int, warmup_batches: int,
                      timing_rounds: int, store=None, workers: Optional[GenerationWorkerPool] = None):
    """Generation phase: the N samples, timed batch by batch with memory probes, the first `timing_rounds` full
    batches after the warm-up paired with dense (ABBA). Returns (Generated, TimingRecord, PairedTimingRecord,
    MemoryRecord). With `store`, batches of a killed run are resumed (generate_all): timing and the method's
    statistics then cover the batches generated here (TimingRecord.resumed_batches says how many were not; with
    `workers`, TimingRecord.worker_batches those that other processes generated)."""
    from bench.analytic import counting_executed, dense_scale_macs
    from bench.memory import PeakMemory
    from bench.records import MemoryRecord, PairedTimingRecord, TimingRecord
    from bench.timing import (NOISY_RULE, BatchTimer, MachineWatch, PairedRounds, paired_summary, summarize,
                              time_flop_efficiency)
    samples, S = len(labels), len(bundle.var.patch_nums)
    reset_stats(net)
    timer, probe = BatchTimer(bundle.device), PeakMemory(bundle.device)
    self_paired = method.name == "dense"
    dense_net = net if self_paired else bundle.var
    paired = PairedRounds(timing_rounds, warmup_batches, min(batch_size, samples)) if timing_rounds > 0 else None
    watch = MachineWatch().start()
    tokens, images, laps, peaks, sizes = generate_all(net, bundle, labels, seed, sampling, batch_size, timer=timer,
                                                      probe=probe, paired=paired, dense_net=dense_net, store=store,
                                                      workers=workers, role="method")
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
                          worker_batches=workers.received.get("method", 0) if workers is not None else 0)
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
    from bench.quality import same_seed_fidelity
    from bench.records import FidelityRecord
    key = dense_cache_key(bundle, sampling, seed, len(labels), batch_size, bundle.device)
    path = dense_cache_path(key, cache_dir)
    cached = load_dense_outputs(path)
    if method.name == "dense":
        ref = cached if cached is not None else (gen.tokens, gen.images)
        status = "reused" if cached is not None else "stored"
        if cached is None:
            store_dense_outputs(path, key, gen.tokens, gen.images)
    elif cached is not None:
        ref, status = cached, "reused"
    else:
        logger.info("dense reference: generating the same samples with the dense model")
        from bench.resume import BatchStore
        store = BatchStore.for_key(batch_store_key("dense", method, None, bundle, sampling, seed, len(labels),
                                                   batch_size, bundle.device), cache_dir)
        ref = generate_all(bundle.var, bundle, labels, seed, sampling, batch_size, what="dense reference",
                           store=store, workers=workers, role="dense")[:2]
        store_dense_outputs(path, key, *ref)
        if not keep_batches:
            store.clear()    # the dense cache holds them now
        status = "generated"
    logger.info(f"dense reference: {'reused cached outputs' if status == 'reused' else 'stored in the cache'} ({path})")
    f = same_seed_fidelity(gen.tokens, ref[0], gen.images.float().div(255), ref[1].float().div(255), labels=labels,
                           resamples=bootstrap, seed=seed, level=level)
    return ref[1], FidelityRecord(dense_cache=status, **f), path


def quality_records(q: dict):
    """QualityRecord and PairedQualityRecord from bench.quality.quality_metrics' flat dict; the rest of its
    quality_* keys go to the row as they are."""
    from bench.records import PairedQualityRecord, QualityRecord
    pick = lambda rec: rec(**{k: q.get(k) for k in rec.schema()})   # noqa: E731
    return pick(QualityRecord), pick(PairedQualityRecord), {k: v for k, v in q.items() if k.startswith("quality_")}


def check_resolve(resolve, max_samples, samples: int, batch_size: int, bootstrap: int, metrics):
    """The --resolve plan (bench.resolve.ResolvePlan), or None without --resolve; its inputs checked."""
    if resolve is None:
        if max_samples is not None:
            raise BenchError("max samples is the budget of resolve; give resolve too (e.g. --resolve 1), or drop it")
        return None
    from bench.resolve import make_plan
    if max_samples is not None:
        max_samples = _check_int("max samples", max_samples, 1)
    if bootstrap < 1 or "fid" not in metrics:
        raise BenchError("resolve decides on the paired ΔFID interval: it needs the fid metric and bootstrap >= 1")
    return make_plan(samples, max_samples, batch_size, resolve)


# ---------------------------------------------------------------------------------------------- the call
def measure(bundle, method, *, samples: int, seed: int = 0, sampling=None, batch_size: int = DEFAULT_BATCH_SIZE,
            results_dir: str = "results", reference: Optional[str] = None, inception_weights: Optional[str] = None,
            flop_images: int = DEFAULT_FLOP_IMAGES, warmup_batches: int = 1, sweep: str = "", sweep_id: str = "",
            trial_key: Optional[str] = None, extra: Optional[Dict[str, Any]] = None, cache_dir: Optional[str] = None,
            metrics: Sequence[str] = QUALITY_METRICS, bootstrap: int = 100, classifier: Optional[str] = None,
            reference_count: Optional[int] = None, timing_rounds: int = DEFAULT_TIMING_ROUNDS,
            dtype: Optional[str] = None, workers: Optional[GenerationWorkerPool] = None,
            resolve: Optional[float] = None, max_samples: Optional[int] = None) -> dict:
    """Measure `method` (a bench.registry.Method or a registered name) on `bundle`; append and return the row.

    Each phase returns typed records (bench/records.py) that log themselves; the row is their columns, the
    method's parameters (param_*) and statistics (row_metrics), then `extra` as given. With `trial_key`, the
    stored row replaces that trial's earlier row. `dtype` (bench/precision.py; default fp32): the autocast of the
    transformer forward in every generation of the measurement (FLOP count, timed batches and their paired dense
    batches, dense reference). `workers` (GenerationWorkerPool): other processes (GPUs) that generate some of the
    N samples and of the dense reference alongside this one. `resolve` (a % of dense FID; bench/resolve.py): the
    samples are the first look of a fixed schedule up to `max_samples`; after each look the paired ΔFID interval
    (at the schedule's corrected level) decides whether the method's samples grow to the next look (dense's are read
    from the cache where an earlier point made them); FLOPs, timing and the method's statistics come from the first
    look, quality and fidelity from the last. Raises BenchError (nothing written) on bad input."""
    from bench.env import environment
    from bench.precision import generation_dtype, normalize_dtype
    from bench.quality import quality_metrics
    from bench.records import EnvironmentRecord, MethodSetup, ResolveRecord, RunIdentity, RunSetup, RunTimes
    from bench.registry import Method, create_method
    from bench.results import append_row, new_run_id, row_json

    t_start, started_at = time.perf_counter(), _now()
    if not isinstance(method, Method):
        method = create_method(str(method))
    sampling = sampling or bundle.sampling
    samples, seed, batch_size, flop_images, warmup_batches, qcheck = validate(
        bundle, method, samples=samples, seed=seed, sampling=sampling, batch_size=batch_size,
        flop_images=flop_images, warmup_batches=warmup_batches, results_dir=results_dir, reference=reference,
        inception_weights=inception_weights, metrics=metrics, cache_dir=cache_dir, classifier=classifier,
        reference_count=reference_count, dtype=dtype)
    dtype = normalize_dtype(dtype)   # validate() checked that the device supports it
    timing_rounds = _check_int("timing rounds", timing_rounds, 0, MAX_TIMING_ROUNDS)
    _check_int("bootstrap", bootstrap, 0, MAX_BOOTSTRAP)
    plan = check_resolve(resolve, max_samples, samples, batch_size, bootstrap, metrics)
    check_free_space(bundle, plan.max_samples if plan else samples, results_dir, cache_dir)
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
        flops = count_flops(method, net, bundle, labels, seed, sampling, flop_images)
        flops.log()
    from bench.resume import BatchStore
    store = BatchStore.for_key(batch_store_key("method", method, net, bundle, sampling, seed, samples, batch_size,
                                               device, dtype), cache_dir)
    with phase("generate"), generation_dtype(dtype):
        gen, timing, paired, memory = generate_and_time(method, net, bundle, labels[:samples], seed, sampling,
                                                        batch_size, warmup_batches, timing_rounds, store=store,
                                                        workers=workers)
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
                                                      workers=workers)[:2]
        with phase("dense_reference"), generation_dtype(dtype):
            dense_images, fidelity, dense_path = dense_reference(method, bundle, labels[:n], seed, sampling,
                                                                 batch_size, cache_dir, gen, workers,
                                                                 keep_batches=plan is not None, bootstrap=bootstrap,
                                                                 level=level)
        with phase("quality"):
            q = quality_metrics(gen.images.to(device), bundle, labels=labels[:n], reference=reference,
                                inception_weights=inception_weights, metrics=metrics, bootstrap=bootstrap, seed=seed,
                                cache_dir=None if cache_dir is None else os.path.join(cache_dir, "quality"),
                                reference_count=reference_count, classifier=classifier,
                                paired_images=(gen.images if method.name == "dense" else dense_images).to(device),
                                paired_key=dense_path, level=level,
                                interval="normal" if plan is not None else "percentile")
        found.update(q=q, fidelity=fidelity)
        if plan is None:   # one look, nothing to decide (its metrics may not include FID)
            return None
        from bench.resolve import Look
        return Look(n, q["fid_delta"], q.get("fid_delta_ci_low"), q.get("fid_delta_ci_high"),
                    q["fid"] - q["fid_delta"])

    resolve_rec = ResolveRecord()
    if plan is None:
        look(samples, level)
    else:
        from bench.resolve import run_looks

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
                EnvironmentRecord(**environment(device))):
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
    store.clear()   # the row holds the measurement: its batch checkpoints are no longer needed
    logger.info(f"row {row['run_id']} -> {path} ({row['wall_s']:.1f} s)")
    return row
