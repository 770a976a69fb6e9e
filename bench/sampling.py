"""Class-conditional sampling, step for step the released `autoregressive_infer_cfg`.

Same weights and seed give the same tokens as the release: one seeded generator, one `multinomial` per scale
over all rows, the CFG ramp t = cfg·si/(S-1), top-k then top-p masking, bicubic up / area down through the
VQ-VAE's Φ. `scale_fn` and `timer` let the measurement path count FLOPs and time each scale of the very
same generation. Under bench.precision.generation_dtype (--dtype bf16/fp16) the transformer forward runs in
autocast; its logits and all that follows stay float32.

Step skipping: a net may define `scale_rows(si, x_in, B, f_hat)` -> None (all B images run scale si) or a bool
(B,) mask; f_hat is the full-size sum of the scales run so far (read-only: SkipVAR measures it). Images outside the
mask get tokens -1 at si and nothing added to f_hat there (so the decoder sees the map of the scales they ran,
already upsampled to full size); when no image runs si, the net is not called at all.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from bench.errors import BenchError, NonFiniteOutput
from bench.precision import forward_autocast


@dataclass(frozen=True)
class SamplingConfig:
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False

    def to_dict(self):
        return asdict(self)


def validate_sampling(s: SamplingConfig, vocab: int) -> None:
    """One line (BenchError) on settings the sampler cannot use with a vocabulary of `vocab` tokens."""
    if not (s.cfg >= 0 and math.isfinite(s.cfg)):
        raise BenchError(f"--cfg must be a finite number >= 0, got {s.cfg}")
    if not 0 <= s.top_k <= vocab:
        raise BenchError(f"--top-k must be in [0, {vocab}] (0 disables it), got {s.top_k}")
    if not 0 <= s.top_p <= 1:
        raise BenchError(f"--top-p must be in [0, 1] (0 disables it), got {s.top_p}")


@dataclass
class Generation:
    images: torch.Tensor          # (B, 3, H, W) in [0, 1]
    tokens: List[torch.Tensor]    # per scale, (B, pn²) int64
    labels: torch.Tensor          # (B,)


def mask_top_k_top_p_(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """In place: -inf outside the top-k, then outside the top-p nucleus (the release's order)."""
    if top_k > 0:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits


def sample_tokens(logits_BlV: torch.Tensor, top_k: int, top_p: float, rng: Optional[torch.Generator]):
    B, l, V = logits_BlV.shape
    probs = mask_top_k_top_p_(logits_BlV, top_k, top_p).softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=rng).view(B, l)


def _gumbel_soft(logits, tau, rng):
    g = -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_(generator=rng).log()
    return ((logits + g) / tau).softmax(-1)


def _check_finite(t: torch.Tensor, what: str) -> None:
    # checked before sampling: multinomial would crash on NaN, and a NaN decoder yields black images silently
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteOutput(f"the model produced non-finite {what} (NaN or Inf); its weights or inputs are "
                              "broken, so no sample or row is produced from them")


class _NoTimer:
    def lap(self, name: str):
        pass


