"""DMoE-VAR's model (../shared/METHODS.md §3-4): the pieces a run executes, and the real-image tokens its recipe
and Pruned-FFN's calibration read. Training: methods/_moe_recipe.py; artifact files: methods/_moe_artifacts.py;
the method and its prepare recipe: methods/dmoe.py.

  token_data(bundle, count)             real images -> multi-scale tokens (teacher forcing input)
  split_ffn(ffn, labels)                an FFN's neurons regrouped into equal experts (nn.Linear layout)
  Router                                Linear(C,128)-GELU-Linear(128,E)-abs: predicted norm of each expert's output
  ExpertFFN                             the MoE layer: dynk_max selection on chosen scales, dense elsewhere
  run_experts(x, mask, ...)             expert execution (methods/_experts.py: grouped or masked-dense)
  SwitchNet                             original weights before the first MoE scale (dense_weights=original)

FLOPs: an expert costs 2·C·e MACs per (token, selected expert) and a router C·128 + 128·E per token; fvcore sees
exactly these matmuls (the gathers/scatters are uncounted ops, and the oracle's norm pass is a custom op,
`varbench::oracle_expert_norms`, that fvcore lists as uncounted: excluded, as in the paper).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.data import data_identity, default_hflip_for, load_split, note_split
from bench.errors import BenchError
from bench.train import default_hflip, tokenize
from methods import _experts

ROUTER_WIDTH = 128


# ------------------------------------------------------------------------------------------------ data
_TOKEN_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def default_data(bundle) -> Optional[str]:
    """The model's own data: 'shapes' for the embedded/builtin models, the registered image folder of a user's
    model (its manifest), None for official weights."""
    ds = bundle.dataset or {}
    return "shapes" if ds.get("name") == "shapes" else ds.get("path")


def _is_own(data: Optional[str], own: Optional[str]) -> bool:
    """Is `data` the model's own data, however the folder is spelled (imgs/ vs /abs/path/imgs)?"""
    if data is None or own is None:
        return data == own
    return data == own or (data != "shapes" and own != "shapes" and os.path.realpath(data) == os.path.realpath(own))


def data_scope(bundle, data: Optional[str] = None) -> dict:
    """What artifact keys add for the data they were made from: {} for `shapes` on a `shapes` model and for a model
    without data of its own (the shipped artifacts keep their keys; an official model's data is in the artifact's
    metadata and checked on reuse), else {'data': the data identity} (a user's folder: its file-listing hash), so
    an artifact made from one data set is never found for another."""
    own = default_data(bundle)
    data = data or own
    if own is None or (data == "shapes" and own == "shapes"):
        return {}
    ds = bundle.dataset or {}
    own_data = _is_own(data, own)
    # mirrored copies change what an artifact is made from: named where they differ from the data's default
    # (a folder registered with mirroring), so the keys of the default cases stay as they were
    hflip = default_hflip(data, ds.get("hflip") if own_data else None)
    mirrored = {"hflip": hflip} if hflip != default_hflip_for(data) else {}
    if own_data and ds.get("data_id"):   # the registered identity: runs need no access to the folder
        return {"data": ds["data_id"], **mirrored}
    return {"data": data_identity(data), **mirrored}


# what token_data does with a count of images, in the words of the prepare flags that set one
MIRRORS = (" (doubled by mirrored copies only where the data is mirrored: shapes, or the model's own folder if it "
           "was trained with mirroring; an image folder is not)")


