"""Quality path (bench/quality/, `bench evaluate`): real extractor, real data, small sets."""
import dataclasses
import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from bench import fidelity as F
from bench import quality as Q
from bench.quality import reference as QR
from bench.quality import statistics as QS
from bench.errors import BenchError
from tests.conftest import run_cli

N, R = 200, 400  # generated-set and reference sizes: small, but every metric is valid


def shipped_classifier():
    """Path of the shipped quality classifier, or None before the lead ships one."""
    from bench.zoo import ASSETS, read_manifest
    for entry in read_manifest().get("models", {}).values():
        f = entry.get("files", {}).get("classifier")
        if f and os.path.isfile(os.path.join(ASSETS, f)):
            return os.path.join(ASSETS, f)
    return None


def _calibrated_random_classifier(path):
    """An untrained ShapesClassifier whose BatchNorm statistics are measured on real images: well-scaled random
    convolutional features, built in seconds. A valid extractor for checking the metric machinery (its class
    logits mean nothing); training one that is good takes minutes on CPU, so the shipped one is used if present."""
    from bench.checkpoints import save_state_dict
    from bench.data import shapes_images, to_model_range
    from bench.models.classifier import ShapesClassifier
    torch.manual_seed(0)
    net = ShapesClassifier()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(to_model_range(shapes_images("train", 300)[0]))
    save_state_dict(net.eval(), path)
    return path


@pytest.fixture(scope="session")
def clf(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clf") / "classifier.safetensors")
    return shipped_classifier() or _calibrated_random_classifier(path)


@pytest.fixture(scope="session")
def bundle(clf):
    from bench.zoo import tiny_bundle
    return dataclasses.replace(tiny_bundle(), classifier=clf)


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("quality-cache"))


@pytest.fixture(scope="session")
def real_sets():
    """Two disjoint held-out sets (test split) with their balanced labels, and the reference images (val)."""
    from bench.data import shapes_images
    to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    a, la = shapes_images("test", N)
    b, lb = shapes_images("test", N, start=N)
    ref, _ = shapes_images("val", R)
    return (to_t(a), torch.from_numpy(la)), (to_t(b), torch.from_numpy(lb)), to_t(ref)


def _q(images, bundle, cache, **kw):
    kw.setdefault("reference_count", R)
    return Q.quality_metrics(images, bundle, cache_dir=cache, **kw)


class _Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def test_registered_extractor_runs_in_torch_fidelity_and_matches_our_path(bundle, clf, cache, real_sets):
    """calculate_metrics with 'var-bench-classifier' gives finite numbers, and quality_metrics (cached reference,
    fast FID, PR with cached radii) reproduces them. KID: see the next test (torch-fidelity's takes ~6 s here)."""
    import torch_fidelity
    (a, la), _, ref = real_sets
    tf = torch_fidelity.calculate_metrics(
        input1=_Images(a), input2=_Images(ref), feature_extractor=Q.EXTRACTOR_NAME,
        feature_extractor_weights_path=clf, fid=True, isc=True, prc=True, cuda=False,
        cache=False, verbose=False, save_cpu_ram=True, batch_size=100, rng_seed=0)
    for key in ("frechet_inception_distance", "inception_score_mean", "precision", "recall"):
        assert math.isfinite(tf[key]), key
    assert 1.0 <= tf["inception_score_mean"] <= 10.0  # 10 classes
    q = _q(a, bundle, cache, labels=la, seed=0)
    assert q["fid"] == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    assert q["isc_mean"] == pytest.approx(tf["inception_score_mean"], rel=1e-6)
    assert math.isfinite(q["kid_mean"]) and q["quality_kid_subset_size"] == N
    assert (q["precision"], q["recall"]) == (pytest.approx(tf["precision"]), pytest.approx(tf["recall"]))
    assert q["extractor"].startswith(f"{Q.EXTRACTOR_NAME}@") and q["reference_count"] == R


def test_fast_kid_equals_torch_fidelity_both_code_paths():
    from torch_fidelity.metric_kid import kid_features_to_metric
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 16, generator=g), torch.randn(300, 16, generator=g) * 1.1 + 0.1
    for subsets, m in ((30, 100), (3, 20)):  # whole-kernel path, per-subset path (few small subsets)
        tf = kid_features_to_metric(x, y, kid_subsets=subsets, kid_subset_size=m, rng_seed=5, verbose=False)
        ours = Q.kid_features(x, y, subsets, m, seed=5)
        assert ours == (pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-5, abs=1e-7),
                        pytest.approx(tf["kernel_inception_distance_std"], rel=1e-4))


