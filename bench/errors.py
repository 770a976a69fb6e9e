"""User-facing errors: the CLI prints one line and exits with status 2, having written nothing."""


class BenchError(Exception):
    """Bad input or a missing prerequisite. The message is one line naming the problem and the valid choices."""

    exit_code = 2


def choices_error(what: str, got, valid) -> BenchError:
    return BenchError(f"unknown {what} {got!r}; valid: {', '.join(map(str, valid))}")


class NonFiniteOutput(BenchError):
    """The model produced NaN/Inf (logits or decoded images): nothing computed from it may reach a row."""


class RowNotStored(BenchError):
    """A finished measurement whose row could not be written (e.g. the disk filled up): the row travels with the
    error as JSON so the caller can print or store it elsewhere; the measurement is not lost."""

    def __init__(self, message: str, row_json: str):
        super().__init__(message)
        self.row_json = row_json
