"""The precision of generation: `--dtype fp32 | bf16 | fp16` (row column `dtype`).

    dtype = check_dtype("bf16", "cpu")         # one line (BenchError) if unknown or unsupported on that device
    with generation_dtype(dtype):              # every bench.sampling.generate call inside runs its transformer
        generate(...)                          #   forward (scale_fn) under torch.autocast(device, dtype)

What runs in reduced precision: only the VAR transformer forward of each scale (the method's `scale_fn`), under
torch.autocast. Its logits are cast back to float32 before guidance and sampling, and the residual update, the
VQ-VAE decode and everything after stay in float32: the decoder is a small share of the time, and float32 there
keeps the images (quality metrics) comparable across dtypes. fp32 means no autocast at all (bitwise the code path
of before). The weights stay float32 (autocast casts per op).

The setting travels as a context variable rather than an argument of every generation helper: `measure()` sets it
around its generation phases (FLOP count, timed generation with its paired dense batches, dense reference), so
the method, its paired dense timing and its dense reference always run in the same dtype.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterator, List, Optional

import torch

from bench.defaults import DEFAULT_DTYPE, DTYPE_ALIASES as ALIASES  # noqa: F401  (the names, torch-free, for the CLI)
from bench.errors import BenchError

# fp32 -> None (no autocast), bf16 -> torch.bfloat16, fp16 -> torch.float16
DTYPES = {short: None if long == "float32" else getattr(torch, long) for long, short in ALIASES.items()}

_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("varbench_generation_dtype", default=DEFAULT_DTYPE)


def normalize_dtype(name, what: str = "--dtype") -> str:
    """'bf16' (or 'bfloat16') -> 'bf16'; anything else: one line with the valid choices."""
    key = ALIASES.get(str(name).strip().lower(), str(name).strip().lower()) if name is not None else DEFAULT_DTYPE
    if key not in DTYPES:
        raise BenchError(f"{what} {name!r} is not a valid dtype; valid: {', '.join(DTYPES)}")
    return key


def autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch runs autocast to `dtype` on this device type here (torch disables it with a warning, or
    raises, where the device cannot: e.g. bf16 on a pre-Ampere GPU)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, ValueError):
        return False


def supported_dtypes(device) -> List[str]:
    device_type = torch.device(device).type
    return [k for k, dt in DTYPES.items() if dt is None or autocast_works(device_type, dt)]


def check_dtype(name, device, what: str = "--dtype") -> str:
    """The normalised dtype if generation on `device` can use it, else one line naming the valid ones there."""
    key = normalize_dtype(name, what)
    valid = supported_dtypes(device)
    if key not in valid:
        raise BenchError(f"{what} {key} is not supported on {device} by torch {torch.__version__}; valid on "
                         f"{torch.device(device).type}: {', '.join(valid)}")
    return key


@contextlib.contextmanager
def generation_dtype(name: Optional[str]) -> Iterator[str]:
    """Generation inside this block uses `name` (already checked by check_dtype)."""
    key = normalize_dtype(name)
    token = _CURRENT.set(key)
    try:
        yield key
    finally:
        _CURRENT.reset(token)


def current_dtype() -> str:
    return _CURRENT.get()


def forward_autocast(device_type: str):
    """The context a transformer forward runs in: autocast to the current dtype, or nothing for fp32."""
    dt = DTYPES[_CURRENT.get()]
    return contextlib.nullcontext() if dt is None else torch.autocast(device_type, dtype=dt)
