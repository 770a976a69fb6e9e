"""What generated outputs depend on, as cache keys, and the dense-output cache.

    key = dense_cache_key(bundle, sampling, seed, samples, batch_size, device)    # dense's N outputs
    path = dense_cache_path(key, cache_dir)                                       # one .safetensors per key
    load_dense_outputs(path)  /  store_dense_outputs(path, key, tokens, images)
    batch_store_key("method" | "dense", ...)     # the key of a generation pass's batch checkpoints (bench.resume)

A key holds everything the outputs depend on (model files, sampling, seeds and their scheme, device type, dtype;
for a method's samples also its config and a fingerprint of its built weights), so that an entry is reused only
where it is bitwise what would be generated, and a changed input makes a new entry rather than a wrong reuse.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import List, Optional

import torch

from bench.artifacts import cache_root
from bench.atomic import atomic_path
from bench.defaults import SEED_SCHEME
from bench.errors import BenchError
from bench.precision import DEFAULT_DTYPE, current_dtype, normalize_dtype
from bench.stored_images import Images, StoredImages, save_safetensors_streaming
from bench.resume import BatchStore, checked_outputs

DENSE_CACHE_VERSION = 1


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def dense_cache_dir(cache_dir: Optional[str]) -> str:
    return os.path.join(cache_dir or cache_root(), "dense-outputs")


def dense_cache_key(bundle, sampling, seed: int, samples: int, batch_size: int, device,
                    dtype: Optional[str] = None) -> dict:
    """What dense outputs depend on. `dtype` (default: the current bench.precision dtype, the one they are
    generated in) enters only when not fp32, so fp32 entries made before --dtype existed stay valid."""
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
    args = (bundle, sampling, seed, samples, batch_size, device, dtype)
    key = (dict(dense_cache_key(*args), purpose="dense reference") if role == "dense"
           else generation_key(method, net, *args))
    # batch b's outputs do not depend on N (SEED_SCHEME): a run with more samples, or --resolve's next look, reads
    # back the batches an earlier one made
    del key["samples"]
    return key


def dense_cache_path(key: dict, cache_dir: Optional[str]) -> str:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(dense_cache_dir(cache_dir), f"dense-{key['model_id']}-{h}.safetensors")


def load_dense_outputs(path: str, lazy_images: bool = False):
    """(tokens per scale (N, pn²) int64, images uint8 (N,3,H,W)) or None if there is no (readable) entry.
    lazy_images: the images as bench.stored_images.StoredImages, read from the entry a row range at a time."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        return None
    try:
        if not lazy_images:
            return checked_outputs(load_file(path))   # None for a damaged or foreign entry: regenerated
        with safe_open(path, "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys() if k != "images"}
            shape = f.get_slice("images").get_shape() if "images" in f.keys() else []
            first = f.get_slice("images")[0:1] if shape and shape[0] else None
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None  # a damaged entry is regenerated, never trusted
    # the entry's form, checked on its first row (checked_outputs) and on every token scale's length
    if first is None or any(x.dim() == 0 or len(x) != shape[0] for x in t.values()) or \
            checked_outputs({**{k: x[:1] for k, x in t.items()}, "images": first}, 1) is None:
        return None

    def read(start: int, stop: int) -> torch.Tensor:
        rows = load_dense_rows(path, start, stop)
        if rows is None:
            raise BenchError(f"the dense cache entry {path} changed or was damaged during the run; run it again")
        return rows[1]
    return [t[f"tokens.{si}"].long() for si in range(len(t))], StoredImages(read, shape[0], shape[1:])


def load_dense_rows(path: str, start: int, stop: int):
    """Rows start..stop-1 of a dense-cache entry (tokens per scale, images), read without loading the rest; None if
    the entry is missing, damaged, or shorter."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, "pt") as f:
            t = {k: f.get_slice(k)[start:stop] for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    return checked_outputs(t, stop - start)


def store_dense_outputs(path: str, key: dict, tokens: List[torch.Tensor], images: Images) -> None:
    """Atomic (bench.atomic): a reader never sees a partial entry. StoredImages are written a chunk at a time."""
    from safetensors.torch import save_file
    tensors = {f"tokens.{si}": t.to(torch.int32).contiguous() for si, t in enumerate(tokens)}
    metadata = {"key": json.dumps(key, sort_keys=True), "created_at": _now()}
    with atomic_path(path) as tmp:
        if isinstance(images, StoredImages):
            save_safetensors_streaming(tmp, {**tensors, "images": images}, metadata)
        else:
            save_file({**tensors, "images": images.contiguous()}, tmp, metadata=metadata)


def generation_role(method) -> str:
    """The role of a method's generation pass: "dense" for the dense method, whose samples are the dense reference
    itself (the same net, labels and seeds), so that it shares dense's batch store and cache with method points;
    "method" for every other."""
    return "dense" if method.name == "dense" else "method"


def generation_store(role: str, method, net, bundle, sampling, config):
    """The batch checkpoints of a measurement's N samples (bench.resume.BatchStore under batch_store_key). The dense
    role reads first the dense cache's entry for these N samples, where a method point left one."""
    c = config
    store = BatchStore.for_key(batch_store_key(role, method, net, bundle, sampling, c.seed, c.samples, c.batch_size,
                                               bundle.device, c.dtype), c.cache_dir)
    if role != "dense":
        return store
    path = dense_cache_path(dense_cache_key(bundle, sampling, c.seed, c.samples, c.batch_size, bundle.device, c.dtype),
                            c.cache_dir)
    return CacheFirstStore(store, path, c.batch_size) if os.path.isfile(path) else store


class CacheFirstStore:
    """A BatchStore whose batches are read from a dense-cache entry (one batch's rows at a time) before its own
    files; what is generated is saved to, and cleared from, the store as before."""

    def __init__(self, store, path: str, batch_size: int):
        self.store, self.cache_path, self.batch_size = store, path, batch_size
        self.path, self.key_text = store.path, store.key_text
        self.from_cache = 0

    @property
    def resumed(self) -> int:
        return self.store.resumed + self.from_cache

    def load(self, b: int, size: int):
        got = load_dense_rows(self.cache_path, b * self.batch_size, b * self.batch_size + size)
        if got is None:
            return self.store.load(b, size)
        self.from_cache += 1
        return got

    def read(self, b: int, size: int):
        """As load, not counted as resumed (the run reading back its own images)."""
        got = load_dense_rows(self.cache_path, b * self.batch_size, b * self.batch_size + size)
        return got if got is not None else self.store.read(b, size)

    def save(self, b: int, tokens, images) -> None:
        self.store.save(b, tokens, images)

    def clear(self) -> None:
        self.store.clear()
