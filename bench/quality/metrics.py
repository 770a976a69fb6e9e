"""The quality metrics of a set of generated images, alone and paired with dense's: FID, IS, precision/recall, KID.

    q = quality_metrics(images_uint8, bundle, labels=labels)   # embedded model: held-out shapes, its classifier
    q["fid"], q["fid_ci_low"], q["fid_ci_high"], q["precision"], q["kid_mean"], q["reference_cached"] ...
"""
from __future__ import annotations

import json
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from bench.checkpoints import read_state_dict
from bench.errors import BenchError
from bench.quality.extractors import EXTRACTOR_NAME, METRICS, resolve_extractor, to_uint8
from bench.quality.reference import (_checked_stats, _paired_features, check_reference_images, parse_reference,
                                     reference_features)
from bench.quality.statistics import (KID_SUBSET_SIZE, KID_SUBSETS, PRC_NEIGHBORHOOD, _check_level, _resampled_means,
                                      _strata, fid_bootstrap, fid_from_statistics, fid_statistics, kid_features,
                                      paired_fid_bootstrap, paired_mean_interval, prc_indicators,
                                      samples_for_halfwidth, single_threaded)
from bench.stored_images import images_equal, is_images

ISC_SPLITS = 10                            # torch-fidelity's default
FID_DELTA_TARGET = 0.01                    # the sample-size guidance: ΔFID interval half-width at 1% of dense FID


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples the classifier assigns to their conditioning class (conditional accuracy)."""
    return float((logits.argmax(1).cpu() == torch.as_tensor(labels).cpu()).double().mean())


def paired_accuracy_bootstrap(logits: torch.Tensor, dense_logits: torch.Tensor, labels: torch.Tensor,
                              resamples: int, seed: int, level: float = 0.95) -> Tuple[float, float, float]:
    """class accuracy(method) - class accuracy(dense) and its 95% interval: the paired, class-stratified bootstrap
    of paired_fid_bootstrap (the same resample indices for both sets) over per-sample correctness."""
    lab = torch.as_tensor(labels).cpu()
    a = (logits.argmax(1).cpu() == lab).double().numpy()
    b = (dense_logits.argmax(1).cpu() == lab).double().numpy()
    delta = float(a.mean() - b.mean())
    if np.array_equal(a, b):   # every resample differs by exactly 0
        return delta, delta, delta
    if resamples < 1:          # --bootstrap 0: the estimate without an interval
        return delta, None, None
    boot = _resampled_means(a - b, _strata(lab, len(a)), resamples, seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return delta, float(lo), float(hi)


def _accuracy_applies(extractor, logits: torch.Tensor, labels, bundle) -> bool:
    """Class accuracy needs the model's own classifier (its classes are the model's); not Inception."""
    return (extractor.name == EXTRACTOR_NAME and labels is not None
            and logits.shape[1] == getattr(bundle, "num_classes", logits.shape[1]))



def metric_requirements(n: int, n_ref: Optional[int], metrics: Sequence[str], ref_has_images: bool = True) -> List[str]:
    """Problems with set sizes for the requested metrics (empty if fine)."""
    bad = []
    if "fid" in metrics and n < 2:
        bad.append(f"FID needs >= 2 samples (covariance), got {n}")
    if "isc" in metrics and n < ISC_SPLITS:
        bad.append(f"IS needs >= {ISC_SPLITS} samples ({ISC_SPLITS} splits), got {n}")
    if "prc" in metrics and n < PRC_NEIGHBORHOOD + 1:
        bad.append(f"precision/recall need > {PRC_NEIGHBORHOOD} samples (k={PRC_NEIGHBORHOOD} neighbours), got {n}")
    if "kid" in metrics and n < 2:
        bad.append(f"KID needs >= 2 samples (subset size >= 2), got {n}")
    if n_ref is not None and ref_has_images:
        if "fid" in metrics and n_ref < 2:
            bad.append(f"FID needs >= 2 reference images, got {n_ref}")
        if "prc" in metrics and n_ref < PRC_NEIGHBORHOOD + 1:
            bad.append(f"precision/recall need > {PRC_NEIGHBORHOOD} reference images, got {n_ref}")
        if "kid" in metrics and n_ref < 2:
            bad.append(f"KID needs >= 2 reference images, got {n_ref}")
    return bad


def _check_metrics(metrics) -> Tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise BenchError(f"unknown quality metric {unknown[0] if unknown else '(none)'!r}; valid: {', '.join(METRICS)}")
    return metrics


def _prepare(bundle, samples, reference, inception_weights, metrics, reference_count, classifier):
    metrics = _check_metrics(metrics)
    extractor = resolve_extractor(bundle, inception_weights, classifier)
    ref = parse_reference(bundle, reference, reference_count)
    notes = []
    if ref.kind == "npz":
        if ref.info["has_stats"] and ref.info["stats_dim"] != extractor.feature_dim and "fid" in metrics:
            raise BenchError(f"reference statistics {ref.desc} are {ref.info['stats_dim']}-d but {extractor.tag} gives "
                             f"{extractor.feature_dim}-d features; Inception statistics need inception_weights")
        if not ref.has_images:
            lost = [m for m in ("prc", "kid") if m in metrics]
            if lost:
                notes.append(f"{'/'.join(lost)} need reference images (arr_0), which {ref.desc} lacks: reported as NaN")
    bad = metric_requirements(samples, ref.count, metrics, ref.has_images)
    if bad:
        raise BenchError("; ".join(bad) + f" (reference {ref.desc})")
    return metrics, extractor, ref, notes


def check_reference(bundle, samples: int, reference: Optional[str] = None, inception_weights: Optional[str] = None,
                    metrics: Sequence[str] = METRICS, *, reference_count: Optional[int] = None,
                    classifier: Optional[str] = None) -> dict:
    """Validate quality settings before any generation; raises BenchError (one line) or returns a summary
    {extractor, reference, reference_count, notes}. Decodes no images: folder listings (each image read for the
    reference opened and verified), .npz headers and FID statistics, a given classifier's weights."""
    _, extractor, ref, notes = _prepare(bundle, samples, reference, inception_weights, metrics, reference_count,
                                        classifier)
    # what would otherwise be found only after the generation (both small: read whole)
    if classifier and extractor.name == EXTRACTOR_NAME:   # a user's classifier: readable and finite
        read_state_dict(extractor.weights, "quality classifier")
    if ref.kind == "npz" and ref.info.get("has_stats"):   # published statistics that can define a FID
        with np.load(ref.info["path"], allow_pickle=False) as z:
            _checked_stats(z["mu"], z["sigma"], ref.info["path"])
    check_reference_images(ref)   # a corrupt or empty image of a folder: found now, not after the generation
    return dict(extractor=extractor.tag, reference=ref.desc, reference_count=ref.count, notes=notes)



