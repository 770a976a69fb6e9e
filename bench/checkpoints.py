"""Loading and saving weights without executing pickled code.

`.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`, which
refuses arbitrary objects. Mismatches are reported in one line: missing keys, unexpected keys, shape clashes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

from bench.atomic import atomic_path
from bench.errors import BenchError

_WRAPPER_KEYS = ("state_dict", "model", "var_wo_ddp", "module")
MASK_BUFFERS = ("attn_bias_for_masking",)


def _is_pickle(path: str, head: Optional[bytes]) -> bool:
    """Does the file start as a pickle of protocol 2-5 (PROTO opcode, then opcodes that parse), e.g. a plain
    pickle.dump? Random bytes also fail the tensor-only loader, as an unsupported operand: those are 'corrupt'.
    Nothing is unpickled here: pickletools only reads the opcodes."""
    import pickletools
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(64)
        except OSError:
            return False
    if not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return False
    n = 0
    try:
        for op, _, _ in pickletools.genops(io.BytesIO(head[:64])):
            n += 1
            if n >= 5 or op.name == "STOP":
                return True
    except Exception:   # noqa: BLE001  (genops raises ValueError and others at an unknown opcode or the cut)
        pass
    return n >= 5


def _unreadable(path: str, what: str, err: Exception, size: Optional[int] = None,
                head: Optional[bytes] = None) -> BenchError:
    """Our own one-line words for why a weights file could not be read (torch's text is long and suggests
    `weights_only=False`, which we never do)."""
    text = str(err)
    low = text.lower()   # torch's wording varies: "Unsupported global: GLOBAL x", "unsupported GLOBAL posix.system"
    if (os.path.getsize(path) if size is None else size) == 0:
        why = "the file is empty (0 bytes)"
    elif "unsupported global" in low:
        name = re.search(r"GLOBAL ([\w.]+)", text)
        why = (f"it contains pickled Python objects{' (' + name.group(1) + ')' if name else ''}, not only tensors; "
               "refused without running them. Re-save it as a state dict of tensors or as .safetensors")
    elif ("weights only load failed" in low or "weightsunpickler error" in low) and _is_pickle(path, head):
        why = ("it is a pickle the tensor-only loader cannot read (pickled Python objects, or a pickle that "
               "torch.save did not write); refused without running it. Re-save it as a state dict of tensors "
               "(torch.save) or as .safetensors")
    elif isinstance(err, (EOFError,)) or "central directory" in text or "truncated" in text or "too small" in text:
        why = "the file is truncated or corrupt"
    else:
        why = "the file is corrupt or not a PyTorch/safetensors weights file"
    return BenchError(f"cannot read {what} {path}: {why}")


def load_tensors(path: str, what: str = "checkpoint", data: Optional[bytes] = None):
    """The file's tensors (safetensors, or torch.load with weights_only=True: no pickled code ever runs).
    `data`: the file's bytes, already read (then the path only names it and picks the format)."""
    if data is None and (not path or not os.path.isfile(path)):
        raise BenchError(f"{what} not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load, load_file
            return load_file(path, device="cpu") if data is None else load(data)
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing; our line says it
            warnings.simplefilter("ignore")
            return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or containing pickled objects that weights_only refuses
        raise _unreadable(path, what, e, None if data is None else len(data),
                          None if data is None else data[:64]) from None


def check_finite(sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN/Inf: they would crash sampling or silently decode black images."""
    def ok(k, v):
        if v.is_complex():
            v = torch.view_as_real(v)
        if not v.is_floating_point():
            return True
        if k.endswith(MASK_BUFFERS):  # an additive attention mask is -inf where masked, by design
            return not bool((v.isnan() | (v == float("inf"))).any())
        if v.numel() == 0:
            return True
        lo, hi = torch.aminmax(v.detach().reshape(-1))   # ~20x faster than isfinite().all() on 100M values
        return bool(torch.isfinite(lo) & torch.isfinite(hi))   # NaN propagates to both; ±Inf is an extreme
    bad = [k for k, v in sd.items() if not ok(k, v)]
    if bad:
        raise BenchError(f"{what} contains non-finite values (NaN or Inf) in {len(bad)} tensor(s): {_short(bad)}; "
                         "refusing to use it")


def read_state_dict(path: str, what: str = "checkpoint", data: Optional[bytes] = None) -> Dict[str, torch.Tensor]:
    """A state dict of finite tensors from a weights file (or from its bytes `data`), never running pickled code."""
    sd = load_tensors(path, what, data)
    for key in _WRAPPER_KEYS:  # training checkpoints nest the weights one level down
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if isinstance(sd, Mapping) and "trainer" in sd and isinstance(sd["trainer"], Mapping):
        sd = sd["trainer"].get("var_wo_ddp", sd)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BenchError(f"cannot read {what} {path}: not a state dict of tensors")
    check_finite(sd, f"{what} {path}")
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
