"""var-bench: benchmark & ablation harness for efficiency methods on Visual AutoRegressive (VAR) image models."""
import importlib.machinery
import os
import sys

# Our other top-level packages live beside this one. `python -m bench` puts the working directory first on sys.path,
# and a folder there with one of their names (`report` writes ./reports/out by default; a user keeps YAMLs in
# ./sweeps/) would be imported as an empty namespace package in their place; so they are always found here.
OWN_PACKAGES = ("methods", "reports", "sweeps")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _OwnPackages:   # a meta path finder (not importlib.abc.MetaPathFinder: importing that costs ~8 ms per CLI call)
    def find_spec(self, name, path=None, target=None):
        if name in OWN_PACKAGES:
            return importlib.machinery.PathFinder.find_spec(name, [_ROOT])
        return None


if not any(isinstance(f, _OwnPackages) for f in sys.meta_path):
    sys.meta_path.insert(0, _OwnPackages())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("var-bench")
    except PackageNotFoundError:   # run from a source tree that was not installed
        return "0+unknown"


def __getattr__(name):
    """`bench.__version__`, read from the installed metadata (importlib.metadata: some 15 ms) when first asked for,
    so that `python -m bench --help` does not pay for it."""
    if name == "__version__":
        globals()["__version__"] = v = _version()
        return v
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
