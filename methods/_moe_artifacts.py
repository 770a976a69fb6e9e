"""DMoE-VAR's artifact files (the directories themselves: bench/artifacts.py): the fine-tuned ReLU VAR
(`dmoe-finetune`, var.safetensors in float16) and the expert split + routers (`dmoe-experts`,
experts.safetensors), each checked against the model on load."""
from __future__ import annotations

import os
from collections import OrderedDict

import torch.nn as nn

from bench.checkpoints import check_compatible, read_state_dict, save_state_dict
from bench.errors import BenchError
from bench.models.var import VAR
from methods._moe import Router

_FT_CACHE: "OrderedDict[tuple, nn.Module]" = OrderedDict()


def load_finetuned_var(bundle, directory: str):
    """The fine-tuned ReLU VAR of an artifact, on the bundle's device (cached per process; never modified)."""
    key = (os.path.realpath(directory), str(bundle.device), bundle.model_id)
    if key in _FT_CACHE:
        _FT_CACHE.move_to_end(key)
        return _FT_CACHE[key]
    path = os.path.join(directory, "var.safetensors")
    sd = read_state_dict(path, "fine-tuned VAR")
    model = VAR(bundle.var.cfg)
    check_compatible(model, sd, f"fine-tuned VAR {path}", f"the model {bundle.name}")
    model.load_state_dict(sd, strict=True)   # float16 on disk, float32 parameters
    for blk in model.blocks:
        blk.ffn.act_name = "relu"
    model = model.to(bundle.device).eval().requires_grad_(False)
    _FT_CACHE[key] = model
    while len(_FT_CACHE) > 2:
        _FT_CACHE.popitem(last=False)
    return model


def save_finetune(model, meta: dict, directory: str) -> dict:
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    save_state_dict(sd, os.path.join(directory, "var.safetensors"))
    return meta



def save_experts(all_labels, routers, directory: str) -> None:
    sd = {}
    for i, (lab, r) in enumerate(zip(all_labels, routers)):
        sd[f"blocks.{i}.labels"] = lab.long().cpu()
        for k, v in r.state_dict().items():
            sd[f"blocks.{i}.router.{k}"] = v.float().cpu()
    save_state_dict(sd, os.path.join(directory, "experts.safetensors"))


def load_experts(directory: str, ft_var, device):
    """(labels per block, routers) of an experts artifact, checked against the model."""
    path = os.path.join(directory, "experts.safetensors")
    sd = read_state_dict(path, "expert split")
    labels, routers = [], []
    for i, blk in enumerate(ft_var.blocks):
        lab = sd.get(f"blocks.{i}.labels")
        H = blk.ffn.fc1.out_features
        if lab is None or lab.shape != (H,):
            raise BenchError(f"expert split {path} does not match the model (block {i}, FFN width {H}); re-run prepare")
        E = int(lab.max()) + 1
        r = Router(ft_var.C, E)
        r.load_state_dict({k: sd[f"blocks.{i}.router.{k}"] for k in r.state_dict()})
        labels.append(lab.to(device))
        routers.append(r.to(device).eval().requires_grad_(False))
    return labels, routers
