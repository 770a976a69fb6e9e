"""Expert machinery shared by DMoE-VAR (methods/dmoe.py) and Pruned-FFN (methods/pruned_ffn.py).

../shared/METHODS.md §3-4. The pieces, in pipeline order:

  token_data(bundle, count)             real images -> multi-scale tokens (teacher forcing input)
  relufied_copy(var)                    FFN GELU -> ReLU (adaLN SiLU untouched)
  finetune_relu_hoyer(...)              CE + w·Hoyer over post-ReLU FFN activations
  balanced_kmeans(X, k, seed)           equal-size clusters of the L2-normalised fc1 rows (the experts)
  train_routers(...)                    Router per layer, MSE on each expert's output L2 norm
  ExpertFFN                             the MoE layer: dynk_max selection on chosen scales, dense elsewhere
  run_experts(x, mask, ...)             expert execution (methods/_experts.py: grouped or masked-dense)
  SwitchNet                             original weights before the first MoE scale (dense_weights=original)
  finetune_key / experts_key / ensure_artifact / load_finetuned_var   prepared-artifact plumbing

FLOPs: an expert costs 2·C·e MACs per (token, selected expert) and a router C·128 + 128·E per token; fvcore sees
exactly these matmuls (the gathers/scatters are uncounted ops, and the oracle's norm pass is a custom op,
`varbench::oracle_expert_norms`, that fvcore lists as uncounted: excluded, as in the paper).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import uuid
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import BenchError
from bench.log import get_logger
from bench.log import progress as progress_iter
from methods import _experts

logger = get_logger("methods")

ROUTER_WIDTH = 128
# Fine-tune recipe (the paper: Adam, wd 0.05, clip 1.0, warm-up then decay; ~0.2 epoch suffices). Sized so the
# embedded default fine-tunes in a few CPU minutes. Only hoyer_weight/steps/seed identify an artifact; the rest
# is recorded in its metadata (prepare refuses to silently reuse an artifact made with another recipe).
FINETUNE_DEFAULTS = dict(hoyer_weight=1e-4, steps=300, batch=32, lr=2e-4, images=2000, eval_images=128, seed=0)
# uncond_fraction: share of teacher-forced rows given the unconditional label, as in CFG sampling (half the rows)
ROUTER_DEFAULTS = dict(steps=500, batch=1024, lr=1e-3, images=256, max_tokens=131072, uncond_fraction=0.5)
CALIB_DEFAULTS = dict(images=256)
FEATURE_BUDGET_BYTES = 1 << 30   # cap on cached router features (tokens are subsampled beyond it)
RECIPE_VERSION = 1


def log(msg: str) -> None:
    """Preparation progress (var_bench.methods logger)."""
    logger.info(f"{time.strftime('%H:%M:%S')} {msg}")


# ------------------------------------------------------------------------------------------------ data
_TOKEN_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def default_data(bundle) -> Optional[str]:
    """'shapes' for the embedded/builtin models (their procedural dataset); None for official weights."""
    ds = bundle.dataset or {}
    return "shapes" if ds.get("name") == "shapes" else None


def token_data(bundle, count: int, split: str = "train", data: Optional[str] = None):
    """Tokens (list per scale, int16, with mirrored copies: 2·count rows) and labels of real images."""
    from bench.train import load_images, tokenize
    data = data or default_data(bundle)
    if data is None:
        raise BenchError(f"model {bundle.name} has no built-in dataset; give --data <image folder> to `prepare`")
    key = (bundle.model_id, data, split, count, str(bundle.device))
    if key in _TOKEN_CACHE:
        _TOKEN_CACHE.move_to_end(key)
        return _TOKEN_CACHE[key]
    images, labels, _ = load_images(data, count, bundle.image_size, split=split)
    toks = tokenize(bundle.vqvae, images.to(bundle.device))
    out = ([t.to(bundle.device) for t in toks], torch.cat((labels, labels)).to(bundle.device))
    _TOKEN_CACHE[key] = out
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


# ------------------------------------------------------------------------------------------------ ReLUfication
def relufied_copy(var):
    """A deep copy of the VAR whose FFNs use ReLU (only the FFN activation changes)."""
    model = copy.deepcopy(var)
    for blk in model.blocks:
        blk.ffn.act_name = "relu"
    return model


def hoyer(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Hoyer sparsity ‖a‖₁²/‖a‖₂² over the last (hidden) dim, mean over tokens."""
    a = a.reshape(-1, a.shape[-1])
    return (a.abs().sum(-1).pow(2) / (a.pow(2).sum(-1) + eps)).mean()