def test_blocked_distances_give_torch_fidelity_precision_recall_and_kid(monkeypatch):
    """Memory flat in N: k-NN radii and the reference × generated distances are taken a few rows at a time, KID's
    kernels too; with blocks smaller than the sets (and not dividing them) the numbers stay torch-fidelity's."""
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full
    g = torch.Generator().manual_seed(1)
    gen, ref = torch.randn(230, 8, generator=g), torch.randn(170, 8, generator=g) * 1.2 + 0.2
    monkeypatch.setattr(QS, "DIST_ROWS", 37)
    monkeypatch.setattr(QS, "KERNEL_ROWS", 29)
    precision, recall = calculate_precision_recall_full(gen, ref, 3)   # (generated, real) as torch-fidelity orders them
    assert Q.prc_features(gen, ref, 3) == (pytest.approx(precision), pytest.approx(recall))
    assert Q.knn_radii(gen, 3).shape == (230,)
    monkeypatch.setattr(QS, "DIST_BLOCK_VALUES", 230 * 11)   # blocks bounded by values: 11 rows against 230 points
    assert QS.dist_rows(230) == 11 and QS.dist_rows(10 ** 9) == 1
    assert Q.prc_features(gen, ref, 3) == (pytest.approx(precision), pytest.approx(recall))
    tf = kid_features_to_metric(gen, ref, kid_subsets=40, kid_subset_size=100, rng_seed=2, verbose=False)
    assert Q.kid_features(gen, ref, 40, 100, seed=2) == (
        pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-5, abs=1e-7),
        pytest.approx(tf["kernel_inception_distance_std"], rel=1e-4))


def test_fast_fid_equals_torch_fidelity_formula_also_below_feature_dim():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g)
    stats = Q.fid_statistics(ref)
    for n in (200, 10):  # N > D and N < D (rank-deficient covariance)
        x = torch.randn(n, 16, generator=g) * 1.3 + 0.2
        assert Q.FIDAgainst(stats)(x.double().numpy()) == pytest.approx(
            Q.fid_from_statistics(Q.fid_statistics(x), stats), rel=1e-7)