@torch.no_grad()
def generate(net, vqvae, labels: Optional[torch.Tensor], seed: Optional[int], sampling: SamplingConfig,
             *, batch_size: Optional[int] = None, scale_fn: Optional[Callable] = None, timer=None,
             decode: bool = True) -> Generation:
    """Generate one batch. `net` is a VAR or any method wrapper exposing the same `scale_forward`."""
    device = next(vqvae.parameters()).device
    rng = None
    if seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(seed)
    if labels is None:  # the release draws labels from the same generator first
        uniform = torch.full((1, net.num_classes), 1.0 / net.num_classes, device=device)
        labels = torch.multinomial(uniform, num_samples=batch_size, replacement=True, generator=rng).reshape(-1)
    labels = labels.to(device)
    B = labels.shape[0]
    label_2B = torch.cat((labels, torch.full_like(labels, net.num_classes)))
    scale_fn = scale_fn or net.scale_forward
    timer = timer or _NoTimer()
    quant = vqvae.quantize
    pns, S = net.patch_nums, len(net.patch_nums)
    f_hat = torch.zeros(B, quant.Cvae, pns[-1], pns[-1], device=device)
    caches, x_in, tokens = net.new_caches(), None, []
    scale_rows = getattr(net, "scale_rows", None)   # step skipping hook (methods/_steps.py)
    for si, pn in enumerate(pns):
        ratio = si / (S - 1)
        run = scale_rows(si, x_in, B, f_hat) if scale_rows is not None else None   # None: every image runs si
        if run is not None and not bool(run.any()):   # nobody runs it: no transformer work, f_hat unchanged
            tokens.append(torch.full((B, pn * pn), -1, dtype=torch.long, device=device))
            if si != S - 1:
                x_in = F.interpolate(f_hat, size=(pns[si + 1],) * 2, mode="area").view(B, quant.Cvae, -1).transpose(1, 2)
            timer.lap(f"scale{si}")
            continue
        with forward_autocast(device.type):   # bench/precision.py: fp32 (nothing) unless --dtype asks
            logits = scale_fn(si, x_in, label_2B, caches)
        logits = logits.float()   # guidance, sampling and the residual update stay float32 under any --dtype
        t = sampling.cfg * ratio
        logits = (1 + t) * logits[:B] - t * logits[B:]
        _check_finite(logits, f"logits at scale {si}")
        idx = sample_tokens(logits, sampling.top_k, sampling.top_p, rng)
        tokens.append(idx)
        if not sampling.more_smooth:
            h = quant.embedding(idx)
        else:  # visualisation only: soft Gumbel mixture of codes (MaskGIT-style temperature)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            h = _gumbel_soft(logits.mul(1 + ratio), tau, rng) @ quant.embedding.weight.unsqueeze(0)
        h = h.transpose_(1, 2).reshape(B, quant.Cvae, pn, pn)
        f_prev = f_hat.clone() if run is not None else None
        f_hat, nxt = quant.next_input(si, f_hat, h)
        if run is not None:   # images that skip this scale: token -1, their f_hat keeps the earlier scales only
            idx.masked_fill_(~run.view(B, 1), -1)
            f_hat = torch.where(run.view(B, 1, 1, 1), f_hat, f_prev)
            nxt = f_hat if si == S - 1 else F.interpolate(f_hat, size=(pns[si + 1],) * 2, mode="area")
        if si != S - 1:
            x_in = nxt.view(B, quant.Cvae, -1).transpose(1, 2)  # scale_forward doubles it for CFG
        timer.lap(f"scale{si}")
    # the K/V caches and the last scale's tensors are freed before decoding, as the release does (kv_caching(False)),
    # so the decoder can reuse their memory (d16, batch 2: our decode's page faults 790k -> 757k; the release's 471k;
    # the rest depends on glibc's dynamic thresholds, see bench-official --allocator)
    caches = x_in = logits = h = nxt = f_prev = None
    images = vqvae.fhat_to_img(f_hat).add_(1).mul_(0.5) if decode else f_hat
    _check_finite(images, "decoded images" if decode else "the final feature map")
    timer.lap("decode")
    return Generation(images=images, tokens=tokens, labels=labels)


def tokens_to_image(vqvae, tokens: List[torch.Tensor]) -> torch.Tensor:
    """Decode per-scale tokens (as `generate` returns them) to images in [0, 1]."""
    quant, pns = vqvae.quantize, vqvae.v_patch_nums
    B = tokens[0].shape[0]
    f_hat = torch.zeros(B, quant.Cvae, pns[-1], pns[-1], device=tokens[0].device)
    for si, (pn, idx) in enumerate(zip(pns, tokens)):
        f_hat, _ = quant.next_input(si, f_hat, quant.embedding(idx).transpose(1, 2).reshape(B, quant.Cvae, pn, pn))
    return vqvae.fhat_to_img(f_hat).add_(1).mul_(0.5)
