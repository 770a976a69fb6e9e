"""The quality certificate of a model (`python -m bench evaluate`; the README's numbers for the shipped default).

    from bench.certificate import quality_certificate
    cert = quality_certificate(bundle, samples=1000)   # a dict: cert["rows"]["dense"]["fid"], ...

Three image sets, each scored against the same held-out real reference (the model's 'val' split: shapes, or the
held-out part of a registered model's image folder; or `reference`) with the same extractor: (a) dense samples
of the model (its default sampling; balanced labels i mod C; batch b uses seed+b), (b) real held-out images of the
'test' split, as many as samples where the data has them (the floor: what a perfect model would get at this sample
count; n/a for a reference given by path, which has no second held-out set), (c) samples of the same VAR
architecture freshly initialised (`VAR(cfg).init_weights()`, seeded) through the same VQ-VAE (the ceiling of an
untrained model). Each row also gives the class accuracy: the share of images the model's classifier assigns to
their conditioning class (None when the model has no classifier of its own).
"""
from __future__ import annotations

import json
import time
from typing import Optional

import torch

from bench import quality
from bench.data import load_split, shapes_images
from bench.defaults import MAX_BOOTSTRAP, MAX_SEED
from bench.env import environment
from bench.errors import BenchError
from bench.log import get_logger
from bench.models.var import VAR
from bench.sampling import generate

log = get_logger(__name__)
SETS = ("dense", "real_test", "untrained")


def generate_set(net, bundle, n: int, batch_size: int, seed: int, sampling):
    """uint8 images and labels; balanced labels i mod C; batch b uses seed + b."""
    images, labels = [], []
    for b, start in enumerate(range(0, n, batch_size)):
        lab = torch.arange(start, min(start + batch_size, n)) % bundle.num_classes
        gen = generate(net, bundle.vqvae, lab.to(bundle.device), seed + b, sampling)
        images.append(quality.to_uint8(gen.images).cpu())
        labels.append(lab)
    return torch.cat(images), torch.cat(labels)


def floor_source(bundle, reference: Optional[str]) -> Optional[str]:
    """Where the real held-out floor set comes from: 'shapes', an image folder, or None (a reference given by path
    or the model's own reference: no second held-out set)."""
    ds = bundle.dataset or {}
    if reference is not None or ds.get("reference"):
        return None
    return "shapes" if ds.get("name") == "shapes" else ds.get("path")


def real_test_set(bundle, source: str, n: int):
    """Up to n uint8 images and labels of the 'test' split (class-stratified for a folder; all of it if smaller)."""
    ds = bundle.dataset or {}
    size = int(ds.get("image_size", bundle.image_size))
    if source == "shapes":
        imgs, labels = shapes_images("test", n, size, num_classes=bundle.num_classes)
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    imgs, labels, _, rec = load_split(source, "test", n, size, 0, ds.get("partition"))
    if rec.count < n:
        log.info(f"the floor uses all {rec.count} images of the folder's test split (fewer than {n})")
    return imgs.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8), labels


def _check(samples: int, seed: int, batch_size: int, bootstrap: int) -> None:
    for name, v, low, high in (("samples", samples, 2, None), ("seed", seed, 0, MAX_SEED),
                               ("batch size", batch_size, 1, None), ("bootstrap", bootstrap, 0, MAX_BOOTSTRAP)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            why = " (FID needs a covariance)" if name == "samples" else ""
            raise BenchError(f"{name} must be an integer {bound}{why}, got {v!r}")


def quality_certificate(bundle, *, samples: int = 1000, seed: int = 0, batch_size: int = 100, sampling=None,
                        reference: Optional[str] = None, reference_count: Optional[int] = None,
                        inception_weights: Optional[str] = None, bootstrap: int = 100,
                        classifier: Optional[str] = None) -> dict:
    """The three sets of the module docstring scored against one reference; returns the certificate (a dict:
    rows {dense, real_test, untrained} of metrics, the reference, extractor, settings and environment). Checks
    every input (BenchError, nothing generated) before generating anything."""
    _check(samples, seed, batch_size, bootstrap)
    sampling = sampling or bundle.sampling
    ref = quality.parse_reference(bundle, reference, reference_count)
    metrics = tuple(m for m in quality.METRICS if not quality.metric_requirements(samples, ref.count, (m,),
                                                                                   ref.has_images))  # valid at N
    check = quality.check_reference(bundle, samples, reference, inception_weights, metrics,
                                    reference_count=reference_count, classifier=classifier)
    has_classifier = bool(classifier or bundle.classifier)
    floor = floor_source(bundle, reference)

    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time()
    sets = {}
    log.info(f"generating {samples} dense samples of {bundle.model_id} ({sampling.to_dict()})")
    t = time.time()
    sets["dense"] = (*generate_set(bundle.var, bundle, samples, batch_size, seed, sampling), time.time() - t)
    log.info(f"generating {samples} samples of an untrained VAR (same config, init_weights, seed {seed})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        untrained = VAR(bundle.var.cfg).init_weights().to(bundle.device).eval()
    t = time.time()
    sets["untrained"] = (*generate_set(untrained, bundle, samples, batch_size, seed, sampling), time.time() - t)
    if floor is not None:
        sets["real_test"] = (*real_test_set(bundle, floor, samples), 0.0)

    titles = {"dense": f"dense samples (cfg={sampling.cfg}, top_k={sampling.top_k}, top_p={sampling.top_p})",
              "real_test": f"real held-out images (test split{'' if floor == 'shapes' else ' of the folder'})",
              "untrained": f"untrained VAR (init_weights, seed {seed})"}
    rows = {}
    for key in SETS:
        if key not in sets:
            rows[key] = dict(set=titles[key] + ": n/a (no second held-out set beside --reference)", images=0)
            continue
        images, labels, gen_s = sets[key]
        q = quality.quality_metrics(images.to(bundle.device), bundle, labels=labels, metrics=metrics,
                                    bootstrap=bootstrap, seed=seed, reference=reference,
                                    reference_count=reference_count, classifier=classifier,
                                    inception_weights=inception_weights)
        acc = None
        if has_classifier:   # the model's classifier, also when Inception measures FID
            logits = quality.classifier_logits(images.to(bundle.device), bundle, classifier)
            acc = quality.class_accuracy(logits, labels)
        rows[key] = dict(set=titles[key], images=len(images), classifier_accuracy=acc, generate_s=round(gen_s, 3), **q)
    return dict(command="evaluate", model=bundle.name, model_id=bundle.model_id, model_source=bundle.source,
                sampling=sampling.to_dict(), samples=samples, seed=seed, batch_size=batch_size,
                seed_scheme="batch b (labels i mod num_classes) uses seed+b", untrained_init_seed=seed,
                metrics=list(metrics), bootstrap=bootstrap, reference=check["reference"],
                reference_count=check["reference_count"],
                reference_split=json.loads(rows["dense"].get("reference_split") or "null"),
                extractor=check["extractor"], rows=rows, **environment(str(bundle.device)),
                env_device=str(bundle.device), started_at=started, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                wall_s=round(time.time() - t0, 3))
