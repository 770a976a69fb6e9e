"""SkipVAR's decision models (arXiv 2506.08908; release fakerone-li/SkipVAR): the features, the labels and the fit.

    decision_features(old, new, vqvae)   (B, 3): HF_diff, FFT high-frequency share of the new image, HF_diff relative
                                         to the new image's mean gradient (the threshold rule's `diff`), from two
                                         latent maps on one grid, decoded to pixels as the release does
    collect(bundle, ...)                 the harness's own samples: features at the decision, and per outcome
                                         (skip k / uncond k) the SSIM of each image to the dense image of its seed
    fit(samples, target)                 two scikit-learn logistic regressions (StandardScaler first, as the
                                         release's `*_scaler.pkl` + `*_Logistic_Regression.pkl`), as plain numbers
    predict(model, X)                    the class a stored model picks (numpy; no scikit-learn, no pickle)

A stored model is a JSON dict: classes, the scaler's mean and scale, coef (one row per class; one row for two
classes, as scikit-learn keeps it) and intercept. Labels: for the skip model, the largest k in 1..K whose skip-k
image keeps SSIM >= target against the dense image of the same seed, else 0; for the unconditional-branch model
the same over uncond-k. A label set with one class is stored as a constant model (scikit-learn refuses to fit it).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.sampling import generate
from methods import _steps

HF_RADIUS = 0.4                 # the release's disc radius, as a fraction of min(H, W)/2 (freq_ratio=0.4)
FEATURES = ("hf_diff", "hf_ratio")   # what the release's decision models read, in its order
SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def outcome_names(max_last: int) -> List[str]:
    """The outcome set: dense, skip the last 1..K scales, run the last 1..K without the unconditional branch."""
    return ["dense"] + [f"skip{k}" for k in range(1, max_last + 1)] + [f"uncond{k}" for k in range(1, max_last + 1)]


def outcome_plan(name: str, num_scales: int):
    """(stop, nocfg) of an outcome for methods/_steps.StepNet."""
    S = num_scales
    if name == "dense":
        return S, S
    k = int(name[-1])
    return (S - k, S) if name.startswith("skip") else (S, S - k)


def plan_outcome(stop: int, nocfg: int, num_scales: int) -> str:
    S = num_scales
    return f"skip{S - stop}" if stop < S else f"uncond{S - nocfg}" if nocfg < S else "dense"


# ------------------------------------------------------------------------------------------------ features
def sobel_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 1, H, W) Sobel gradient magnitude (zero padding, as the release's conv2d padding=1)."""
    sx = torch.tensor(SOBEL_X, device=gray.device, dtype=gray.dtype)
    k = torch.stack((sx, sx.t())).unsqueeze(1)                      # (2, 1, 3, 3)
    return F.conv2d(gray, k, padding=1).pow(2).sum(1, keepdim=True).sqrt()


