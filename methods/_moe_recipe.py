"""DMoE-VAR's training recipe (../shared/METHODS.md §3): ReLUfication + Hoyer fine-tuning, the balanced k-means
split of each FFN into experts, and one norm-regression router per block. The model they produce lives in
methods/_moe.py; the artifacts they are saved as in methods/_moe_artifacts.py; the settings (steps, seeds, lr...)
are declared once, in methods/dmoe.py's RECIPE.

  finetune_relu_hoyer(...)              CE + w·Hoyer over post-ReLU FFN activations
  balanced_kmeans(X, k, seed)           equal-size clusters of the L2-normalised fc1 rows (the experts)
  collect_router_data / train_routers   Router per layer, MSE on each expert's output L2 norm
  make_experts(...)                     the split and the routers of every block
"""
from __future__ import annotations

import copy
import time
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.log import get_logger
from bench.log import progress as progress_iter
from bench.train import lr_at
from methods import _moe
from methods._moe import Router, drop_labels, oracle_expert_norms, split_ffn, teacher_forcing_input

logger = get_logger("methods")

# Router training constants (not prepare flags; recorded in the experts artifact's metadata). uncond_fraction:
# share of teacher-forced rows given the unconditional label, as in CFG sampling (half the rows).
ROUTER_TRAINING = dict(batch=1024, lr=1e-3, max_tokens=131072, uncond_fraction=0.5)
FEATURE_BUDGET_BYTES = 1 << 30   # cap on cached router features (tokens are subsampled beyond it)


def log(msg: str) -> None:
    """Preparation progress (var_bench.methods logger)."""
    logger.info(f"{time.strftime('%H:%M:%S')} {msg}")


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
    t0 = time.time()
    toks, labels = _moe.token_data(bundle, images, "train", data)
    vtoks, vlabels = _moe.token_data(bundle, eval_images, "val", data)
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
        d2 = _squared_distances(X, centers)                                 # (n, k)
        rows, cols = linear_sum_assignment(np.repeat(d2, size, axis=1))    # slot j·size+s belongs to centroid j
        new = np.empty(n, dtype=np.int64)
        new[rows] = cols // size
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([X[labels == j].mean(0) for j in range(n_clusters)])
    inertia = float(sum(((X[labels == j] - centers[j]) ** 2).sum() for j in range(n_clusters)))
    return labels, dict(iterations=it, inertia=inertia, unbalanced_kmeans_inertia=float(km.inertia_))


def _squared_distances(X: np.ndarray, centers: np.ndarray, budget: int = 1 << 26) -> np.ndarray:
    """(n, k) squared distances, computed in row blocks whose (rows, k, C) difference stays within `budget` bytes
    (all at once it is n·k·C float64s: 4 GiB at d16 with 128 experts), with the same arithmetic as all at once."""
    n, C = X.shape
    step = max(1, budget // (8 * C * centers.shape[0]))
    return np.concatenate([((X[i:i + step, None, :] - centers[None, :, :]) ** 2).sum(-1) for i in range(0, n, step)])


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


def make_experts(ft_var, vqvae, expert_size: int, router_steps: int, seed: int, toks, labels, router_images: int,
                 progress: bool = True):
    """Balanced k-means split of every block's FFN + routers trained on teacher-forced data (`toks`, `labels`:
    the tokens of `router_images` images, recorded).

    Returns (labels per block, routers, metadata)."""
    rc = dict(ROUTER_TRAINING, images=router_images)
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
