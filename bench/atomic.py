"""Atomic file writes: a reader sees the old file or the whole new one, never a part; a killed writer leaves at
most a hidden temp file (`.tmp-<host>-<pid>-<random><suffix>` beside the target, so a cleaner can tell whose it
was: on a directory shared by several machines (Ray nodes) a pid means something only on its own host).

    with atomic_path("out/row.parquet") as tmp:      # write anything to tmp; on success it replaces the target
        pq.write_table(table, tmp)
    atomic_write_text("out/meta.json", text)
    with temp_directory("out/model") as tmp:          # a whole directory: fill tmp, then swap it into place
        ...
        swap_directory(tmp, "out/model")
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import uuid
from typing import Optional, Tuple

TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}(\.|$)")


def host_tag() -> str:
    """This machine's name as it appears in temp file names (no path separators or odd characters)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def temp_owner(filename: str) -> Optional[Tuple[str, int]]:
    """(host, pid) of the writer of a temp file named by atomic_path, or None for any other name."""
    m = _TMP_NAME.match(os.path.basename(filename))
    return (m.group("host"), int(m.group("pid"))) if m else None


def _fsync_dir(directory: str) -> None:
    try:   # make the rename itself durable (not every filesystem allows opening a directory)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _temp_name(path: str, suffix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(path)),
                        f"{TMP_PREFIX}{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None):
    """Yield a temp path in the target's directory; on a clean exit fsync it and rename it onto `path`; on any
    exception (KeyboardInterrupt included) remove it. `suffix` defaults to the target's extension (some writers
    choose the format by it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    ext = os.path.splitext(path)[1] if suffix is None else suffix
    tmp = _temp_name(path, ext)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
    return path


@contextlib.contextmanager
def temp_directory(path: str):
    """Yield a new empty temp directory beside `path` (named as atomic_path's temps) to fill and then hand to
    swap_directory; whatever is still there on leaving (an exception, a swap that kept the existing one) is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temp_name(path, "")
    os.makedirs(tmp)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_directory(tmp: str, path: str, replace: bool = True) -> bool:
    """Put the finished directory `tmp` at `path` by renames, so a reader finds the old directory or the whole new
    one, never a part (between the two renames of a replacement, briefly none: POSIX has no directory exchange).
    An existing `path` is replaced if `replace`, else it stands. Returns whether `tmp` took the place: False when
    the existing one was kept, or a parallel writer's appeared first (its directory is complete: it was swapped
    in whole). `tmp` is left to its temp_directory to remove."""
    if os.path.isdir(path):
        if not replace:
            return False
        trash = _temp_name(path, ".old")
        os.rename(path, trash)
        try:
            os.rename(tmp, path)
        except OSError:   # another writer's directory took the place between the two renames: it stands
            return False
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            os.rename(tmp, path)
        except OSError:   # a parallel writer's directory appeared meanwhile: theirs stands
            return False
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return True