def token_data(bundle, count: int, split: str = "train", data: Optional[str] = None, seed: int = 0):
    """Tokens (list per scale, int16) and labels of a class-stratified sample of real images of a split
    (bench/data.py: held-out splits never overlap training), with mirrored copies (2·count rows) only where the
    model's data uses mirroring (recorded in its manifest; `shapes`: yes, image folders: no unless registered so)."""
    own = default_data(bundle)
    data = data or own
    if data is None:
        raise BenchError(f"model {bundle.name} has no dataset of its own; give --data <image folder> to `prepare`")
    ds = bundle.dataset or {}
    own_data = _is_own(data, own)
    hflip = default_hflip(data, ds.get("hflip") if own_data else None)
    partition = ds.get("partition") if own_data else None
    key = (bundle.model_id, data, split, count, seed, hflip, str(bundle.device))
    if key in _TOKEN_CACHE:
        _TOKEN_CACHE.move_to_end(key)
        note_split(_TOKEN_CACHE[key][1])
        return _TOKEN_CACHE[key][0]
    images, labels, _, rec = load_split(data, split, count, bundle.image_size, seed, partition)
    if own_data and ds.get("data_id") not in (None, rec.data_id):
        raise BenchError(f"the image folder {data} changed since model {bundle.name} was registered (identity "
                         f"{ds['data_id']} then, {rec.data_id} now); register it again")
    toks = tokenize(bundle.vqvae, images.to(bundle.device), hflip=hflip)
    out = ([t.to(bundle.device) for t in toks], (torch.cat((labels, labels)) if hflip else labels).to(bundle.device))
    _TOKEN_CACHE[key] = (out, rec)
    while len(_TOKEN_CACHE) > 3:
        _TOKEN_CACHE.popitem(last=False)
    return out


def teacher_forcing_input(vqvae, toks, labels, pick):
    idx = [t[pick].long() for t in toks]
    with torch.no_grad():
        x_in = vqvae.quantize.idx_to_var_input(idx)
    return labels[pick], x_in, torch.cat(idx, 1)


def drop_labels(labels, fraction: float, num_classes: int, gen: torch.Generator):
    """Replace a fraction of labels by the unconditional class: sampling runs both halves (CFG)."""
    if fraction <= 0:
        return labels
    drop = torch.rand(labels.shape[0], generator=gen).to(labels.device) < fraction
    return torch.where(drop, torch.full_like(labels, num_classes), labels)



def split_ffn(ffn, labels: torch.Tensor):
    """Expert weights of an FFN given a neuron -> expert assignment, in nn.Linear layout (the run_experts
    contract): w1 (E,e,C), b1 (E,e), w2 (E,C,e). Neurons keep their original order inside an expert."""
    labels = labels.to(ffn.fc1.weight.device)
    H, C = ffn.fc1.weight.shape
    E = int(labels.max()) + 1
    e = H // E
    perm = torch.argsort(labels, stable=True)
    w1 = ffn.fc1.weight.detach()[perm].reshape(E, e, C).contiguous()
    b1 = ffn.fc1.bias.detach()[perm].reshape(E, e).contiguous()
    w2 = ffn.fc2.weight.detach()[:, perm].reshape(C, E, e).permute(1, 0, 2).contiguous()
    return w1, b1, w2


def activation(name: str, h: torch.Tensor) -> torch.Tensor:
    return F.relu(h) if name == "relu" else F.gelu(h, approximate="tanh")


def run_experts(x2: torch.Tensor, mask: torch.Tensor, w1, b1, w2, act: str = "relu") -> torch.Tensor:
    """Σ over selected experts of expert_e(x) per token (no fc2 bias): methods/_experts.execute (grouped or
    masked-dense per its cost model), without the record of which path ran."""
    return _experts.execute(x2, mask, w1, b1, w2, act)[0]


@torch.library.custom_op("varbench::oracle_expert_norms", mutates_args=())
def oracle_expert_norms(x2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                        relu: bool) -> torch.Tensor:
    """True L2 norm of every expert's output (before fc2 bias), (T, E). A custom op so that fvcore lists it as
    uncounted: the oracle's extra pass is design exploration and excluded from FLOPs (as in the paper)."""
    out = torch.empty(x2.shape[0], w1.shape[0], device=x2.device, dtype=x2.dtype)
    for e in range(w1.shape[0]):
        h = activation("relu" if relu else "gelu_tanh", F.linear(x2, w1[e], b1[e]))
        out[:, e] = torch.mm(h, w2[e].t()).norm(dim=-1)
    return out


@oracle_expert_norms.register_fake
def _(x2, w1, b1, w2, relu):
    return x2.new_empty(x2.shape[0], w1.shape[0])


class Router(nn.Module):
    """Linear(C,128) -> GELU -> Linear(128,E) -> abs: predicted L2 norm of each expert's output."""

    def __init__(self, dim: int, num_experts: int, width: int = ROUTER_WIDTH):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, width), nn.Linear(width, num_experts)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x))).abs()

    def macs_per_token(self) -> int:
        return self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features


