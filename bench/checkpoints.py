"""Loading and saving weights without executing pickled code.

`.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`, which
refuses arbitrary objects. Mismatches are reported in one line: missing keys, unexpected keys, shape clashes.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Mapping

import torch
import torch.nn as nn

from bench.atomic import atomic_path
from bench.errors import BenchError

_WRAPPER_KEYS = ("state_dict", "model", "var_wo_ddp", "module")


def read_state_dict(path: str, what: str = "checkpoint") -> Dict[str, torch.Tensor]:
    if not path or not os.path.isfile(path):
        raise BenchError(f"{what} not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or containing pickled objects that weights_only refuses
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise BenchError(f"cannot read {what} {path}: {reason}") from None
    for key in _WRAPPER_KEYS:  # training checkpoints nest the weights one level down
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if isinstance(sd, Mapping) and "trainer" in sd and isinstance(sd["trainer"], Mapping):
        sd = sd["trainer"].get("var_wo_ddp", sd)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BenchError(f"cannot read {what} {path}: not a state dict of tensors")
    return dict(sd)


def _short(keys, n=3):
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_compatible(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str, model_desc: str,
                     ignore=()) -> None:
    """Raise one clear line if sd would not load strictly into model."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd and k not in ignore]
    unexpected = [k for k in sd if k not in own and k not in ignore]
    clashes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
               if k in sd and k not in ignore and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or clashes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if clashes:
            parts.append(f"shape clashes (file vs model): {_short(clashes, 2)}")
        raise BenchError(f"{what} does not match {model_desc}: " + "; ".join(parts))


def load_into(model: nn.Module, path: str, what: str, model_desc: str, ignore=()) -> nn.Module:
    sd = read_state_dict(path, what)
    check_compatible(model, sd, what + f" {path}", model_desc, ignore)
    model.load_state_dict(sd, strict=True)
    return model


def save_state_dict(model_or_sd, path: str, metadata: dict | None = None) -> None:
    """Atomic safetensors write (temp file + rename): a killed process never leaves a half-written file."""
    from safetensors.torch import save_file
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(sd, tmp, metadata=meta)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_writable_dir(path: str, what: str) -> None:
    """Fail (one line) if directory `path` could not be created or written; creates nothing."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise BenchError(f"{what} {path!r} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BenchError(f"{what} {path!r} is not writable ({probe})")