class FFNActivations:
    """Context manager: post-activation FFN hidden states of every block (list, one per block, per forward)."""

    def __init__(self, var, detach: bool = False):
        self.var, self.detach, self.acts, self.handles = var, detach, [], []

    def __enter__(self):
        for blk in self.var.blocks:
            ffn = blk.ffn

            def hook(mod, inp, out, ffn=ffn):
                a = ffn.act(out)
                self.acts.append(a.detach() if self.detach else a)
            self.handles.append(ffn.fc1.register_forward_hook(hook))
        return self

    def clear(self):
        self.acts = []

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def evaluate_ffn(var, vqvae, toks, labels, batch: int = 64) -> dict:
    """CE, Hoyer and exact-zero fraction of the FFN activations (overall and per scale) on teacher-forced data."""
    var.eval()
    n = labels.shape[0]
    S = len(var.patch_nums)
    ce_sum, tok_count, hoy_sum, hoy_n = 0.0, 0, 0.0, 0
    zeros_scale, count_scale = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
    with FFNActivations(var, detach=True) as cap:
        for i in range(0, n, batch):
            pick = torch.arange(i, min(n, i + batch), device=labels.device)
            lab, x_in, gt = teacher_forcing_input(vqvae, toks, labels, pick)
            cap.clear()
            logits = var(lab, x_in)
            ce_sum += F.cross_entropy(logits.reshape(-1, var.V), gt.reshape(-1), reduction="sum").item()
            tok_count += gt.numel()
            for a in cap.acts:
                hoy_sum += hoyer(a).item() * len(pick)
                hoy_n += len(pick)
                z = (a == 0)
                for si, (bg, ed) in enumerate(var.begin_ends):
                    zeros_scale[si] += z[:, bg:ed].sum().item()
                    count_scale[si] += z[:, bg:ed].numel()
    per_scale = (zeros_scale / count_scale.clamp_min(1)).tolist()
    return dict(ce=ce_sum / tok_count, hoyer=hoy_sum / max(1, hoy_n),
                zero_fraction=float(zeros_scale.sum() / count_scale.sum()),
                zero_fraction_per_scale=[round(z, 5) for z in per_scale])


