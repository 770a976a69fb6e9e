"""ActVAR's artifact files (kind 'actvar'; the directory itself: bench/artifacts.py): gates.safetensors (router /
selector per block, float32) and weights.safetensors (stage 2's tensors in float16; absent when stage 2 was
skipped: the loaded model's own weights are used), checked against the model on load."""
from __future__ import annotations

import copy
import os
import re
from collections import OrderedDict
from typing import List

import torch.nn as nn

from bench.checkpoints import read_state_dict, save_state_dict
from bench.errors import BenchError

_LOADED: "OrderedDict[tuple, tuple]" = OrderedDict()
TRAINED = re.compile(r"^(blocks\.\d+\.(attn|ffn)\.|head\.|head_nm\.)")


def trained_names(var) -> List[str]:
    """Stage 2's trainable tensors in VAR naming: attention, FFN (the experts), head."""
    return [n for n, _ in var.named_parameters() if TRAINED.match(n)]


def load_artifact(bundle, directory: str, parts: str):
    """(base VAR, routers, selectors) of an artifact; base is bundle.var when stage 2 was skipped. Cached."""
    done = os.path.join(directory, "DONE")
    key = (os.path.realpath(directory), os.path.getmtime(done) if os.path.exists(done) else 0, str(bundle.device),
           bundle.model_id)
    if key in _LOADED:
        _LOADED.move_to_end(key)
        return _LOADED[key]
    var = bundle.var
    C, depth, H = var.C, len(var.blocks), var.blocks[0].ffn.fc1.out_features
    gates = read_state_dict(os.path.join(directory, "gates.safetensors"), "ActVAR gates")
    routers = selectors = None

    def linear(prefix, i):
        w, b = gates.get(f"blocks.{i}.{prefix}.weight"), gates.get(f"blocks.{i}.{prefix}.bias")
        if w is None or b is None or w.shape[1] != C:
            raise BenchError(f"ActVAR artifact {directory} does not match the model (block {i} {prefix}); "
                             f"re-run prepare")
        m = nn.Linear(C, w.shape[0])
        m.load_state_dict(dict(weight=w.float(), bias=b.float()))
        return m.to(bundle.device).eval().requires_grad_(False)
    if parts in ("both", "experts"):
        routers = [linear("router", i) for i in range(depth)]
        if H % routers[0].out_features:
            raise BenchError(f"ActVAR artifact {directory}: {routers[0].out_features} experts do not divide the FFN "
                             f"width {H}; re-run prepare")
    if parts in ("both", "tokens"):
        selectors = [linear("selector", i) for i in range(depth)]
    wpath = os.path.join(directory, "weights.safetensors")
    if os.path.isfile(wpath):
        sd = read_state_dict(wpath, "ActVAR fine-tuned weights")
        want = set(trained_names(var))
        own = dict(var.named_parameters())
        bad = sorted(set(sd) ^ want) + [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            raise BenchError(f"ActVAR weights {wpath} do not match the model {bundle.name} (e.g. {bad[0]}); "
                             f"re-run prepare")
        var = copy.deepcopy(bundle.var)
        var.load_state_dict(sd, strict=False)            # float16 on disk, the model's dtype in memory
        var = var.eval().requires_grad_(False)
    out = (var, routers, selectors)
    _LOADED[key] = out
    while len(_LOADED) > 3:
        _LOADED.popitem(last=False)
    return out



def save_artifact(result: dict, directory: str) -> None:
    sd = {}
    for name, ms in (("router", result["routers"]), ("selector", result["selectors"])):
        for i, m in enumerate(ms or []):
            for k, v in m.state_dict().items():
                sd[f"blocks.{i}.{name}.{k}"] = v.float().cpu()
    save_state_dict(sd, os.path.join(directory, "gates.safetensors"))
    if result["weights"]:
        save_state_dict(result["weights"], os.path.join(directory, "weights.safetensors"))