def quality_metrics(images: torch.Tensor, bundle, *, labels: Optional[torch.Tensor] = None,
                    reference: Optional[str] = None,
                    inception_weights: Optional[str] = None, metrics: Sequence[str] = METRICS, bootstrap: int = 100,
                    seed: int = 0, cache_dir: Optional[str] = None,
                    reference_count: Optional[int] = None, classifier: Optional[str] = None,
                    batch_size: Optional[int] = None, paired_images: Optional[torch.Tensor] = None,
                    paired_key: Optional[str] = None, interval: str = "percentile", level: float = 0.95) -> dict:
    """FID (+ bootstrap interval), IS, precision/recall, KID of generated images against a reference set.

    images: uint8 (N,3,H,W) (float [0,1] is converted); features are extracted on images.device. labels: the
    conditioning classes of the images (stratify the FID bootstrap; see fid_bootstrap). `seed` drives the
    bootstrap, KID subsets and IS split shuffle. `level`: the confidence level of every interval computed here
    (recorded as quality_level). Metrics not requested come back NaN.

    paired_images: dense's images with the same labels and seeds (sample i of both shares them): adds fid_delta
    (paired bootstrap interval, paired_fid_bootstrap), fid_delta_pct, the sample-size guidance, and the
    differences of precision, recall (with paired intervals, paired_quality) and IS. paired_key names them for the
    feature cache (None: no caching).
    interval: how the ΔFID interval is read from its bootstrap (INTERVALS: percentile, or normal for --resolve)."""
    t0 = time.time()
    if not is_images(images) or images.dim() != 4 or images.shape[1] != 3:
        raise BenchError(f"images must be a (N,3,H,W) tensor, got {getattr(images, 'shape', type(images))}")
    if bootstrap < 0:
        raise BenchError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    _check_level(level)
    images = to_uint8(images)
    n = len(images)
    if labels is not None and len(labels) != n:
        raise BenchError(f"labels ({len(labels)}) and images ({n}) differ in count")
    metrics, extractor, ref, notes = _prepare(bundle, n, reference, inception_weights, metrics, reference_count,
                                              classifier)
    ref_feats, ref_stats, ref_radii, cached, key = reference_features(extractor, ref, device=images.device,
                                                                      cache_dir=cache_dir)
    gen = extractor.extract(images, batch_size=batch_size)
    feats = gen[extractor.feature_layer]
    nan = float("nan")
    out = dict(fid=nan, fid_ci_low=nan, fid_ci_high=nan, isc_mean=nan, isc_std=nan, precision=nan, recall=nan,
               kid_mean=nan, kid_std=nan)
    kid_size = min(KID_SUBSET_SIZE, n, len(ref_feats)) if ref_feats is not None else None
    if "fid" in metrics:
        with single_threaded(feats.shape[1] <= 512):
            out["fid"] = fid_from_statistics(fid_statistics(feats), ref_stats)
            if bootstrap > 0:
                out["fid_ci_low"], out["fid_ci_high"], _ = fid_bootstrap(feats, ref_stats, out["fid"], bootstrap,
                                                                         seed, labels, level)
    if "isc" in metrics:
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
        r = isc_features_to_metric(gen[extractor.isc_layer], ISC_SPLITS, True, seed)
        out["isc_mean"], out["isc_std"] = r[KEY_METRIC_ISC_MEAN], r[KEY_METRIC_ISC_STD]
    if ref_feats is not None and "kid" in metrics:
        with single_threaded(feats.shape[1] <= 512):   # as FID: two threads spin-wait on a busy machine
            out["kid_mean"], out["kid_std"] = kid_features(feats, ref_feats, KID_SUBSETS, kid_size, seed)
    prc = None   # the per-sample indicators behind precision and recall (their paired intervals)
    if ref_feats is not None and "prc" in metrics:
        dev = images.device  # pairwise distances on the GPU when there is one
        prc = prc_indicators(feats.to(dev), ref_feats.to(dev), PRC_NEIGHBORHOOD, ref_radii)
        out["precision"], out["recall"] = (x.float().mean().item() for x in prc)
    with_acc = _accuracy_applies(extractor, gen[extractor.isc_layer], labels, bundle)
    out["class_accuracy"] = class_accuracy(gen[extractor.isc_layer], labels) if with_acc else None
    if paired_images is not None:
        dense_images = to_uint8(paired_images)
        dense = _dense_features(images, gen, dense_images, extractor, paired_key, cache_dir, batch_size)
        out.update(paired_quality(images, feats, gen, dense_images, extractor, metrics, ref_feats, ref_stats,
                                  ref_radii, out, labels, bootstrap, seed, paired_key, cache_dir, batch_size,
                                  interval=interval, level=level, prc=prc, dense=dense))
        if with_acc:
            out["class_accuracy_delta"], out["class_accuracy_delta_ci_low"], out["class_accuracy_delta_ci_high"] = \
                paired_accuracy_bootstrap(gen[extractor.isc_layer], dense[extractor.isc_layer], labels, bootstrap,
                                          seed, level)
    out.update(extractor=extractor.tag, reference=ref.desc, reference_count=ref.count, reference_cached=cached,
               reference_split=json.dumps(ref.info["record"]) if ref.info.get("record") else None,
               quality_samples=n, quality_metrics=",".join(metrics),
               quality_bootstrap=bootstrap if "fid" in metrics else 0,
               quality_seed=seed, quality_level=level,
               quality_bootstrap_stratified=labels is not None and "fid" in metrics,
               quality_kid_subset_size=kid_size if "kid" in metrics else None,
               quality_isc_splits=ISC_SPLITS if "isc" in metrics else None,
               quality_prc_neighborhood=PRC_NEIGHBORHOOD if "prc" in metrics else None,
               quality_cache_key=key, quality_notes="; ".join(notes), quality_s=round(time.time() - t0, 3))
    return out



