"""Peak memory of a generation batch.

    probe = PeakMemory(device)
    probe.start(); generate(...); peak = probe.stop()       # bytes; probe.kind says what was measured

- CUDA: `torch.cuda.max_memory_allocated` after resetting the peak (kind `cuda_max_allocated`; absolute,
  weights included).
- CPU (Linux): growth of the resident set during the batch. The kernel's high-water mark (VmHWM) is reset by
  writing 5 to /proc/self/clear_refs, so peak - resident-at-start is exact (kind `cpu_rss_growth_hwm`). Where
  that is not permitted, a thread samples VmRSS every millisecond (kind `cpu_rss_growth_sampled`, a lower bound).
- Elsewhere: None (kind `unavailable`).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    def __init__(self, device="cpu", sample_interval_s: float = 0.001):
        self.device = torch.device(device)
        self.interval = sample_interval_s
        if self.device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif _status_kb("VmRSS") is None:
            self.kind = "unavailable"
        elif _reset_hwm() and _status_kb("VmHWM") is not None:
            self.kind = "cpu_rss_growth_hwm"
        else:
            self.kind = "cpu_rss_growth_sampled"
        self._base = 0
        self._peak = 0
        self._thread = None
        self._stop = threading.Event()

    def start(self):
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_rss_growth_hwm":
            _reset_hwm()
            self._base = _status_kb("VmRSS") * 1024
        elif self.kind == "cpu_rss_growth_sampled":
            self._base = self._peak = _status_kb("VmRSS") * 1024
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self):
        while not self._stop.wait(self.interval):
            rss = _status_kb("VmRSS")
            if rss is not None:
                self._peak = max(self._peak, rss * 1024)

    def stop(self) -> Optional[int]:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "cpu_rss_growth_hwm":
            return max(0, _status_kb("VmHWM") * 1024 - self._base)
        if self.kind == "cpu_rss_growth_sampled":
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _status_kb("VmRSS") * 1024)
            return max(0, self._peak - self._base)
        return None


_LIBC = None
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameter numbers (malloc.h)
FIXED_MMAP_THRESHOLD = 32 << 20                   # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
FIXED_TRIM_THRESHOLD = 1 << 30


def _libc():
    """glibc through ctypes, or False where there is none."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_memory() -> bool:
    """Hand memory freed by the last batch back to the OS (glibc `malloc_trim(0)`). glibc keeps freed arenas for
    reuse, so without it a long run's resident set grows with N even though it holds nothing new (measured: 92 MB per
    1000 samples at the default). False where there is no glibc."""
    libc = _libc()
    return bool(libc) and bool(libc.malloc_trim(0))


def fix_allocator_thresholds(mmap_bytes: int = FIXED_MMAP_THRESHOLD, trim_bytes: int = FIXED_TRIM_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds for the rest of the process (mallopt; it turns off their dynamic
    adjustment). With the dynamic ones, whether a freed block is kept for reuse or handed back to the OS (and faulted
    in again at the next allocation) depends on the order of earlier frees, so two samplers doing the same work in one
    process paid different page faults (measured at d16: the release's decoder 245k-635k minor faults from rep to rep,
    ours 740k-790k); with fixed ones both keep blocks under 32 MB for reuse. Allocations over 32 MB are mmapped
    either way. False where there is no glibc (nothing changed)."""
    libc = _libc()
    return bool(libc) and bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_bytes))) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_bytes)))
