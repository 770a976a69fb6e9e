"""Sample quality: FID (with a bootstrap interval), IS, precision/recall and KID in one call, torch-fidelity style.

    q = quality_metrics(images_uint8, bundle, labels=labels)   # embedded model: held-out shapes, its classifier
    q = quality_metrics(images_uint8, bundle, reference="VIRTUAL_imagenet256_labeled.npz",
                        inception_weights="weights-inception-2015-12-05-6726825d.pth")
    q["fid"], q["fid_ci_low"], q["fid_ci_high"], q["precision"], q["kid_mean"], q["reference_cached"] ...

One module per job: extractors (our classifier registered with torch-fidelity, Inception-v3), reference (reference
sets and the on-disk feature cache), statistics (FID statistics, bootstrap and paired intervals, KID, k-NN
precision/recall) and metrics (quality_metrics, paired_quality, class accuracy, the checks before generation).
Same-seed fidelity to dense (PSNR, SSIM, token agreement) is bench.fidelity.
"""
from bench.quality.extractors import (EXTRACTOR_NAME, INCEPTION_NAME, METRICS, ClassifierFeatureExtractor, Extractor,
                                      infer_classifier_config, resolve_extractor, to_uint8)
from bench.quality.metrics import (check_reference, class_accuracy, classifier_logits, metric_requirements,
                                   paired_accuracy_bootstrap, paired_quality, quality_metrics)
from bench.quality.reference import (DEFAULT_REFERENCE_COUNT, MAX_REFERENCE_COUNT, Reference, check_reference_images,
                                     default_cache_dir, parse_reference, reference_features, reference_key)
from bench.quality.statistics import (INTERVALS, FIDAgainst, fid_bootstrap, fid_from_statistics, fid_statistics,
                                      kid_features, knn_radii, mean_interval, paired_fid_bootstrap,
                                      paired_mean_interval, prc_features, prc_indicators, samples_for_halfwidth,
                                      single_threaded)

# Tuning constants (DIST_ROWS, KERNEL_ROWS, ...) are not re-exported: read and patch them in their own module
# (bench.quality.statistics), where the code reads them.
__all__ = [
    "EXTRACTOR_NAME", "INCEPTION_NAME", "METRICS", "ClassifierFeatureExtractor", "Extractor", "infer_classifier_config",
    "resolve_extractor", "to_uint8",
    "check_reference", "class_accuracy", "classifier_logits", "metric_requirements", "paired_accuracy_bootstrap",
    "paired_quality", "quality_metrics",
    "DEFAULT_REFERENCE_COUNT", "MAX_REFERENCE_COUNT", "Reference", "check_reference_images", "default_cache_dir",
    "parse_reference", "reference_features", "reference_key",
    "INTERVALS", "FIDAgainst", "fid_bootstrap", "fid_from_statistics", "fid_statistics", "kid_features", "knn_radii",
    "mean_interval", "paired_fid_bootstrap", "paired_mean_interval", "prc_features", "prc_indicators",
    "samples_for_halfwidth", "single_threaded",
]