def hf_ratio(gray: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B,) share of FFT amplitude outside the centred disc of radius int(0.4·min(H, W)/2)."""
    B, _, H, W = gray.shape
    amp = torch.fft.fftshift(torch.fft.fft2(gray.float()), dim=(-2, -1)).abs()
    y = torch.arange(H, device=gray.device).view(-1, 1) - H // 2
    x = torch.arange(W, device=gray.device).view(1, -1) - W // 2
    outside = ((y * y + x * x).float().sqrt() > int(HF_RADIUS * min(H, W) / 2)).float()
    return ((amp * outside).sum(dim=(-2, -1)) / (amp.sum(dim=(-2, -1)) + 1e-6)).view(B)


@torch.no_grad()
def decision_features(old: torch.Tensor, new: torch.Tensor, vqvae=None) -> torch.Tensor:
    """(B, 3) float64 [hf_diff, hf_ratio, hf_rel] from two (B, C, g, g) maps on one grid.

    With `vqvae` both maps are decoded to images (the release decodes both summed-code maps, resampled to one grid,
    with the VAE) and measured on their grey level (mean of RGB in [0, 1]); without, the channel mean of the latent
    map is measured (tests). hf_diff: mean |Sobel(new) - Sobel(old)| (F.l1_loss, the release's HF_diff);
    hf_ratio: the new image's FFT high-frequency share; hf_rel: hf_diff / mean Sobel(new)."""
    if old.shape != new.shape:
        raise RuntimeError(f"decision maps on different grids: {tuple(old.shape)} vs {tuple(new.shape)}")
    if vqvae is not None:
        both = vqvae.fhat_to_img(torch.cat((old, new)).float()).add(1).mul(0.5)
    else:
        both = torch.cat((old, new)).float()
    gray = both.mean(dim=1, keepdim=True)
    g_old, g_new = gray.chunk(2)
    s_old, s_new = sobel_magnitude(g_old), sobel_magnitude(g_new)
    diff = (s_new - s_old).abs().mean(dim=(1, 2, 3))
    rel = diff / s_new.mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return torch.stack((diff, hf_ratio(g_new), rel), dim=1).double()


# ------------------------------------------------------------------------------------------------ models
def labels_for(ssim: Dict[str, Sequence[float]], target: float, kind: str, max_last: int) -> np.ndarray:
    """Per sample, the largest k in 1..max_last whose `kind`-k image keeps SSIM >= target, else 0."""
    n = len(next(iter(ssim.values())))
    out = np.zeros(n, dtype=np.int64)
    for k in range(1, max_last + 1):
        ok = np.asarray(ssim[f"{kind}{k}"], dtype=np.float64) >= target
        out[ok] = k
    return out


def fit_one(X: np.ndarray, y: np.ndarray) -> dict:
    """StandardScaler + LogisticRegression (scikit-learn defaults: lbfgs, C=1), stored as numbers."""
    classes = sorted(set(int(v) for v in y))
    if len(classes) == 1:
        return dict(classes=classes, mean=[0.0] * X.shape[1], scale=[1.0] * X.shape[1], coef=[], intercept=[],
                    constant=True)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(X)
    lr = LogisticRegression(max_iter=1000).fit(scaler.transform(X), y)
    return dict(classes=[int(c) for c in lr.classes_], mean=scaler.mean_.tolist(), scale=scaler.scale_.tolist(),
                coef=lr.coef_.tolist(), intercept=lr.intercept_.tolist(), constant=False)


def predict(model: dict, X: np.ndarray) -> np.ndarray:
    """The class per row of X (n, features) that the stored model picks (scikit-learn's predict, in numpy)."""
    X = np.asarray(X, dtype=np.float64)
    classes = np.asarray(model["classes"], dtype=np.int64)
    if model.get("constant") or len(classes) == 1:
        return np.full(len(X), classes[0], dtype=np.int64)
    Z = (X - np.asarray(model["mean"])) / np.asarray(model["scale"])
    s = Z @ np.asarray(model["coef"]).T + np.asarray(model["intercept"])
    idx = (s[:, 0] > 0).astype(np.int64) if s.shape[1] == 1 else s.argmax(axis=1)
    return classes[idx]


def fit(samples: dict, target: float, max_last: int) -> dict:
    """The two decision models for an SSIM target from collected samples (collect's dict)."""
    X = np.asarray(samples["features"], dtype=np.float64)[:, :len(FEATURES)]
    y_skip = labels_for(samples["ssim"], target, "skip", max_last)
    y_unc = labels_for(samples["ssim"], target, "uncond", max_last)
    skip, unc = fit_one(X, y_skip), fit_one(X, y_unc)
    counts = (lambda y: {str(k): int((y == k).sum()) for k in range(max_last + 1)})
    acc = (lambda m, y: float((predict(m, X) == y).mean()) if len(y) else None)
    return dict(features=list(FEATURES), ssim_target=target, max_last=max_last, skip=skip, uncond=unc,
                train=dict(samples=len(X), skip_labels=counts(y_skip), uncond_labels=counts(y_unc),
                           skip_accuracy=acc(skip, y_skip), uncond_accuracy=acc(unc, y_unc)))


def check_model_dict(model: dict, n_features: int, what: str) -> None:
    try:
        classes = [int(c) for c in model["classes"]]
        if not model.get("constant"):
            coef = np.asarray(model["coef"], dtype=np.float64)
            rows = 1 if len(classes) == 2 else len(classes)
            ok = coef.shape == (rows, n_features) and len(model["intercept"]) == rows \
                and len(model["mean"]) == len(model["scale"]) == n_features and np.isfinite(coef).all()
            if not ok:
                raise ValueError
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"{what}: not a SkipVAR decision model (classes, mean, scale, coef, intercept); "
                         f"run `python -m bench prepare skipvar --force`") from None


# ------------------------------------------------------------------------------------------------ samples
def batch_seed(prepare_seed: int, b: int) -> int:
    """Generation seeds of the fit's batches: far from the measurement seeds (0, 1, 2, ... per batch)."""
    return 7_000_000_007 + 1_000_003 * prepare_seed + b


@torch.no_grad()
def collect(bundle, decision_scale: int, max_last: int, samples: int, prepare_seed: int, *, policy_cls,
            batch: int = 32, sampling=None, progress=None) -> dict:
    """Generate `samples` images per outcome with the same seeds and labels (classes in turn): the features the
    policy (`policy_cls`: methods.skipvar.SkipVARPolicy, passed in so that this module need not import the method
    that imports it) computes at the decision of the dense run, and each outcome's per-image SSIM to the dense image
    (torchmetrics' structural_similarity_index_measure, data range 1, float32, identical images exactly 1 — as
    bench.fidelity.same_seed_fidelity)."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn
    sampling = sampling or bundle.sampling
    S = len(bundle.var.patch_nums)
    names = outcome_names(max_last)[1:]
    feats: List[List[float]] = []
    ssim: Dict[str, List[float]] = {n: [] for n in names}
    device = next(bundle.vqvae.parameters()).device
    for b, i in enumerate(range(0, samples, batch)):
        labels = torch.arange(i, min(samples, i + batch), device=device) % bundle.num_classes
        seed = batch_seed(prepare_seed, b)
        probe = _steps.StepNet(bundle.var, policy_cls(decision_scale, bundle.vqvae, rule=None))
        dense = generate(probe, bundle.vqvae, labels, seed, sampling).images
        feats += probe.policy.features
        for n in names:
            net = _steps.StepNet(bundle.var, _steps.FixedPlan(*outcome_plan(n, S)))
            img = generate(net, bundle.vqvae, labels, seed, sampling).images
            v = ssim_fn(img.float(), dense.float(), data_range=1.0, reduction="none").reshape(-1).double()
            same = (img.double() - dense.double()).pow(2).flatten(1).mean(1) == 0
            ssim[n] += torch.where(same, torch.ones_like(v), v).cpu().tolist()
        if progress:
            progress(min(samples, i + batch), samples)
    return dict(features=feats, ssim=ssim, feature_names=list(FEATURES) + ["hf_rel"], outcomes=names)
