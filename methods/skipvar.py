"""SkipVAR: sample-adaptive choice among step skipping and unconditional-branch replacement (Li et al., arXiv
2506.08908; code fakerone-li/SkipVAR).

The rule: every image runs the scales up to the decision scale d densely. Then, from the token maps after d−1 and
after d, a frequency measure is computed per image and a decision picks, per image, one strategy for the scales
after d: skip the last `skip` scales (methods/skip_scales.py), else run the last `uncond` scales without the
unconditional branch (methods/cfg_skip.py), else nothing (dense). The release decides after step 9 of Infinity's
13, on (a) HF_diff — the L1 change of the Sobel gradient magnitude between the two maps — and (b) the share of FFT
amplitude outside a centred disc of radius 0.4·min(H, W)/2; it first asks a skip model, and only when that says
"no skip" an unconditional-branch model.

Which reading we implemented, and why: the release's decision models are logistic regressions trained on
Infinity-2B samples for SSIM targets (0.84/0.86/0.88); they do not carry over to another model and tokenizer. We
keep the measures and the two-stage order and replace each model by a threshold on one measure (the release also
ships HF_diff-only models): an image whose measure is below `skip_below` skips, else below `uncond_below` drops
its unconditional branch. A small change of high-frequency content between the last two maps means the image has
converged, so the later scales matter less. The measures are taken on the VQ-VAE latent maps the sampler already
has (f_hat, area-downsampled), per channel then averaged, rather than on decoded pixels: decoding at the decision
step would add decoder work the release pays and we need not. `measure=diff` (default) is HF_diff normalised by the
new map's mean gradient (scale-free, so thresholds read as a relative change); `measure=ratio` is the FFT share.
Their cost (a 3x3 Sobel and an FFT on a pn×pn latent per image) is outside the transformer count, like the
sampler's own VQ-VAE work.

Translation to the embedded default (7 scales): Infinity's decision after step 9 leaves 3 steps to act on; here
the strategies act on the last two scales (skip=1, uncond=2, the settings of methods/skip_scales.py and cfg_skip.py)
and the decision is at scale 4 (5×5), the last one before them. The default thresholds put roughly a third of the
embedded default's samples on each strategy (calibrated on it; see README); they are parameters.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.errors import BenchError
from bench.registry import Method, Param, register_method
from methods import _steps

HF_RADIUS = 0.4                    # the release's disc radius, as a fraction of min(H, W)/2


def _maps(x_in: torch.Tensor) -> torch.Tensor:
    B, n, Cv = x_in.shape
    pn = int(round(n ** 0.5))
    return x_in.transpose(1, 2).reshape(B, Cv, pn, pn).float()


def gradient_magnitude(m: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) Sobel gradient magnitude of each channel."""
    sx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=m.device)
    k = torch.stack((sx, sx.t())).unsqueeze(1)                      # (2, 1, 3, 3)
    B, C, H, W = m.shape
    g = F.conv2d(m.reshape(B * C, 1, H, W), k, padding=1)
    return g.pow(2).sum(1).sqrt().view(B, C, H, W)


