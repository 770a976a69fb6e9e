"""Generation workers: Ray actors that generate batches of one trial's samples alongside the trial, so that a large
trial (50,000 ImageNet samples) uses several GPUs of a cluster. They implement bench.generation.GenerationWorkerPool.

    workers = GenerationWorkers(job, 3, {"GPU": 1})  # inside a trial: 3 actors in the trial's placement group
    row = measure(bundle, method, ..., workers=workers)
    workers.shutdown()

The trial generates (and times) its batches from the start of the list; each worker builds the trial's model and
method once and takes batches from the end, at most INFLIGHT at a time. A worker is used only if the key of its
batches (bench.dense_cache.batch_store_key: model files, method config, a fingerprint of the built weights, sampling,
seeds, dtype, device type) equals the trial's, so its batches are exactly the ones the trial would have generated;
one that fails to start or dies leaves its batches to the trial. Batches travel back through Ray's object store
(no shared disk needed) and the trial checkpoints them (bench/resume.py) like its own.
"""
from __future__ import annotations

import json
from collections import Counter, deque
from typing import Dict, List, Tuple

from bench.dense_cache import batch_store_key
from bench.generation import batch_seed
from bench.log import get_logger
from bench.measure_config import MeasureConfig
from bench.precision import generation_dtype
from bench.quality import to_uint8
from bench.sweep.process import trial_setup

logger = get_logger(__name__)

INFLIGHT = 2   # batches queued per worker: it starts the next one while the trial collects the last


def _last_line(e: Exception) -> str:
    """A Ray error's last non-empty line (the remote exception), for a one-line warning."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


class GenerationActor:
    """One worker process: the trial's model, method and sampling (bench.sweep.process.trial_setup, as the trial
    itself), the net of each role built once."""

    def __init__(self, job: dict):
        self.job = job
        self.config = MeasureConfig.from_dict(job["config"])
        self.device, self.bundle, self.method, self.sampling = trial_setup(job)
        self.nets: Dict[str, tuple] = {}

    def open(self, role: str) -> str:
        """Build what `role` generates with; returns the key text of its batches."""
        bundle, c = self.bundle, self.config
        net = bundle.var
        if role == "method":
            net = self.method.build(bundle)
            if hasattr(net, "eval"):
                net.eval()
        key = batch_store_key(role, self.method, net, bundle, self.sampling, c.seed, c.samples, c.batch_size,
                              self.device, c.dtype)
        self.nets[role] = (net, bundle, self.sampling, c.dtype)
        return json.dumps(key, sort_keys=True, default=str)

    def generate(self, role: str, labels, seed: int):
        """One batch: (tokens per scale as int32, uint8 images), both on the CPU."""
        import torch
        from bench.sampling import generate   # looked up at call time: tests replace bench.sampling.generate
        net, bundle, sampling, dtype = self.nets[role]
        with torch.no_grad(), generation_dtype(dtype):
            gen = generate(net, bundle.vqvae, labels.to(bundle.device), seed, sampling)
        return [t.cpu().to(torch.int32) for t in gen.tokens], to_uint8(gen.images).cpu()


class GenerationWorkers:
    """`count` GenerationActors for one trial, started at the first session and kept until shutdown(). Inside a
    Ray Tune trial whose placement group has count+1 bundles (SweepRunner), actor i takes bundle i+1."""

    def __init__(self, job: dict, count: int, resources: Dict[str, float]):
        self.job, self.count, self.resources = job, count, dict(resources)
        self.actors: list = []
        self.received: Dict[str, int] = {}

    def _start(self) -> None:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        pg = get_current_placement_group()
        cls = ray.remote(GenerationActor)
        for i in range(self.count):
            opts = dict(num_cpus=self.resources.get("CPU", 1.0), num_gpus=self.resources.get("GPU", 0.0))
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i + 1)
            self.actors.append(cls.options(**opts).remote(self.job))

    def session(self, role: str, key_text: str, ranges: List[Tuple[int, int]], labels, seed: int):
        if not self.actors:
            self._start()
        return Session(self, role, key_text, ranges, labels, seed)

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []


class Session:
    """One generation pass (the method's samples, or the dense reference) shared with the workers."""

    def __init__(self, workers: GenerationWorkers, role: str, key_text: str, ranges, labels, seed: int):
        self.workers, self.role, self.key_text = workers, role, key_text
        self.ranges, self.labels, self.seed = ranges, labels, seed
        self.opening = {a.open.remote(role): a for a in workers.actors}   # future -> actor
        self.ready: list = []
        self.inflight: Dict[object, tuple] = {}                            # future -> (actor, batch)
        self.load: Counter = Counter()
        self.returned: Counter = Counter()
        self._lost: List[int] = []

    @property
    def busy(self) -> bool:
        return bool(self.inflight)

    @property
    def received(self) -> int:
        return sum(self.returned.values())

    @property
    def used(self) -> int:
        return len(self.returned)

    def _poll_open(self) -> None:
        import ray
        if not self.opening:
            return
        done, _ = ray.wait(list(self.opening), num_returns=len(self.opening), timeout=0)
        for f in done:
            actor = self.opening.pop(f)
            try:
                key = ray.get(f)
            except Exception as e:   # the worker could not build (or died): the trial generates its share
                logger.warning(f"generation worker not used: it failed to start ({_last_line(e)})")
                continue
            if key != self.key_text:
                logger.warning(f"generation worker not used for the {self.role} pass: its batches would differ from "
                               f"the trial's (its build gives another batch key)")
                continue
            self.ready.append(actor)

    def feed(self, todo: deque, keep: int) -> None:
        self._poll_open()
        for actor in self.ready:
            while self.load[actor] < INFLIGHT and len(todo) > keep:
                b = todo.pop()
                s, e = self.ranges[b]
                f = actor.generate.remote(self.role, self.labels[s:e], batch_seed(self.seed, b))
                self.inflight[f] = (actor, b)
                self.load[actor] += 1

    def collect(self, wait: bool) -> List[tuple]:
        import ray
        if not self.inflight:
            return []
        futures = list(self.inflight)
        done = ray.wait(futures, num_returns=1)[0] if wait else []
        rest = [f for f in futures if f not in done]
        if rest:   # and whatever else is finished by now
            done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        out = []
        for f in done:
            actor, b = self.inflight.pop(f)
            self.load[actor] -= 1
            try:
                tokens, images = ray.get(f)
            except Exception as e:   # the worker died or its batch failed: the trial generates the batch
                if actor in self.ready:
                    self.ready.remove(actor)
                    logger.warning(f"generation worker lost ({_last_line(e)}); the trial generates its batches")
                self._lost.append(b)
                continue
            self.returned[actor] += 1
            out.append((b, [t.long() for t in tokens], images))
        return out

    def lost(self) -> List[int]:
        lost, self._lost = self._lost, []
        return lost

    def close(self) -> None:
        self.inflight.clear()   # non-empty only when the trial itself failed; shutdown() ends the workers
        self.workers.received[self.role] = self.workers.received.get(self.role, 0) + self.received
