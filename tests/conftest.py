import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, torch.get_num_threads()))
# expert execution as users get it (the per-call choice) with the builtin cost model: no test depends on this
# machine's own calibration
os.environ.setdefault("VARBENCH_EXPERT_COST", "builtin")


@pytest.fixture
def tiny():
    """A random-weight d2 VAR + VQ-VAE bundle on the default's 7 scales (fast; quality meaningless)."""
    from bench.zoo import tiny_bundle
    return tiny_bundle()


@pytest.fixture(scope="session")
def classifier(tmp_path_factory):
    """A random-weight quality classifier for the tiny model's 32px images (fast feature extractor; quality values
    are not asserted, only compared between runs)."""
    from bench.checkpoints import save_state_dict
    from bench.models.classifier import ShapesClassifier
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cls") / "classifier.safetensors"
    save_state_dict(ShapesClassifier(num_classes=10, width=8, feature_dim=16, image_size=32).state_dict(), str(path))
    return str(path)


def run_cli(*args, cwd=None, env=None):
    """Run `python -m bench ...` in a subprocess; returns CompletedProcess (text)."""
    import subprocess
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "bench", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=e, timeout=900)


def pytest_configure(config):
    # headless-browser tests (chromium + chromedriver + selenium); skipped without them unless
    # VARBENCH_REQUIRE_BROWSER=1 (CI) makes that a failure
    config.addinivalue_line("markers", "browser: drives a headless Chromium; deselect with -m \"not browser\"")
