"""User-facing errors: the CLI prints one line and exits with status 2, having written nothing."""


class BenchError(Exception):
    """Bad input or a missing prerequisite. The message is one line naming the problem and the valid choices."""

    exit_code = 2


def choices_error(what: str, got, valid) -> BenchError:
    return BenchError(f"unknown {what} {got!r}; valid: {', '.join(map(str, valid))}")
