"""bench.log: one var_bench logger hierarchy with -v/-q on every command, and progress that stays readable in CI."""
import io
import logging

from bench import log as L


def test_levels_and_prefix():
    s = io.StringIO()
    logger = L.get_logger("bench.measure")
    assert logger.name == "var_bench.measure"
    L.setup_logging(-1, stream=s)
    logger.info("hidden")
    logger.warning("shown")
    L.setup_logging(0, stream=s, prefix="[t1] ")
    logger.info("info line")
    logger.debug("no debug")
    L.setup_logging(1, stream=s)
    logger.debug("debug line")
    out = s.getvalue()
    assert "hidden" not in out and "shown" in out and "[t1] info line" in out and "no debug" not in out
    assert "var_bench.measure DEBUG: debug line" in out
    assert len([h for h in logging.getLogger("var_bench").handlers if getattr(h, "_var_bench", False)]) == 1
    L.setup_logging(0)


def test_progress_without_a_terminal_is_plain_lines(monkeypatch):
    s = io.StringIO()
    L.setup_logging(0, stream=s)
    monkeypatch.setattr(L, "PLAIN_EVERY_S", 0.0)
    assert list(L.progress(range(3), desc="generating", unit="batch")) == [0, 1, 2]
    lines = s.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == [f"generating: {i}/3 batch" for i in (1, 2, 3)]
    assert "\r" not in s.getvalue() and "ETA" in lines[0]
    s.truncate(0)
    monkeypatch.setattr(L, "PLAIN_EVERY_S", 3600.0)
    assert list(L.progress(iter(range(4)), desc="quick")) == [0, 1, 2, 3]
    assert s.getvalue() == ""                                   # a short loop says nothing
    with L.counter_bar(5, "sweep", "trial") as bar:             # off the terminal: a no-op
        bar.update(1)
    L.setup_logging(0)


def test_every_command_takes_verbosity_flags():
    from bench.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) >= 10
    for name, p in [("(top)", parser), *sub.choices.items()]:
        opts = p._option_string_actions
        assert {"-v", "--verbose", "-q", "--quiet"} <= set(opts), name


def test_console_logging_follows_the_current_stderr(monkeypatch):
    """Set up while one stderr is current, a message after it was swapped goes to the new one (pytest's capture
    swaps it between in-process commands; the old stream is closed by then)."""
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    L.setup_logging(0)
    monkeypatch.setattr("sys.stderr", second)
    first.close()
    L.get_logger("bench.measure").warning("after the swap")
    assert second.getvalue() == "after the swap\n"