def finetune_relu_hoyer(bundle, steps: int, hoyer_weight: float, batch: int, lr: float, seed: int,
                        images: int, eval_images: int, data: Optional[str] = None, progress: bool = True):
    """ReLUfy bundle.var and fine-tune all its weights with CE + hoyer_weight·Hoyer (mean over layers).

    Returns (model, metadata dict with losses/sparsity before and after)."""
    from bench.train import lr_at
    t0 = time.time()
    toks, labels = token_data(bundle, images, "train", data)
    vtoks, vlabels = token_data(bundle, eval_images, "val", data)
    before = evaluate_ffn(bundle.var, bundle.vqvae, vtoks, vlabels)
    model = relufied_copy(bundle.var).float().requires_grad_(True)
    zero_shot = evaluate_ffn(model, bundle.vqvae, vtoks, vlabels)
    history = []
    cuda = [bundle.device.index or 0] if bundle.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
        model.train()  # also turns on the release's label dropout (unconditional rows for CFG)
        t_train = time.time()
        with FFNActivations(model) as cap:
            for step in (progress_iter(range(steps), desc="dmoe fine-tune", unit="step", logger=logger)
                         if progress else range(steps)):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 10))
                pick = torch.randint(0, labels.shape[0], (batch,), generator=gen).to(labels.device)
                lab, x_in, gt = teacher_forcing_input(bundle.vqvae, toks, labels, pick)
                cap.clear()
                logits = model(lab, x_in)
                ce = F.cross_entropy(logits.reshape(-1, model.V), gt.reshape(-1))
                hoy = torch.stack([hoyer(a) for a in cap.acts]).mean()
                loss = ce + hoyer_weight * hoy
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
                    history.append(dict(step=step + 1, ce=round(ce.item(), 5), hoyer=round(hoy.item(), 3)))
                    if progress:
                        log(f"dmoe fine-tune step {step + 1}/{steps} ce {ce.item():.4f} hoyer {hoy.item():.2f} "
                            f"({(time.time() - t_train) / (step + 1):.2f}s/step)")
        cap.clear()
        t_done = time.time()
    model.eval()
    # the artifact stores float16 (small, shippable): use exactly what will be loaded from now on
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    after = evaluate_ffn(model, bundle.vqvae, vtoks, vlabels)
    meta = dict(original_gelu=before, relu_zero_shot=zero_shot, finetuned=after, history=history,
                train_rows=int(labels.shape[0]), eval_rows=int(vlabels.shape[0]),
                train_seconds=round(t_done - t_train, 2), seconds=round(time.time() - t0, 2))
    return model, meta


# ------------------------------------------------------------------------------------------------ experts
def balanced_kmeans(X: np.ndarray, n_clusters: int, seed: int = 0, iters: int = 10) -> Tuple[np.ndarray, dict]:
    """Equal-size clustering: k-means (scikit-learn) centroids, then repeated balanced assignment.

    Each centroid gets exactly n/k slots; the assignment minimising the total squared distance is an exact
    linear assignment (scipy), alternated with centroid updates until it no longer changes. Deterministic
    given the seed. Returns labels (n,) int64 in [0, k) and diagnostics."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans
    n = X.shape[0]
    if n_clusters < 1 or n % n_clusters:
        raise BenchError(f"cannot split {n} neurons into {n_clusters} equal clusters")
    size = n // n_clusters
    X = np.asarray(X, dtype=np.float64)
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64), dict(iterations=0, inertia=float(((X - X.mean(0)) ** 2).sum()))
    km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit(X)
    centers = km.cluster_centers_
    labels = None
    it = 0
    for it in range(1, iters + 1):
        d2 = ((X[:, None, :] - centers[None, :, :]) ** 2).sum(-1)          # (n, k)
        rows, cols = linear_sum_assignment(np.repeat(d2, size, axis=1))    # slot j·size+s belongs to centroid j
        new = np.empty(n, dtype=np.int64)
        new[rows] = cols // size
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([X[labels == j].mean(0) for j in range(n_clusters)])
    inertia = float(sum(((X[labels == j] - centers[j]) ** 2).sum() for j in range(n_clusters)))
    return labels, dict(iterations=it, inertia=inertia, unbalanced_kmeans_inertia=float(km.inertia_))


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


@torch.no_grad()
def expert_norms(ffn, labels: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Router targets: L2 norm of each expert's output (before fc2 bias), (T, E)."""
    w1, b1, w2 = split_ffn(ffn, labels)
    return oracle_expert_norms(x2, w1, b1, w2, ffn.act_name == "relu")


