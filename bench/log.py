"""Messages and progress, the way researchers' tools do them: one `var_bench` logger hierarchy (stderr; `-v` /
`-q` on every command) and tqdm progress bars with ETA on a terminal, plain periodic lines elsewhere (CI logs).

    logger = get_logger(__name__)              # var_bench.<module>
    for batch in progress(batches, desc="generating", unit="batch"):
        ...
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

ROOT = "var_bench"
PLAIN_EVERY_S = 10.0           # without a terminal: one progress line at most this often (and at the end)
T = TypeVar("T")


def get_logger(module: str) -> logging.Logger:
    """The logger of a module: var_bench.<last part of its name> (bench.measure -> var_bench.measure)."""
    return logging.getLogger(f"{ROOT}.{module.rsplit('.', 1)[-1]}")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each message, not the one at setup: a process that swaps it (pytest's
    capture between in-process commands, a notebook) would otherwise log into a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbosity: int = 0, stream=None, prefix: str = "") -> None:
    """Console logging of the var_bench hierarchy: INFO by default, DEBUG at verbosity >= 1, WARNING at -1,
    ERROR at <= -2; `prefix` starts every line (a sweep trial's id in its worker). Replaces an earlier setup
    (commands may run several times in one process, as in tests)."""
    level = {1: logging.DEBUG, 0: logging.INFO, -1: logging.WARNING}.get(
        max(-2, min(1, verbosity)), logging.ERROR)
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        if getattr(h, "_var_bench", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(logging.Formatter(prefix + ("%(message)s" if level > logging.DEBUG else
                                                    "%(asctime)s %(name)s %(levelname)s: %(message)s")))
    handler._var_bench = True
    root.addHandler(handler)
    root.setLevel(level)


def _interactive() -> bool:
    return sys.stderr.isatty() and logging.getLogger(ROOT).isEnabledFor(logging.INFO)


def progress(iterable: Iterable[T], total: Optional[int] = None, desc: str = "", unit: str = "it",
             logger: Optional[logging.Logger] = None) -> Iterator[T]:
    """A tqdm bar with ETA on a terminal; otherwise INFO lines '<desc>: i/total (elapsed, ETA)' every
    PLAIN_EVERY_S seconds, and one at the end if the loop took longer than that (short loops stay silent)."""
    if total is None:
        try:
            total = len(iterable)   # type: ignore[arg-type]
        except TypeError:
            total = None
    if _interactive():
        from tqdm.auto import tqdm
        yield from tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
        return
    log = logger or logging.getLogger(ROOT)
    t0 = last = time.perf_counter()
    i = 0
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= PLAIN_EVERY_S or (total is not None and i == total and now - t0 >= PLAIN_EVERY_S):
            last = now
            eta = f", ETA {(now - t0) / i * (total - i):.0f} s" if total and i < total else ""
            log.info(f"{desc}: {i}/{total if total is not None else '?'} {unit} ({now - t0:.1f} s{eta})")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def counter_bar(total: int, desc: str, unit: str, initial: int = 0):
    """A bar advanced by hand (`bar.update()`), e.g. by callbacks; log lines print above it. Off the terminal it
    does nothing: the caller's own log lines say what finished."""
    if not _interactive():
        yield _NoBar()
        return
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm(loggers=[logging.getLogger(ROOT)]), \
            tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True) as bar:
        yield bar
