"""Same-seed fidelity of a method's samples to dense's: token agreement, per-image PSNR and SSIM, with intervals."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from bench.errors import BenchError
from bench.memory import release_freed_memory
from bench.quality.statistics import _check_level, _strata, mean_interval

PSNR_CAP_DB = 100.0                        # PSNR of identical images (infinite) is reported as this value
FIDELITY_CHUNK_VALUES = 1 << 18            # image values (N·C·H·W) per chunk of the per-image PSNR/SSIM pass
TRIM_EVERY_CHUNKS = 16                     # chunks between two returns of freed memory to the OS
SSIM_MIN_SIDE = 6                          # torchmetrics reflect-pads by 5 px (11-px Gaussian window)


def same_seed_fidelity(tokens: Sequence[torch.Tensor], ref_tokens: Sequence[torch.Tensor], images: torch.Tensor,
                       ref_images: torch.Tensor, *, labels: Optional[torch.Tensor] = None, resamples: int = 100,
                       seed: int = 0, level: float = 0.95) -> dict:
    """How close a method's samples are to dense samples drawn with the same seeds and labels.

    tokens / ref_tokens: per-scale (N, pn²) integer tensors; images / ref_images: float (N,3,H,W) in [0,1], or uint8
    (read as value/255 one chunk at a time, the same float32 values as converting the whole set first, without
    holding a float copy of it: 4 bytes a value, 39 GB for 50k images at 256²).
    fidelity_token_agreement: equal tokens / all tokens (scales weighted by their token count);
    fidelity_psnr_db: mean over images of per-image PSNR (peak 1.0); identical images count as PSNR_CAP_DB;
    ssim_to_dense: mean over images of per-image SSIM (torchmetrics' structural_similarity_index_measure, data
    range 1.0, 11-px Gaussian window σ 1.5, in float32); an image identical to its dense image counts exactly 1.
    None for images under SSIM_MIN_SIDE px on a side (the window's reflect padding needs 6).

    Intervals (psnr_to_dense_ci_low/high, ssim_to_dense_ci_low/high): percentile bootstrap at `level` of the mean
    over images, `resamples` resamples with default_rng(seed), class-stratified by `labels` (the conditioning
    classes) when given (mean_interval); None when resamples is 0; [estimate, estimate] when every per-image value
    is equal (identical images). Images are compared in chunks of FIDELITY_CHUNK_VALUES values, on ref_images'
    device. Non-finite values come back None."""
    if len(tokens) != len(ref_tokens) or not tokens:
        raise BenchError(f"token lists differ in scale count: {len(tokens)} vs {len(ref_tokens)}")
    if resamples < 0:
        raise BenchError(f"resamples must be >= 0, got {resamples}")
    _check_level(level)
    per_scale, equal, total = [], 0, 0
    for si, (a, b) in enumerate(zip(tokens, ref_tokens)):
        if a.shape != b.shape:
            raise BenchError(f"scale {si}: token shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        eq = int((a.to(b.device) == b).sum())
        per_scale.append(eq / b.numel())
        equal, total = equal + eq, total + b.numel()
    if images.shape != ref_images.shape:
        raise BenchError(f"image shapes differ: {tuple(images.shape)} vs {tuple(ref_images.shape)}")
    groups = _strata(labels, len(images))
    psnr, ssim = _per_image_fidelity(images, ref_images)
    out = dict(fidelity_token_agreement=equal / total, fidelity_token_agreement_per_scale=per_scale,
               fidelity_psnr_db=float(psnr.mean()) if psnr.size else float("nan"))
    out["psnr_to_dense_ci_low"], out["psnr_to_dense_ci_high"] = mean_interval(psnr, out["fidelity_psnr_db"], groups,
                                                                              resamples, seed, level)
    out["ssim_to_dense"] = float(ssim.mean()) if ssim is not None and ssim.size else None
    out["ssim_to_dense_ci_low"], out["ssim_to_dense_ci_high"] = (
        mean_interval(ssim, out["ssim_to_dense"], groups, resamples, seed, level) if out["ssim_to_dense"] is not None
        else (None, None))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def _unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 in [0,1] (value/255, where they are); float images as they are."""
    return images.float().div(255) if images.dtype == torch.uint8 else images


def _per_image_fidelity(images: torch.Tensor, ref_images: torch.Tensor) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Per-image PSNR (dB, peak 1.0, capped at PSNR_CAP_DB; float64) and SSIM (None under SSIM_MIN_SIDE px) of
    images against ref_images, chunk by chunk. SSIM runs in float32: its depthwise convolutions take ~10x the time
    and ~5x the memory in float64 on CPU (measured: 8 s and +5.8 GB for 1365 images of 32x32), and float32 per-image
    SSIM is within 3e-7 of float64's (measured, noise 0 to 0.2). A chunk of FIDELITY_CHUNK_VALUES (2^20) values
    costs ~300 MB of SSIM work on CPU, whatever N; a chunk of 2^18, ~100 MB (60,000 images of 32x32: 704 chunks).
    glibc keeps the chunks' freed buffers, so the pass hands them back every TRIM_EVERY_CHUNKS chunks (else the
    resident set grew by ~20 MB per 1000 images)."""
    n = len(images)
    psnr = np.empty(n)
    with_ssim = images.dim() == 4 and min(images.shape[-2:]) >= SSIM_MIN_SIDE
    ssim = np.empty(n) if with_ssim else None
    if with_ssim:
        from torchmetrics.functional.image import structural_similarity_index_measure
    per = max(1, FIDELITY_CHUNK_VALUES // max(1, images[0].numel() if n else 1))
    dev = ref_images.device
    for i in range(0, n, per):
        a, b = _unit(images[i:i + per]).to(dev), _unit(ref_images[i:i + per])
        mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
        p = torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, PSNR_CAP_DB))
        psnr[i:i + per] = p.clamp(max=PSNR_CAP_DB).cpu().numpy()
        if with_ssim and not bool((mse == 0).all()):
            v = structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, reduction="none")
            # identical images: exactly 1, as SSIM is by definition (its variance clamp can leave 1 - ε)
            ssim[i:i + per] = torch.where(mse == 0, 1.0, v.reshape(-1).double()).cpu().numpy()
        elif with_ssim:   # a chunk identical to dense's (dense itself, a method equal to it): 1 by definition
            ssim[i:i + per] = 1.0
        del a, b
        if (i // per + 1) % TRIM_EVERY_CHUNKS == 0:
            release_freed_memory()
    return psnr, ssim
