"""Prepared artifacts of methods (fine-tuned weights, expert splits, routers), found by a key, and written atomically.

`python -m bench prepare <method>` writes them under the cache root (VARBENCH_CACHE, default
~/.cache/var-bench); those of the embedded default also ship in bench/assets/artifacts so that sweeps need no
training on a fresh machine. A key is (kind, model id, the configuration the artifact depends on: a method's
bench.recipe.Recipe derives it). The directory name holds the key's hash, so a key must never change for the
same configuration (the shipped copies would no longer be found).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from typing import Callable, Optional, Sequence

import torch

from bench.atomic import atomic_write_text, swap_directory, temp_directory
from bench.checkpoints import file_sha256
from bench.data import recording_splits
from bench.env import code_commit
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
    atomic_write_text(os.path.join(directory, "DONE"), json.dumps(meta, indent=1, default=str))


def require_artifact(kind: str, bundle, key: dict, prepare_hint: str, label: Optional[str] = None) -> str:
    """The artifact's directory (find_artifact), or one line naming it by `label` (default: its kind) and key and
    the `prepare` command that makes it."""
    d = find_artifact(kind, bundle.model_id, key)
    if d is None:
        raise BenchError(f"no prepared {label or kind} artifact for model {bundle.name} with "
                         f"{json.dumps(key, sort_keys=True)}; run `{prepare_hint}`")
    return d


def is_done(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, "DONE"))


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


def provenance() -> dict:
    """What made an artifact: the command line and the environment (recorded in its metadata)."""
    if sys.argv and sys.argv[0].endswith(os.path.join("bench", "__main__.py")):
        command = "python -m bench " + " ".join(sys.argv[1:])
    else:
        command = "(python API) " + " ".join(sys.argv)
    return dict(command=command, env=dict(torch=torch.__version__, python=platform.python_version(),
                                          threads=torch.get_num_threads(), machine=platform.machine(),
                                          code_commit=code_commit()))


def _recorded_as(value, path: bool):
    return os.path.realpath(value) if path and isinstance(value, str) else value


def reusable(directory: Optional[str], wanted: dict, force: bool = False,
             recorded: Callable[[dict], dict] = lambda meta: meta.get("recipe", {}),
             paths: Sequence[str] = ()) -> bool:
    """May the prepared artifact in `directory` be reused for the settings `wanted`?

    False when there is none to reuse (None, or no DONE: never made, or a killed `prepare`) or `force`: make it.
    True when what its metadata records (`recorded(meta)`, by default its recipe) equals `wanted`; the settings
    named in `paths` are file paths, compared as resolved. Otherwise BenchError, one line naming each setting that
    differs: an artifact is never silently reused for other settings, since its key leaves some out."""
    if directory is None or force or not is_done(directory):
        return False
    old = recorded(read_meta(directory))
    differ = sorted(k for k in set(old) | set(wanted)
                    if _recorded_as(old.get(k), k in paths) != _recorded_as(wanted.get(k), k in paths))
    if differ:
        raise BenchError(f"{directory} was made with {({k: old.get(k) for k in differ})}, not "
                         f"{({k: wanted.get(k) for k in differ})}; pass --force to redo it")
    return True


def write_artifact(kind: str, model_id: str, key: dict, out_root: Optional[str], write_files: Callable[[str], dict],
                   force: bool = False) -> str:
    """Write an artifact directory atomically: files go to a temp dir, DONE last, then bench.atomic.swap_directory.

    write_files(tmp_dir) writes the files and returns the metadata (saved as meta.json). If the directory
    appeared meanwhile (a parallel trial), the existing one wins unless force; one without DONE (incomplete, never
    found by lookups) is replaced."""
    final = artifact_dir_for_writing(kind, model_id, key, out_root)
    with temp_directory(final) as tmp:
        with recording_splits() as splits:   # every set of real images the artifact was made from
            meta = write_files(tmp)
        meta = dict(kind=kind, model_id=model_id, key=key, **meta, data_splits=splits)
        atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1, default=str))
        files = {f: file_sha256(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        mark_done(tmp, dict(kind=kind, key=key, files=files))
        swap_directory(tmp, final, replace=force or not is_done(final))   # a complete one (a parallel writer's) stands
    return final
