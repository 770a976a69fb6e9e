import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))
# expert execution on one fixed path (today's grouped one): no test depends on this machine's cost calibration
os.environ.setdefault("VARBENCH_EXPERT_PATH", "grouped")


@pytest.fixture
def tiny():
    """A random-weight d2 VAR + VQ-VAE bundle on the default's 7 scales (fast; quality meaningless)."""
    from bench.zoo import tiny_bundle
    return tiny_bundle()


def run_cli(*args, cwd=None, env=None):
    """Run `python -m bench ...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=e, timeout=900)