# ------------------------------------------------------------------------------------------------ MoE layer
class ExpertFFN(nn.Module):
    """An FFN replaced by experts on chosen scales (dynk_max), the unchanged FFN on the others.

    Selection per token: keep expert e iff r_e >= (1-τ_s)·max_j r_j (r = router prediction, or the true
    norms with oracle=True); the top expert is always kept. Statistics (reset with reset_stats): per scale the
    token count, selected (token, expert) pairs, and for the first `map_samples` conditional rows of the first
    call a pn×pn map of active experts per token."""

    def __init__(self, ffn, labels: torch.Tensor, router: Optional[Router], tau_by_scale: Dict[int, float],
                 oracle: bool = False, map_samples: int = 4):
        super().__init__()
        self.dense = ffn                       # shared parameters: the same model on dense scales
        w1, b1, w2 = split_ffn(ffn, labels)
        self.register_buffer("w1", w1, persistent=False)
        self.register_buffer("b1", b1, persistent=False)
        self.register_buffer("w2", w2, persistent=False)
        self.num_experts, self.expert_size, self.dim = w1.shape
        self.router = router
        self.tau_by_scale = dict(tau_by_scale)
        self.oracle = oracle
        self.map_samples = map_samples
        self.reset_stats()

    @property
    def act_name(self):
        return self.dense.act_name

    expert_execution_key = staticmethod(_experts.execution_key)   # bench/measure.generation_key

    def reset_stats(self):
        self.stats: Dict[int, dict] = {}

    def select(self, x2: torch.Tensor, tau: float) -> torch.Tensor:
        if self.oracle:
            r = oracle_expert_norms(x2, self.w1, self.b1, self.w2, self.act_name == "relu")
        else:
            r = self.router(x2)
        mask = r >= r.amax(dim=1, keepdim=True) * (1.0 - tau)
        return mask | F.one_hot(r.argmax(dim=1), r.shape[1]).bool()   # the top expert, even for NaN scores

    def forward(self, x, si: Optional[int] = None):
        if si is None or si not in self.tau_by_scale:
            return self.dense(x, si)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        mask = self.select(x2, self.tau_by_scale[si])
        out, ran = _experts.execute(x2, mask, self.w1, self.b1, self.w2, self.act_name)
        out = out + self.dense.fc2.bias
        self._record(si, mask, shape)
        _experts.record(self.stats[si], ran)
        return out.view(shape)

    @torch.no_grad()
    def _record(self, si: int, mask: torch.Tensor, shape):
        st = self.stats.get(si)
        active = mask.sum(1)
        if st is None:
            st = self.stats[si] = dict(tokens=0, pairs=0, map=None)
            rows, n = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
            pn = int(round(math.sqrt(n)))
            k = min(self.map_samples, rows // 2 if rows > 1 else rows)  # generate(): conditional rows come first
            if pn * pn == n and k > 0:
                st["map"] = active.view(rows, pn, pn)[:k].float().cpu()
        st["tokens"] += int(mask.shape[0])
        st["pairs"] += int(active.sum())

    def macs_per_token(self, si: int) -> float:
        """Recorded mean MACs per token of this layer at scale si (experts + router)."""
        st = self.stats.get(si)
        if not st or not st["tokens"]:
            raise BenchError(f"no recorded expert statistics at scale {si}; generate before counting FLOPs")
        router = 0 if self.oracle else self.router.macs_per_token()
        pairs = _experts.macs_pairs(st)     # routed, or inside counting_executed() what ran
        return pairs / st["tokens"] * 2 * self.dim * self.expert_size + router


class SwitchNet(nn.Module):
    """Scales before `switch` run `first` (e.g. the original GELU model), the rest run `second`; one shared list
    of KV caches, so the first model's keys/values feed the second (the reference code did this silently)."""

    def __init__(self, first, second, switch: int):
        super().__init__()
        self.first, self.second, self.switch = first, second, switch
        self.cfg, self.patch_nums, self.num_classes = second.cfg, second.patch_nums, second.num_classes
        self.V, self.C, self.L, self.begin_ends = second.V, second.C, second.L, second.begin_ends

    def new_caches(self):
        return self.second.new_caches()

    def scale_forward(self, si, x_in, label_B, caches):
        net = self.first if si < self.switch else self.second
        return net.scale_forward(si, x_in, label_B, caches)