def hf_diff(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """(B,) L1 change of gradient magnitude from old to new (old interpolated to new's size), relative to new's."""
    old = F.interpolate(old, size=new.shape[-2:], mode="bicubic", align_corners=False)
    gn, go = gradient_magnitude(new), gradient_magnitude(old)
    return (gn - go).abs().mean(dim=(1, 2, 3)) / gn.mean(dim=(1, 2, 3)).clamp_min(1e-12)


def hf_ratio(m: torch.Tensor) -> torch.Tensor:
    """(B,) share of FFT amplitude outside the centred disc of radius HF_RADIUS·min(H, W)/2, mean over channels."""
    B, C, H, W = m.shape
    amp = torch.fft.fftshift(torch.fft.fft2(m), dim=(-2, -1)).abs()
    y = torch.arange(H, device=m.device).view(-1, 1) - H // 2
    x = torch.arange(W, device=m.device).view(1, -1) - W // 2
    outside = ((y * y + x * x).float().sqrt() > int(HF_RADIUS * min(H, W) / 2)).float()
    return ((amp * outside).sum(dim=(-2, -1)) / amp.sum(dim=(-2, -1)).clamp_min(1e-12)).mean(dim=1)


class SkipVARPolicy(_steps.StepPolicy):
    def __init__(self, decision_scale: int, skip: int, uncond: int, skip_below: float, uncond_below: float,
                 measure: str):
        self.d, self.skip, self.uncond = decision_scale, skip, uncond
        self.skip_below, self.uncond_below, self.measure = skip_below, uncond_below, measure
        self.reset()

    def reset(self):
        self.prev: Optional[torch.Tensor] = None
        self.values: List[float] = []

    def decide(self, si, x_in, B, net):
        if si == self.d:
            self.prev = _maps(x_in)                                    # the map after scale d-1
        if si != self.d + 1:
            return
        new = _maps(x_in)                                              # the map after scale d
        v = hf_diff(new, self.prev) if self.measure == "diff" else hf_ratio(new)
        S = len(net.patch_nums)
        stop, nocfg = [], []
        for val in v.tolist():
            self.values.append(val)
            skip = val < self.skip_below
            stop.append(S - self.skip if skip else S)
            nocfg.append(S - self.uncond if not skip and val < self.uncond_below else S)
        net.set_plan(B, stop, nocfg)
        self.prev = None


@register_method("skipvar")
class SkipVAR(Method):
    kind = "token"
    description = "per-sample choice of step skipping / CFG-branch replacement / dense from a frequency measure (SkipVAR)"
    params = (
        Param("skip", int, 1, "scales skipped by a sample that skips (the last ones)", low=1),
        Param("uncond", int, 2, "last scales run without the unconditional branch by a sample that does", low=1),
        Param("decision_scale", int, None, "scale after which the decision is taken (default: the last scale "
              "before the strategies act)", low=1, nullable=True),
        Param("measure", str, "diff", "diff: relative change of high-frequency content between the last two maps; "
              "ratio: FFT high-frequency share of the last map", choices=("diff", "ratio")),
        Param("skip_below", float, 0.2, "a sample whose measure is below this skips", low=0.0),
        Param("uncond_below", float, 0.23, "else, below this it drops the unconditional branch", low=0.0),
    )

    def check(self):
        c = self.config
        if c["uncond_below"] < c["skip_below"]:
            raise BenchError(f"method {self.name}: uncond_below={c['uncond_below']} is below skip_below="
                             f"{c['skip_below']}; valid: uncond_below >= skip_below (skipping is the stronger step)")

    def decision_scale(self, num_scales: int) -> int:
        c = self.config
        given = c["decision_scale"]
        if given is not None and not 1 <= given <= num_scales - 2:
            raise BenchError(f"method {self.name}: decision_scale={given} must follow scale 0 and leave at least one "
                             f"scale to the strategies in a model with {num_scales} scales; valid: 1..{num_scales - 2}")
        # the decision follows scale 1 at the earliest, so the strategies act on at most the last S-2 scales
        for name in ("skip", "uncond"):
            if not 1 <= c[name] <= num_scales - 2:
                raise BenchError(f"method {self.name}: {name}={c[name]} is out of range for a model with {num_scales} "
                                 f"scales (the decision needs scales 0 and 1 before it); valid: 1..{num_scales - 2}")
        tail = max(c["skip"], c["uncond"])
        if given is not None and given > num_scales - 1 - tail:
            raise BenchError(f"method {self.name}: decision_scale={given} leaves {num_scales - 1 - given} scale(s) after "
                             f"it, fewer than skip={c['skip']} / uncond={c['uncond']} act on; valid: decision_scale "
                             f"1..{num_scales - 1 - tail} with these, or skip and uncond 1..{num_scales - 1 - given}")
        return num_scales - 1 - tail if given is None else given

    def check_model(self, bundle):
        self.decision_scale(len(bundle.var.patch_nums))

    def build(self, bundle):
        c = self.config
        d = self.decision_scale(len(bundle.var.patch_nums))
        return _steps.StepNet(bundle.var, SkipVARPolicy(d, c["skip"], c["uncond"], c["skip_below"],
                                                        c["uncond_below"], c["measure"]))

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return net.analytic_macs(bundle, batch)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        S = len(bundle.var.patch_nums)
        plans = net.plans
        n = max(len(plans), 1)
        vals = net.policy.values
        return dict(net.row_metrics(bundle),
                    skipvar_share_skip=round(sum(1 for s, _ in plans if s < S) / n, 4),
                    skipvar_share_uncond=round(sum(1 for s, c in plans if s == S and c < S) / n, 4),
                    skipvar_share_dense=round(sum(1 for s, c in plans if s == S and c == S) / n, 4),
                    skipvar_measure_mean=round(sum(vals) / len(vals), 6) if vals else None,
                    skipvar_decision_scale=self.decision_scale(S),
                    macs_saved_fraction=self.macs_saved_fraction(net, bundle))

    @property
    def label(self) -> str:
        c = self.config
        return f"skipvar {c['measure']}<{c['skip_below']:g}/{c['uncond_below']:g}"