@torch.no_grad()
def collect_router_data(var, vqvae, toks, labels, all_labels: List[torch.Tensor], max_tokens: int,
                        uncond_fraction: float, seed: int, batch: int = 32):
    """FFN inputs and expert-norm targets of every block over a teacher-forced pass of all scales.

    Tokens are subsampled uniformly (same positions for every block) when more than max_tokens."""
    var.eval()
    n = labels.shape[0]
    total = n * var.L
    keep_p = min(1.0, max_tokens / total)
    gen = torch.Generator().manual_seed(seed)
    xs = [[] for _ in var.blocks]
    ys = [[] for _ in var.blocks]
    captured = {}
    handles = [blk.ffn.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
               for i, blk in enumerate(var.blocks)]
    try:
        for i in range(0, n, batch):
            pick = torch.arange(i, min(n, i + batch), device=labels.device)
            lab, x_in, _ = teacher_forcing_input(vqvae, toks, labels, pick)
            lab = drop_labels(lab, uncond_fraction, var.num_classes, gen)
            captured.clear()
            var(lab, x_in)
            rows = len(pick) * var.L
            sel = None
            if keep_p < 1:
                sel = (torch.rand(rows, generator=gen) < keep_p).nonzero().squeeze(1).to(labels.device)
            for li, blk in enumerate(var.blocks):
                x2 = captured[li].reshape(rows, -1)
                if sel is not None:
                    x2 = x2.index_select(0, sel)
                xs[li].append(x2)
                ys[li].append(expert_norms(blk.ffn, all_labels[li], x2))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in xs], [torch.cat(y) for y in ys]


def train_routers(xs: List[torch.Tensor], ys: List[torch.Tensor], steps: int, batch: int, lr: float, seed: int,
                  val_fraction: float = 0.1, progress: bool = True):
    """One Router per block, MSE on the expert norms. Returns (routers, metadata with val MSE before/after)."""
    from bench.train import lr_at
    routers, meta_layers = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for li, (x, y) in enumerate(zip(xs, ys)):
            gen = torch.Generator().manual_seed(seed + 1000 * li)
            n = x.shape[0]
            order = torch.randperm(n, generator=gen).to(x.device)
            n_val = max(1, int(n * val_fraction)) if n > 1 else 0
            val, tr = order[:n_val], order[n_val:] if n > 1 else order
            r = Router(x.shape[1], y.shape[1]).to(x.device)
            opt = torch.optim.Adam(r.parameters(), lr=lr)

            def val_loss():
                with torch.no_grad():
                    idx = val if n_val else tr
                    return F.mse_loss(r(x[idx]), y[idx]).item()
            before = val_loss()
            for step in (progress_iter(range(steps), desc=f"router block {li}", unit="step", logger=logger)
                         if progress else range(steps)):
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
                b = tr[torch.randint(0, tr.shape[0], (min(batch, tr.shape[0]),), generator=gen).to(x.device)]
                loss = F.mse_loss(r(x[b]), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            after = val_loss()
            r.eval().requires_grad_(False)
            routers.append(r)
            meta_layers.append(dict(val_mse_before=before, val_mse_after=after, target_mean=float(y.mean()),
                                    tokens=int(n)))
            if progress:
                log(f"router block {li}: val MSE {before:.5f} -> {after:.5f} ({n} tokens)")
    return routers, dict(layers=meta_layers, val_mse_before=float(np.mean([m["val_mse_before"] for m in meta_layers])),
                         val_mse_after=float(np.mean([m["val_mse_after"] for m in meta_layers])))


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
        pairs = st.get("pairs_run", st["pairs"])     # what ran: masked-dense calls run every expert
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


# ------------------------------------------------------------------------------------------------ artifacts
def finetune_key(hoyer_weight: float, steps: int, seed: int) -> dict:
    return dict(recipe=RECIPE_VERSION, hoyer_weight=float(hoyer_weight), steps=int(steps), seed=int(seed))


def experts_key(ft_key: dict, expert_size: int, router_steps: int, seed: int) -> dict:
    return dict(finetune=ft_key, expert_size=int(expert_size), router_steps=int(router_steps), seed=int(seed),
                router_width=ROUTER_WIDTH)


def prepare_command(bundle, method: str, extra: str) -> str:
    if bundle.source == "official":
        model = f"--var-ckpt {bundle.files.get('var', 'VAR.pth')} --vae-ckpt {bundle.files.get('vqvae', 'VAE.pth')}"
    else:
        model = f"--model {bundle.name}"
    return f"python -m bench prepare {method} {model} {extra}".strip()


def write_artifact(kind: str, model_id: str, key: dict, out_root: Optional[str], write_files: Callable[[str], dict],
                   force: bool = False) -> str:
    """Write an artifact directory atomically: files go to a temp dir, DONE last, then one rename.

    write_files(tmp_dir) writes the files and returns the metadata (saved as meta.json). If the directory
    appeared meanwhile (a parallel trial), the existing one wins unless force."""
    from bench.artifacts import artifact_dir_for_writing, mark_done
    from bench.atomic import atomic_write_text
    from bench.checkpoints import file_sha256
    final = artifact_dir_for_writing(kind, model_id, key, out_root)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    os.makedirs(tmp)
    try:
        meta = write_files(tmp)
        meta = dict(kind=kind, model_id=model_id, key=key, **meta)
        atomic_write_text(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1, default=str))
        files = {f: file_sha256(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        mark_done(tmp, dict(kind=kind, key=key, files=files))
        if os.path.isdir(final):
            if not force:
                shutil.rmtree(tmp)
                return final
            trash = f"{final}.old-{uuid.uuid4().hex[:6]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(tmp, final)
            except OSError:  # lost a race to a parallel writer: theirs is complete (DONE was written first)
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, "meta.json")) as f:
        return json.load(f)


