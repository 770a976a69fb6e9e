"""Atomic file writes: a reader sees the old file or the whole new one, never a part; a killed writer leaves at
most a hidden temp file (`.tmp-<host>-<pid>-<random><suffix>` beside the target, so a cleaner can tell whose it
was: on a directory shared by several machines (Ray nodes) a pid means something only on its own host).

    with atomic_path("out/row.parquet") as tmp:      # write anything to tmp; on success it replaces the target
        pq.write_table(table, tmp)
    atomic_write_text("out/meta.json", text)
"""
from __future__ import annotations

import contextlib
import os
import re
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


@contextlib.contextmanager
def atomic_path(path: str, suffix: str | None = None):
    """Yield a temp path in the target's directory; on a clean exit fsync it and rename it onto `path`; on any
    exception (KeyboardInterrupt included) remove it. `suffix` defaults to the target's extension (some writers
    choose the format by it)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    ext = os.path.splitext(path)[1] if suffix is None else suffix
    tmp = os.path.join(directory, f"{TMP_PREFIX}{host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
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
