"""Named measurement protocols: one name fixes the sample count, the sampling settings and what quality is measured
against, so that a published number is reproduced by one flag rather than six.

    p = resolve_preset("imagenet", reference="VIRTUAL_imagenet256_labeled.npz",
                       inception_weights="weights-inception-2015-12-05-6726825d.pth")
    p.samples, p.sampling, p.reference, p.inception_weights        # 50000, {cfg: 1.5, top_k: 900, top_p: 0.96}, ...

`run --preset imagenet` and a sweep's top-level `preset: imagenet` use it; flags or YAML keys given explicitly
(--samples, --cfg, ...) override the preset's values and the row records what was used. The two files are the
user's (nothing can be downloaded here) and are required: a missing one is one line naming the flag and the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from bench.errors import BenchError

ADM_REFERENCE = ("VIRTUAL_imagenet256_labeled.npz (the ADM ImageNet 256x256 reference batch, "
                 "openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/)")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's Inception-v3 weights)"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    samples_per_class: int
    num_classes: int
    sampling: Dict[str, float] = field(default_factory=dict)   # cfg, top_k, top_p
    reference_hint: str = ""
    inception_hint: str = ""

    @property
    def samples(self) -> int:
        return self.samples_per_class * self.num_classes


PRESETS: Dict[str, Preset] = {
    # the VAR paper's FID protocol (../shared/METHODS.md §1): 50 images per ImageNet class, cfg 1.5, top-k 900,
    # top-p 0.96, Inception features against ADM's reference batch
    "imagenet": Preset("imagenet", "VAR paper FID protocol: 50,000 samples (50 per class), cfg 1.5, top-k 900, "
                       "top-p 0.96, vs the ADM ImageNet-256 reference batch with Inception-v3",
                       samples_per_class=50, num_classes=1000, sampling=dict(cfg=1.5, top_k=900, top_p=0.96),
                       reference_hint=ADM_REFERENCE, inception_hint=INCEPTION_FILE),
}


@dataclass(frozen=True)
class ResolvedPreset:
    preset: Preset
    samples: int
    sampling: Dict[str, float]
    reference: str
    inception_weights: str


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise BenchError(f"unknown preset {name!r}; valid: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def resolve_preset(name: str, reference: Optional[str], inception_weights: Optional[str],
                   flag_names=("--reference", "--inception-weights")) -> ResolvedPreset:
    """The preset's values with its two required files checked (one line each when missing)."""
    p = get_preset(name)
    for path, flag, hint in ((reference, flag_names[0], p.reference_hint),
                             (inception_weights, flag_names[1], p.inception_hint)):
        if not path:
            raise BenchError(f"preset {name} needs {flag} {hint}")
        if not os.path.isfile(path):
            raise BenchError(f"preset {name}: {flag} file not found: {path}; expected {hint}")
    return ResolvedPreset(p, p.samples, dict(p.sampling), reference, inception_weights)


def check_preset_model(name: str, num_classes: int, model: str) -> None:
    """A per-class preset only makes sense for a model with the preset's classes."""
    p = get_preset(name)
    if num_classes != p.num_classes:
        raise BenchError(f"preset {name} is for {p.num_classes}-class models ({p.samples_per_class} samples per "
                         f"class); model {model} has {num_classes} classes")