_FT_CACHE: "OrderedDict[tuple, nn.Module]" = OrderedDict()


def load_finetuned_var(bundle, directory: str):
    """The fine-tuned ReLU VAR of an artifact, on the bundle's device (cached per process; never modified)."""
    from bench.checkpoints import check_compatible, read_state_dict
    from bench.models.var import VAR
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
    from bench.checkpoints import save_state_dict
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    save_state_dict(sd, os.path.join(directory, "var.safetensors"))
    return meta


def make_experts(ft_var, vqvae, expert_size: int, router_steps: int, seed: int, toks, labels,
                 progress: bool = True, router_cfg: Optional[dict] = None):
    """Balanced k-means split of every block's FFN + routers trained on teacher-forced data.

    Returns (labels per block, routers, metadata)."""
    rc = dict(ROUTER_DEFAULTS, **(router_cfg or {}))
    t0 = time.time()
    all_labels, split_meta = [], []
    for blk in ft_var.blocks:
        w = F.normalize(blk.ffn.fc1.weight.detach().float(), dim=1).cpu().numpy()
        lab, info = balanced_kmeans(w, w.shape[0] // expert_size, seed)
        all_labels.append(torch.from_numpy(lab).to(blk.ffn.fc1.weight.device))
        split_meta.append(info)
    t_split = time.time() - t0
    C, depth = ft_var.C, len(ft_var.blocks)
    E = ft_var.blocks[0].ffn.fc1.out_features // expert_size
    max_tokens = min(rc["max_tokens"], FEATURE_BUDGET_BYTES // (4 * depth * (C + E)))
    xs, ys = collect_router_data(ft_var, vqvae, toks, labels, all_labels, max_tokens, rc["uncond_fraction"], seed)
    routers, rmeta = train_routers(xs, ys, router_steps, rc["batch"], rc["lr"], seed, progress=progress)
    meta = dict(split=split_meta, router=rmeta, num_experts=E, expert_size=expert_size,
                router_recipe=dict(rc, steps=router_steps), split_seconds=round(t_split, 2),
                seconds=round(time.time() - t0, 2))
    return all_labels, routers, meta


def save_experts(all_labels, routers, directory: str) -> None:
    from bench.checkpoints import save_state_dict
    sd = {}
    for i, (lab, r) in enumerate(zip(all_labels, routers)):
        sd[f"blocks.{i}.labels"] = lab.long().cpu()
        for k, v in r.state_dict().items():
            sd[f"blocks.{i}.router.{k}"] = v.float().cpu()
    save_state_dict(sd, os.path.join(directory, "experts.safetensors"))


def load_experts(directory: str, ft_var, device):
    """(labels per block, routers) of an experts artifact, checked against the model."""
    from bench.checkpoints import read_state_dict
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
