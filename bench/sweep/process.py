"""A trial's process: what the trial and each of its generation workers set up before they generate, alike (the
sweep's modules, torch threads, the device Ray granted, the model, the method, the sampling settings). Both the
runner (bench/sweep/runner.py) and the workers (bench/sweep/workers.py) import it; it imports neither."""
from __future__ import annotations

import os
from typing import List

from bench.log import get_logger
from bench.registry import create_method
from bench.sweep.spec import import_modules
from bench.sweep.trials import load_bundle, sampling_for

logger = get_logger(__package__)    # var_bench.sweep: one logger for the whole package


def ray_gpu_ids() -> List[str]:
    """The GPUs Ray granted this worker ([] outside Ray, or with no GPU granted)."""
    try:
        import ray
        return [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else []
    except Exception:   # not in a Ray worker, or Ray without GPU support: nothing granted
        return []


def trial_device(device: str, granted_gpus: List[str]) -> str:
    """The torch device a trial measures on. Ray restricts a GPU trial's CUDA_VISIBLE_DEVICES to the GPU(s) it
    granted, renumbered from 0, so the trial uses cuda:0 of what it sees (an index in the spec named a GPU of the
    whole machine, which the worker cannot see as such); outside Ray (no grant) the spec's device as given."""
    if not device.startswith("cuda") or not granted_gpus:
        return device
    if device not in ("cuda", "cuda:0"):
        logger.info(f"device {device}: inside a Ray trial the granted GPU {granted_gpus[0]} is used (cuda:0 of "
                    f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
    return "cuda:0"


def trial_setup(job: dict):
    """The sweep's modules imported, the trial's thread count (job["config"]["threads"]), the device Ray granted;
    returns (device, bundle, method, sampling)."""
    import torch
    import_modules(job["modules"])
    threads = (job.get("config") or {}).get("threads")
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    device = trial_device(job["device"], ray_gpu_ids())
    if torch.device(device).type == "cuda" and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))   # CUDA events and synchronize (bench/timing.py) use it
    bundle = load_bundle(job["model"], device)
    return device, bundle, create_method(job["method"], **job["params"]), sampling_for(job["spec_sampling"], bundle)
