"""Generation of a measurement's samples, batch by batch under the seed scheme (SEED_SCHEME), with the optional
timer, memory probe, paired dense rounds, batch checkpoints (bench.resume.BatchStore) and generation workers.

    labels = sample_labels(n, bundle.num_classes)        # labels[i] = i % num_classes
    tokens, images, laps, peaks, sizes = generate_all(net, bundle, labels, seed, sampling, batch_size, store=store)
"""
from __future__ import annotations

from typing import Deque, Dict, List, Optional, Protocol, Tuple

import torch

from bench.defaults import SEED_MULTIPLIER
from bench.errors import BenchError
from bench.log import get_logger, progress
from bench.memory import release_freed_memory
from bench.quality import to_uint8
from bench.stored_images import StoredImages, batch_reader

logger = get_logger(__name__)


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


def batch_ranges(samples: int, batch_size: int) -> List[tuple]:
    return [(s, min(s + batch_size, samples)) for s in range(0, samples, batch_size)]


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return to_uint8(images).cpu()


# Batches between two returns of freed memory to the OS: each return makes the next batch fault its pages in again,
# which cost 15% of generation CPU time when done after every batch (measured: 11.5 vs 10.0 CPU s for 400 images,
# default model, 1 thread; raw generate() 9.97 s); once per 20 batches costs under 1%.
TRIM_EVERY = 20


@torch.no_grad()
def generate_all(net, bundle, labels, seed, sampling, batch_size, *, timer=None, probe=None, what="generating",
                 paired=None, dense_net=None, store=None, workers: Optional[GenerationWorkerPool] = None,
                 role="method", keep_images=True):
    """The N samples batch by batch (SEED_SCHEME). Returns (tokens per scale, uint8 images, laps, peaks, sizes).
    keep_images=False (with a store): the images are not held; they come back as bench.stored_images.StoredImages
    read from the store's batch files, which must stay until the caller is done with them.

    With `paired` (bench.timing.PairedRounds) and `dense_net`, the batches it wants are paired rounds: dense runs
    the same batch (same labels and seeds) right before or after the method's, on the same timer.
    With `store` (bench.resume.BatchStore), batches a killed run finished are read back instead of generated (not
    timed: laps, peaks and sizes cover the batches generated here, the first of which is the warm-up) and every
    generated batch is saved.
    With `workers` and a store (the GenerationWorkerPool protocol), other processes generate batches from the end of
    the list while this one generates (and times) them from the start; what they return is saved like this
    process's batches, so a kill loses nothing either way."""
    from collections import deque
    ranges = batch_ranges(len(labels), batch_size)
    done: Dict[int, Optional[torch.Tensor]] = {}   # batch -> its uint8 images (None when not kept)
    # per scale (N, pn²), allocated at the first batch and filled batch by batch: small per-batch token tensors kept
    # among a batch's freed buffers fragmented the heap, and each stretch between trims grew (+100 MB at 5000 samples)
    token_rows: List[torch.Tensor] = []

    def keep_tokens(b, tokens):
        s, e = ranges[b]
        if not token_rows:
            token_rows.extend(torch.empty((len(labels), *t.shape[1:]), dtype=torch.long) for t in tokens)
        for rows, t in zip(token_rows, tokens):
            rows[s:e] = t
    resumed_before = store.resumed if store is not None else 0   # the store may serve several passes (--resolve)
    for b, (s, e) in enumerate(ranges):
        got = store.load(b, e - s) if store is not None else None
        if got is not None:
            keep_tokens(b, got[0])
            done[b] = got[1] if keep_images else None
    todo = deque(b for b in range(len(ranges)) if b not in done)
    if store is not None and store.resumed > resumed_before:
        logger.info(f"{what}: {store.resumed - resumed_before} of {len(ranges)} batches resumed from {store.path}")
    session = workers.session(role, store.key_text, ranges, labels, seed) \
        if workers is not None and store is not None and todo else None
    laps, peaks, sizes = [], [], []
    fresh = 0   # batches generated by this process: warm-up and pairing count these, not the batch index

    def keep() -> int:
        """Batches this process still needs for its warm-up and timing: never handed to workers."""
        if paired is not None and not paired.complete:
            return max(0, paired.warmup + paired.max_rounds - fresh)
        return max(0, 2 - fresh) if timer is not None else 0

    lazy = store is not None and not keep_images

    def finish(b, tokens, images):
        keep_tokens(b, tokens)
        done[b] = None if lazy else images
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
            if fresh % TRIM_EVERY == 0:   # else glibc keeps the batches' freed buffers and RSS grows with N
                release_freed_memory()
            yield b

    try:
        for _ in progress(batches(), total=len(todo), desc=what, unit="batch", logger=logger):
            pass
    finally:
        if session is not None:
            session.close()
    if session is not None:
        logger.info(f"{what}: {session.received} of {len(ranges)} batches generated by {session.used} worker(s)")
    if lazy:
        def load_images(b, size):
            got = store.read(b, size)
            if got is None:
                raise BenchError(f"batch {b} of the run's stored images is gone or damaged (its checkpoint file was "
                                 f"removed during the run); run it again")
            return got[1]
        read = batch_reader(load_images, ranges)
        images = StoredImages(read, len(labels), read(0, 1).shape[1:])
    else:
        images = torch.cat([done[b] for b in range(len(ranges))])
    return token_rows, images, laps, peaks, sizes


def timed_batch(net, bundle, labels, seed: int, sampling, timer=None, probe=None):
    """A callable generating one batch: () -> ((Generation, peak memory or None), laps or None)."""
    from bench.sampling import generate   # looked up at call time: tests replace bench.sampling.generate

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
