"""Prepared artifacts of methods (fine-tuned weights, expert splits, routers), found by a key.

`python -m bench prepare <method>` writes them under the cache root (VARBENCH_CACHE, default
~/.cache/var-bench); those of the embedded default also ship in bench/assets/artifacts so that sweeps need no
training on a fresh machine. A key is (kind, model id, the configuration the artifact depends on).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from bench.errors import BenchError

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "artifacts")


def cache_root() -> str:
    return os.environ.get("VARBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "var-bench")


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:10]


def artifact_name(kind: str, model_id: str, config: dict) -> str:
    return f"{kind}-{model_id}-{config_hash(config)}"


def find_artifact(kind: str, model_id: str, config: dict) -> Optional[str]:
    """Directory of a prepared artifact, user cache first, then the shipped copy; None if neither exists."""
    name = artifact_name(kind, model_id, config)
    for root in (os.path.join(cache_root(), "artifacts"), SHIPPED):
        d = os.path.join(root, name)
        if os.path.isfile(os.path.join(d, "DONE")):
            return d
    return None


def artifact_dir_for_writing(kind: str, model_id: str, config: dict, out_root: Optional[str] = None) -> str:
    return os.path.join(out_root or os.path.join(cache_root(), "artifacts"), artifact_name(kind, model_id, config))


def mark_done(directory: str, meta: dict) -> None:
    """Written last: an artifact without DONE is incomplete (a killed `prepare`) and is ignored."""
    from bench.atomic import atomic_write_text
    atomic_write_text(os.path.join(directory, "DONE"), json.dumps(meta, indent=1, default=str))


def require_artifact(kind: str, bundle, config: dict, prepare_hint: str) -> str:
    d = find_artifact(kind, bundle.model_id, config)
    if d is None:
        raise BenchError(f"no prepared {kind} artifacts for model {bundle.name} with {json.dumps(config, sort_keys=True)}; "
                         f"run `{prepare_hint}`")
    return d
