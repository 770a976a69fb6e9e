"""var-bench: benchmark & ablation harness for efficiency methods on Visual AutoRegressive (VAR) image models."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("var-bench")
    except PackageNotFoundError:   # run from a source tree that was not installed
        return "0+unknown"


__version__ = _version()