def test_fid_real_vs_real_is_within_noise_and_far_below_uniform_noise(bundle, cache, real_sets):
    (a, la), (b, lb), _ = real_sets
    qa, qb = _q(a, bundle, cache, labels=la), _q(b, bundle, cache, labels=lb)
    for q in (qa, qb):
        assert q["fid_ci_low"] <= q["fid"] <= q["fid_ci_high"]
        assert q["quality_bootstrap_stratified"] and q["quality_bootstrap"] == 100
    # two independent draws of the same distribution agree within their combined interval half-widths
    half = lambda q: (q["fid_ci_high"] - q["fid_ci_low"]) / 2  # noqa: E731
    assert abs(qa["fid"] - qb["fid"]) <= half(qa) + half(qb)
    noise = torch.randint(0, 256, a.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    qn = _q(noise, bundle, cache, labels=la)
    # "much larger", in units of the measurement's own uncertainty: the gap exceeds 10 real-set interval widths
    width = max(q["fid_ci_high"] - q["fid_ci_low"] for q in (qa, qb))
    assert qn["fid_ci_low"] - max(qa["fid_ci_high"], qb["fid_ci_high"]) > 10 * width
    assert qn["precision"] < qa["precision"] and qn["recall"] < qa["recall"]
    assert qn["kid_mean"] > qa["kid_mean"] + 2 * qa["kid_std"]  # kid_std: spread over KID subsets


def test_reference_cache_is_reused_with_identical_numbers(bundle, tmp_path, real_sets, caplog):
    (a, la), _, _ = real_sets
    caplog.set_level(logging.INFO, logger="var_bench")
    kw = dict(labels=la, bootstrap=20, cache_dir=str(tmp_path))
    first = Q.quality_metrics(a, bundle, reference_count=100, **kw)
    second = Q.quality_metrics(a, bundle, reference_count=100, **kw)
    assert (first["reference_cached"], second["reference_cached"]) == (False, True)
    key = first["quality_cache_key"]
    assert f"reusing cached reference features {key}" in caplog.messages
    assert sorted(os.listdir(tmp_path)) == [f"ref-{key}.npz"]  # atomic write: no temp files left
    skip = {"reference_cached", "quality_s"}
    assert {k: v for k, v in first.items() if k not in skip} == {k: v for k, v in second.items() if k not in skip}
    other = Q.quality_metrics(a, bundle, reference_count=101, metrics=("fid",), **kw)
    assert not other["reference_cached"] and other["quality_cache_key"] != key


def test_npz_references_stats_only_and_with_images(bundle, cache, tmp_path, real_sets):
    """An ADM-style .npz: mu/sigma alone give the same FID (PR/KID NaN, with the reason); arr_0 images, or the
    same images as PNGs in a folder, give the same numbers as the built-in reference of those images."""
    (a, la), _, ref = real_sets
    base = _q(a, bundle, cache, labels=la)
    _, stats, _, _, _ = Q.reference_features(Q.resolve_extractor(bundle), Q.parse_reference(bundle, None, R),
                                             cache_dir=cache)
    np.savez(tmp_path / "stats.npz", mu=stats["mu"], sigma=stats["sigma"])
    only = _q(a, bundle, cache, labels=la, reference=str(tmp_path / "stats.npz"))
    assert only["fid"] == pytest.approx(base["fid"], rel=1e-9) and only["fid_ci_high"] == base["fid_ci_high"]
    assert math.isnan(only["precision"]) and math.isnan(only["kid_mean"]) and "arr_0" in only["quality_notes"]
    small = _q(a, bundle, cache, labels=la, reference_count=100)
    np.savez(tmp_path / "imgs.npz", arr_0=ref[:100].permute(0, 2, 3, 1).numpy())
    imgs = _q(a, bundle, cache, labels=la, reference=str(tmp_path / "imgs.npz"), reference_count=None)
    assert imgs["reference_count"] == 100
    for k in ("fid", "precision", "recall", "kid_mean"):
        assert imgs[k] == pytest.approx(small[k], rel=1e-6), k
    from PIL import Image
    folder = tmp_path / "folder" / "some-class"
    folder.mkdir(parents=True)
    for i, im in enumerate(ref[:100].permute(0, 2, 3, 1).numpy()):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    fold = _q(a, bundle, cache, labels=la, reference=str(tmp_path / "folder"), reference_count=None)
    assert fold["reference_count"] == 100 and fold["reference"].startswith("folder:")
    assert fold["fid"] == pytest.approx(small["fid"], rel=1e-6)
    np.savez(tmp_path / "wrongdim.npz", mu=np.zeros(7), sigma=np.eye(7))
    with pytest.raises(BenchError, match="7-d"):
        Q.check_reference(bundle, N, reference=str(tmp_path / "wrongdim.npz"))


def test_npz_image_subsets_are_seeded_and_class_stratified(bundle, tmp_path):
    """A subset of an .npz's images is not its first N (files are often written class by class): stratified by
    arr_1's labels when it has them, else a seeded random subset; the description says which."""
    labels = np.repeat(np.arange(10), 10)                       # class-sorted: 10 images of each class
    imgs = np.broadcast_to(labels.astype(np.uint8)[:, None, None, None], (100, 4, 4, 3)).copy()
    imgs[:, 0, 0, 0] = np.arange(100)                          # each image identifiable
    np.savez(tmp_path / "labelled.npz", arr_0=imgs, arr_1=labels)
    ref = Q.parse_reference(bundle, str(tmp_path / "labelled.npz"), 20)
    got = QR._load_reference_images(ref)
    assert ref.count == 20 and "stratified by arr_1" in ref.desc
    assert np.bincount(got[:, 1, 1, 1].numpy(), minlength=10).tolist() == [2] * 10
    assert torch.equal(got, QR._load_reference_images(Q.parse_reference(bundle, str(tmp_path / "labelled.npz"), 20)))
    np.savez(tmp_path / "plain.npz", arr_0=imgs)
    ref = Q.parse_reference(bundle, str(tmp_path / "plain.npz"), 20)
    picked = QR._load_reference_images(ref)[:, 0, 0, 0].tolist()
    assert "random subset" in ref.desc and len(set(picked)) == 20 and picked != list(range(20))
    assert len(set(QR._load_reference_images(ref)[:, 1, 1, 1].tolist())) > 2   # not the first two classes
    full = Q.parse_reference(bundle, str(tmp_path / "plain.npz"), None)
    assert full.count == 100 and full.desc.endswith("(arr_0 100 of 100 images)")
    assert torch.equal(QR._load_reference_images(full)[:, 0, 0, 0], torch.arange(100, dtype=torch.uint8))
    np.savez(tmp_path / "badlabels.npz", arr_0=imgs, arr_1=labels[:50])
    with pytest.raises(BenchError, match="one entry per arr_0 image"):
        Q.parse_reference(bundle, str(tmp_path / "badlabels.npz"), 20)


def test_non_finite_or_misshapen_reference_statistics_are_refused(bundle, tmp_path):
    """Published mu/sigma with a NaN would make every FID NaN (and once gave a lower bound of 0): one line."""
    ex = Q.resolve_extractor(bundle)
    d = ex.feature_dim
    for name, mu, sigma, msg in (("nan", np.full(d, np.nan), np.eye(d), "non-finite"),
                                 ("inf", np.zeros(d), np.diag(np.full(d, np.inf)), "non-finite"),
                                 ("shape", np.zeros(d), np.eye(d)[:, :3], r"sigma \(D, D\)")):
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
        with pytest.raises(BenchError, match=msg) as e:
            Q.reference_features(ex, Q.parse_reference(bundle, str(tmp_path / f"{name}.npz")),
                                 cache_dir=str(tmp_path / "cache"))
        assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")   # nothing cached
    f = torch.randn(50, 4, dtype=torch.float64)
    lo, hi, _ = Q.fid_bootstrap(f, dict(mu=np.full(4, np.nan), sigma=np.eye(4)), float("nan"), 5, 0)
    assert math.isnan(lo) and math.isnan(hi)     # not max(0, nan) == 0


def test_paired_features_cache_follows_the_images(bundle, tmp_path):
    """dense's features are cached per dense entry; images regenerated under the same entry are not served the
    old features."""
    ex = Q.resolve_extractor(bundle)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    b = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    cache = str(tmp_path)
    fa = QR._paired_features(a, ex, "dense-entry", cache, None)[ex.feature_layer]
    assert len(os.listdir(cache)) == 1
    assert torch.equal(QR._paired_features(a, ex, "dense-entry", cache, None)[ex.feature_layer], fa)
    assert len(os.listdir(cache)) == 1                                             # the second call was a hit
    fb = QR._paired_features(b, ex, "dense-entry", cache, None)[ex.feature_layer]
    assert torch.equal(fb, ex.extract(b)[ex.feature_layer]) and not torch.equal(fa, fb)


def test_check_reference_rejects_bad_settings(bundle, tiny, tmp_path):
    cases = [
        (dict(samples=1, metrics=("fid",)), "FID needs >= 2 samples"),
        (dict(samples=3, metrics=("prc",)), "precision/recall need > 3 samples"),
        (dict(samples=5, metrics=("isc",)), "IS needs >= 10 samples"),
        (dict(samples=50, metrics=("prc",), reference_count=3), "reference images"),
        (dict(samples=50, metrics=("fid", "lpips")), "valid: fid, isc, prc, kid"),
        (dict(samples=50, reference=str(tmp_path / "missing")), "reference not found"),
        (dict(samples=50, inception_weights=str(tmp_path / "incep.pth")), "Inception weights not found"),
    ]
    for kw, msg in cases:
        samples = kw.pop("samples")
        with pytest.raises(BenchError, match=msg.replace("(", r"\(")) as e:
            Q.check_reference(bundle, samples, **kw)
        assert "\n" not in str(e.value)
    assert Q.check_reference(bundle, 10, reference_count=10)["reference"] == "shapes:val[0:10]@32px"
    with pytest.raises(BenchError, match="ships no quality classifier"):
        Q.check_reference(dataclasses.replace(tiny, classifier=None), 50)
    torch.save({"w": torch.zeros(2), "obj": Q.Reference}, tmp_path / "pickled.pth")  # a class: pickled code
    with pytest.raises(BenchError, match="cannot read Inception weights"):
        Q.check_reference(bundle, 50, inception_weights=str(tmp_path / "pickled.pth"))


def test_same_seed_fidelity():
    g = torch.Generator().manual_seed(0)
    pns = (1, 2, 4)
    toks = [torch.randint(0, 64, (6, p * p), generator=g) for p in pns]
    imgs = torch.rand(6, 3, 8, 8, generator=g)
    same = F.same_seed_fidelity(toks, [t.clone() for t in toks], imgs, imgs.clone())
    assert same == dict(fidelity_token_agreement=1.0, fidelity_token_agreement_per_scale=[1.0, 1.0, 1.0],
                        fidelity_psnr_db=F.PSNR_CAP_DB, psnr_to_dense_ci_low=F.PSNR_CAP_DB,
                        psnr_to_dense_ci_high=F.PSNR_CAP_DB, ssim_to_dense=1.0, ssim_to_dense_ci_low=1.0,
                        ssim_to_dense_ci_high=1.0)
    other = [t.clone() for t in toks]
    other[2][:3] = (other[2][:3] + 1) % 64  # half the rows of the last scale differ everywhere
    noisy = imgs + 0.01 * torch.randn(imgs.shape, generator=g)  # MSE 1e-4 -> 40 dB
    r = F.same_seed_fidelity(other, toks, noisy, imgs)
    assert r["fidelity_token_agreement_per_scale"] == [1.0, 1.0, 0.5]
    assert r["fidelity_token_agreement"] == pytest.approx((6 * 1 + 6 * 4 + 3 * 16) / (6 * 21))
    assert r["fidelity_psnr_db"] == pytest.approx(40.0, abs=0.5)
    with pytest.raises(BenchError):
        F.same_seed_fidelity(toks[:2], toks, imgs, imgs)


OLD_KEYS = {   # quality_metrics' keys with paired images, before the per-sample intervals and quality_level
    "fid", "fid_ci_low", "fid_ci_high", "isc_mean", "isc_std", "precision", "recall", "kid_mean", "kid_std",
    "class_accuracy", "fid_delta", "fid_delta_ci_low", "fid_delta_ci_high", "fid_delta_pct",
    "fid_delta_samples_for_1pct", "precision_delta", "recall_delta", "isc_delta", "class_accuracy_delta",
    "class_accuracy_delta_ci_low", "class_accuracy_delta_ci_high", "extractor", "reference", "reference_count",
    "reference_cached", "reference_split", "quality_samples", "quality_metrics", "quality_bootstrap", "quality_seed",
    "quality_bootstrap_stratified", "quality_kid_subset_size", "quality_isc_splits", "quality_prc_neighborhood",
    "quality_cache_key", "quality_notes", "quality_s"}
NEW_KEYS = {"precision_delta_ci_low", "precision_delta_ci_high", "recall_delta_ci_low", "recall_delta_ci_high",
            "quality_level"}


def test_paired_precision_recall_intervals_and_the_level(bundle, cache, real_sets):
    """quality_metrics with dense's images: the old keys with the same values as the estimates they always were,
    plus the Δprecision/Δrecall intervals and quality_level; level=0.99 widens every interval; dense against itself
    gets [0, 0]."""
    (a, la), (b, _), _ = real_sets
    kw = dict(labels=la, bootstrap=30, paired_images=b)
    q = _q(a, bundle, cache, **kw)
    assert set(q) - OLD_KEYS == NEW_KEYS and OLD_KEYS <= set(q)
    assert q["quality_level"] == 0.95
    base = _q(b, bundle, cache, labels=la, metrics=("prc",))
    assert q["precision_delta"] == pytest.approx(q["precision"] - base["precision"])
    assert q["recall_delta"] == pytest.approx(q["recall"] - base["recall"])
    for m in ("precision_delta", "recall_delta", "fid_delta", "class_accuracy_delta"):
        lo, hi = q[f"{m}_ci_low"], q[f"{m}_ci_high"]
        assert lo <= q[m] <= hi and (lo < hi or m == "class_accuracy_delta"), m   # both sets may be all correct
    wide = _q(a, bundle, cache, level=0.99, **kw)
    assert wide["quality_level"] == 0.99
    follow = ("quality_level", "quality_s", "reference_cached", "fid_delta_samples_for_1pct")   # N for the width
    same_estimates = lambda r: {k: v for k, v in r.items()   # noqa: E731
                                if not k.endswith(("_ci_low", "_ci_high")) and k not in follow}
    assert same_estimates(wide) == same_estimates(q)
    assert wide["fid_delta_samples_for_1pct"] >= q["fid_delta_samples_for_1pct"]
    for m in ("fid", "precision_delta", "recall_delta", "fid_delta", "class_accuracy_delta"):
        assert wide[f"{m}_ci_low"] <= q[f"{m}_ci_low"] and wide[f"{m}_ci_high"] >= q[f"{m}_ci_high"], m
    same = _q(a, bundle, cache, labels=la, bootstrap=30, paired_images=a, metrics=("prc",))
    assert [same[k] for k in ("precision_delta", "precision_delta_ci_low", "precision_delta_ci_high",
                              "recall_delta", "recall_delta_ci_low", "recall_delta_ci_high")] == [0.0] * 6
    with pytest.raises(BenchError, match="level"):
        _q(a, bundle, cache, level=95)


def test_evaluate_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    from bench.cli import main
    out = tmp_path / "cert.json"
    r = run_cli("evaluate", "--model", "tiny", "--samples", "1", "--out", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--samples" in r.stderr
    for args, msg in ((["--model", "no-such-model"], "unknown model"),
                      (["--model", "tiny", "--out", str(tmp_path / "nodir" / "c.json")], "does not exist"),
                      (["--model", "tiny", "--out", str(tmp_path / "c.txt")], ".json")):
        with pytest.raises(SystemExit) as e:
            main(["evaluate", *args] + ([] if "--out" in args else ["--out", str(out)]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.strip().count("\n") == 0
    assert os.listdir(tmp_path) == []


def test_evaluate_end_to_end_tiny(clf, tmp_path, monkeypatch, capsys):
    """Small run of the whole command: a JSON with every number, the floor (real) below the ceiling (untrained)."""
    from bench.cli import main
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cert.json"
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", "tiny", "--samples", "12", "--reference-count", "60", "--bootstrap", "20",
              "--batch-size", "6", "--classifier", clf, "--out", str(out)])
    assert e.value.code == 0
    rep = json.loads(out.read_text())
    assert rep["samples"] == 12 and rep["reference_count"] == 60 and rep["seed"] == 0
    assert set(rep["rows"]) == {"dense", "real_test", "untrained"}
    for row in rep["rows"].values():
        assert row["images"] == 12 and row["fid"] is not None and 0 <= row["classifier_accuracy"] <= 1
    assert rep["rows"]["real_test"]["fid_ci_high"] < rep["rows"]["untrained"]["fid_ci_low"]
    assert rep["env_threads"] >= 1 and rep["env_device"] == "cpu" and rep["started_at"] <= rep["finished_at"]
    assert "real held-out images" in capsys.readouterr().out


def test_class_accuracy_and_its_paired_interval():
    """Conditional accuracy of samples, and the paired stratified bootstrap of its difference to dense: the same
    resample indices for both, so a method that fixes one sample and breaks none gets a delta of +1/N whose
    interval excludes negative values."""
    from bench.quality import class_accuracy, paired_accuracy_bootstrap
    labels = torch.arange(40) % 4
    dense = torch.nn.functional.one_hot(labels, 4).float()
    dense[:10] = torch.nn.functional.one_hot((labels[:10] + 1) % 4, 4).float()   # dense misses 10 of 40
    method = dense.clone()
    method[0] = torch.nn.functional.one_hot(labels[:1], 4).float()               # the method fixes one of them
    assert class_accuracy(dense, labels) == 0.75 and class_accuracy(method, labels) == 31 / 40
    d, lo, hi = paired_accuracy_bootstrap(method, dense, labels, 200, seed=0)
    assert d == pytest.approx(1 / 40) and 0 <= lo <= d <= hi
    assert paired_accuracy_bootstrap(dense, dense, labels, 200, seed=0) == (0.0, 0.0, 0.0)
    worse = dense.clone()
    worse[10:30] = torch.nn.functional.one_hot((labels[10:30] + 2) % 4, 4).float()
    d, lo, hi = paired_accuracy_bootstrap(worse, dense, labels, 200, seed=0)
    assert d == pytest.approx(-0.5) and hi < 0                                   # resolved worse


def test_evaluate_any_model_against_a_reference_folder(clf, tmp_path, monkeypatch):
    """`evaluate --reference DIR` (no longer read as --reference-count) certifies a model without a built-in
    held-out set: dense and untrained rows against the folder; no floor, since there is no second held-out set."""
    from bench.cli import main
    from tests.imagefolder import make_image_folder
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    ref = make_image_folder(tmp_path / "ref", per_class=(12, 12, 12, 12))
    out = tmp_path / "cert.json"
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--model", "tiny", "--samples", "12", "--reference", ref, "--reference-count", "24",
              "--bootstrap", "10", "--batch-size", "6", "--classifier", clf, "--out", str(out)])
    assert e.value.code == 0
    rep = json.loads(out.read_text())
    assert rep["reference_count"] == 24 and rep["reference"].startswith("folder:")
    assert rep["rows"]["real_test"]["images"] == 0
    for key in ("dense", "untrained"):
        assert rep["rows"][key]["fid"] is not None and 0 <= rep["rows"][key]["classifier_accuracy"] <= 1