def _dense_features(images, gen, dense_images, extractor, key, cache_dir, batch_size) -> Dict[str, torch.Tensor]:
    """The features of dense's same-seed images, once per call: the method's own (`gen`) when its images are
    dense's (dense itself, or a method identical to it), else extracted or read from the cache (_paired_features)."""
    if len(dense_images) != len(images):
        raise BenchError(f"paired images ({len(dense_images)}) and images ({len(images)}) differ in count")
    if images_equal(dense_images, images):
        return gen
    return _paired_features(dense_images, extractor, key, cache_dir, batch_size)


def paired_quality(images, feats, gen, dense_images, extractor, metrics, ref_feats, ref_stats, ref_radii, own: dict,
                   labels, bootstrap: int, seed: int, key, cache_dir, batch_size, interval: str = "percentile",
                   level: float = 0.95, prc: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   dense: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """The quality columns paired with dense on the same seeds (see quality_metrics). prc: the method's own
    per-sample precision/recall indicators (prc_indicators; recomputed when not given). dense: the features of
    dense_images (_dense_features; extracted, or read from the cache, when not given).

    Intervals of precision_delta and recall_delta at `level` from `bootstrap` resamples (`seed`), percentile
    bootstrap of a mean of per-sample differences (identical indicators: [delta, delta]; bootstrap 0: none):
    - precision is a mean over generated samples of "inside some reference point's k-NN ball"; sample i of the
      method and of dense share label and seed, so the resample draws the same class-stratified indices from both
      indicator vectors (as paired_accuracy_bootstrap). The reference balls are held fixed.
    - recall is a mean over reference points of "inside some generated sample's k-NN ball". Resampling the
      generated samples would need their k-NN radii recomputed per resample (an N² distance pass each), so the
      interval resamples the reference points instead, the same indices for both arms, with both generated sets
      (and so their balls) fixed. It covers the variability from which reference images probe the two manifolds;
      it leaves out the variability from which seeds were drawn (the generated balls), so it is narrower than a
      full interval of the difference would be; read it as a lower bound on the uncertainty of recall_delta."""
    nan = float("nan")
    n = len(feats)
    if dense is None:
        dense = _dense_features(images, gen, dense_images, extractor, key, cache_dir, batch_size)
    out = dict(fid_delta=nan, fid_delta_ci_low=nan, fid_delta_ci_high=nan, fid_delta_pct=nan,
               fid_delta_samples_for_1pct=None, precision_delta=nan, precision_delta_ci_low=nan,
               precision_delta_ci_high=nan, recall_delta=nan, recall_delta_ci_low=nan, recall_delta_ci_high=nan,
               isc_delta=nan)
    dfeats = dense[extractor.feature_layer]
    if "fid" in metrics:
        with single_threaded(feats.shape[1] <= 512):
            delta, lo, hi, _ = paired_fid_bootstrap(feats, dfeats, ref_stats, bootstrap, seed, labels, level,
                                                    interval=interval)
        fid_dense = own["fid"] - delta
        out.update(fid_delta=delta, fid_delta_ci_low=lo, fid_delta_ci_high=hi,
                   fid_delta_pct=100 * delta / fid_dense if fid_dense > 0 else nan,
                   fid_delta_samples_for_1pct=samples_for_halfwidth(n, (hi - lo) / 2, FID_DELTA_TARGET * fid_dense))
    if "isc" in metrics:
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
        out["isc_delta"] = own["isc_mean"] - isc_features_to_metric(dense[extractor.isc_layer], ISC_SPLITS, True,
                                                                    seed)[KEY_METRIC_ISC_MEAN]
    if ref_feats is not None and "prc" in metrics:
        dev = images.device   # where the method's own precision/recall ran: dense itself gets exactly 0
        mp, mr = prc if prc is not None else prc_indicators(feats.to(dev), ref_feats.to(dev), PRC_NEIGHBORHOOD,
                                                            ref_radii)
        # dense's own features (dense itself, or a method whose images are dense's): its indicators are the method's
        dp, dr = (mp, mr) if dense is gen else prc_indicators(dfeats.to(dev), ref_feats.to(dev), PRC_NEIGHBORHOOD,
                                                              ref_radii)
        p_delta = own["precision"] - dp.float().mean().item()
        r_delta = own["recall"] - dr.float().mean().item()
        p_lo, p_hi = paired_mean_interval(mp, dp, p_delta, _strata(labels, n), bootstrap, seed, level)
        r_lo, r_hi = paired_mean_interval(mr, dr, r_delta, [np.arange(len(dr))], bootstrap, seed, level)
        out.update(precision_delta=p_delta, precision_delta_ci_low=p_lo, precision_delta_ci_high=p_hi,
                   recall_delta=r_delta, recall_delta_ci_low=r_lo, recall_delta_ci_high=r_hi)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def classifier_logits(images: torch.Tensor, bundle=None, classifier: Optional[str] = None,
                      batch_size: Optional[int] = None) -> torch.Tensor:
    """The quality classifier's class logits of images (uint8 or [0,1] float), on the images' device."""
    ex = resolve_extractor(bundle, None, classifier)
    return ex.extract(to_uint8(images), batch_size=batch_size)["logits"]
