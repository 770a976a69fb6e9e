"""A benchmark's figures as a strict JSON file: non-finite numbers as null, written atomically."""
from __future__ import annotations

import json
import math

from bench.atomic import atomic_write_text


def plain(obj):
    """What JSON can hold: non-finite floats -> None, tuples -> lists, numpy/torch scalars -> Python, keys -> str,
    anything else -> its text."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    item = getattr(obj, "item", None)
    if callable(item):
        return plain(item())
    return str(obj)


def json_text(obj) -> str:
    """`obj` as strict JSON text (bare NaN is not JSON: plain() has made every non-finite value null)."""
    return json.dumps(plain(obj), indent=1, allow_nan=False) + "\n"


def write_json(path: str, obj) -> str:
    """Write `obj` as strict JSON to `path` atomically; returns the path."""
    return atomic_write_text(path, json_text(obj))
