"""The environment a result was measured in (every row carries it: machine, threads, versions, code)."""
from __future__ import annotations

import platform
import socket
import sys

import torch


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


def environment(device="cpu") -> dict:
    from bench.train import code_commit
    return dict(
        env_torch=torch.__version__,
        env_python=platform.python_version(),
        env_platform=platform.platform(),
        env_device_name=device_name(device),
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
