"""The environment a result was measured in (every row carries it: machine, threads, versions, code)."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys

import torch

import bench
from bench.errors import BenchError


def check_device(device: str) -> str:
    """The device string if this machine has it, else one line (BenchError) with the valid choices."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device {device!r} is not available here; valid: cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise BenchError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N")
    return device


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cuda_visible_devices(device):
    """CUDA_VISIBLE_DEVICES as this process sees it on a cuda device (Ray sets it per trial), None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def code_commit() -> str:
    """The git commit of this source tree (+ '-dirty' with uncommitted changes to tracked files), or 'unknown'."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment(device="cpu") -> dict:
    return dict(
        env_harness=bench.__version__,
        env_torch=torch.__version__,
        env_torch_fidelity=package_version("torch-fidelity"),
        env_fvcore=package_version("fvcore"),
        env_ray=package_version("ray"),
        env_python=platform.python_version(),
        env_platform=platform.platform(),
        env_device_name=device_name(device),
        env_cuda_visible_devices=cuda_visible_devices(device),
        env_threads=int(torch.get_num_threads()),
        env_code_commit=code_commit(),
        env_host=socket.gethostname(),
    )


def describe(env: dict, device) -> str:
    """One line for benchmark output."""
    return (f"{env['env_device_name']} ({device}), {env['env_threads']} threads, torch {env['env_torch']}, "
            f"python {env['env_python']}, {env['env_host']}")


if __name__ == "__main__":  # pragma: no cover
    print(environment(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
