"""The peak resident memory (RSS) of a child process: its ru_maxrss and its VmHWM polled from /proc (Linux)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

from bench.errors import BenchError

MB = 2 ** 20
POLL_S = 0.02

# Runs in a small fresh interpreter (stdlib only): starts the measured command, polls its VmHWM/VmRSS, reaps it with
# os.wait4 and writes {rc, ru_maxrss_kb, polled_kb} as JSON to argv[1]. The launcher exists because a child's
# ru_maxrss starts at the RSS of the process it was forked from (exec records the old address space's high-water
# mark): started from this process directly, every child would report at least this process's ~1.4 GB.
LAUNCHER = r"""
import json, os, subprocess, sys, threading
out, argv = sys.argv[1], sys.argv[2:]
p = subprocess.Popen(argv)
polled, done = [0], threading.Event()
def poll():
    while not done.wait(%r):
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith(("VmHWM:", "VmRSS:")):
                        polled[0] = max(polled[0], int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
th = threading.Thread(target=poll, daemon=True)
th.start()
try:
    _, status, usage = os.wait4(p.pid, 0)
finally:
    done.set()
    th.join()
with open(out, "w") as f:
    json.dump(dict(rc=os.waitstatus_to_exitcode(status), ru_maxrss_kb=int(usage.ru_maxrss), polled_kb=polled[0]), f)
""" % POLL_S


def peak_rss_child(argv: List[str], env: Optional[dict] = None, log_path: Optional[str] = None) -> dict:
    """Run argv (through LAUNCHER); its peak RSS in bytes: max(ru_maxrss from os.wait4, the VmHWM/VmRSS polled every
    POLL_S: the per-batch memory probe of a measurement resets the high-water mark, so ru_maxrss alone covers only the
    time since the last reset)."""
    if not sys.platform.startswith("linux"):
        raise BenchError("peak RSS of a child is measured on Linux only (ru_maxrss in KiB, /proc/<pid>/status)")
    fd, result = tempfile.mkstemp(prefix="varbench-rss-", suffix=".json")
    os.close(fd)
    t = time.perf_counter()
    try:
        with open(log_path or os.devnull, "w") as log:
            rc = subprocess.run([sys.executable, "-c", LAUNCHER, result, *argv], stdout=log, stderr=subprocess.STDOUT,
                                env=env).returncode
        try:
            with open(result) as f:
                r = json.load(f)
        except (OSError, ValueError):
            r = dict(rc=rc if rc else -1, ru_maxrss_kb=0, polled_kb=0)
    finally:
        with contextlib.suppress(OSError):
            os.remove(result)
    ru, polled = r["ru_maxrss_kb"] * 1024, r["polled_kb"] * 1024
    return dict(rc=r["rc"], peak_bytes=max(ru, polled), ru_maxrss_bytes=ru, polled_hwm_bytes=polled,
                wall_s=round(time.perf_counter() - t, 3))


def output_tail(path: str, lines: int = 3) -> str:
    """The last lines of a child's log on one line (for an error message)."""
    try:
        with open(path, errors="replace") as f:
            return " | ".join(x.strip() for x in f.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no output)"
