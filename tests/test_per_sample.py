"""Per-sample measures with intervals: same-seed PSNR/SSIM to dense (bench/fidelity.py), paired Δprecision/Δrecall
(bench/quality/).

Small synthetic sets only: images and features are built here, nothing is generated or extracted."""
import numpy as np
import pytest
import torch

from bench import fidelity as F
from bench import quality as Q
from bench.quality.statistics import _strata
from bench.errors import BenchError


def _tokens(n, g):
    return [torch.randint(0, 64, (n, p * p), generator=g) for p in (1, 2)]


def _noisy_pair(n, seed=0, side=16):
    """Reference images and a perturbation of them whose strength varies per image (per-image PSNR/SSIM vary)."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(n, 3, side, side, generator=g)
    sigma = 0.01 + 0.03 * torch.rand(n, 1, 1, 1, generator=g)
    return (ref + sigma * torch.randn(ref.shape, generator=g)).clamp(0, 1), ref


def _numbers(r):
    return {k: v for k, v in r.items() if not isinstance(v, list)}


def _fid(images, ref, **kw):
    toks = _tokens(len(images), torch.Generator().manual_seed(1))
    return F.same_seed_fidelity(toks, toks, images, ref, **kw)


def test_identical_images_ssim_one_psnr_capped_zero_width_intervals():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(12, 3, 16, 16, generator=g)
    r = _fid(imgs, imgs.clone(), labels=torch.arange(12) % 3)
    assert r["fidelity_psnr_db"] == F.PSNR_CAP_DB and r["ssim_to_dense"] == 1.0
    assert r["psnr_to_dense_ci_low"] == r["psnr_to_dense_ci_high"] == F.PSNR_CAP_DB
    assert r["ssim_to_dense_ci_low"] == r["ssim_to_dense_ci_high"] == 1.0
    none = _fid(imgs, imgs.clone(), resamples=0)   # no resamples: the estimates without intervals
    assert none["ssim_to_dense"] == 1.0 and none["fidelity_psnr_db"] == F.PSNR_CAP_DB
    assert [none[k] for k in ("psnr_to_dense_ci_low", "psnr_to_dense_ci_high", "ssim_to_dense_ci_low",
                              "ssim_to_dense_ci_high")] == [None] * 4


def test_chunks_identical_to_dense_skip_the_ssim_pass(monkeypatch):
    """A chunk whose images all equal dense's is 1 by definition: no SSIM work (dense measured against itself pays
    none); a chunk with one differing image runs it."""
    import torchmetrics.functional.image as TM
    calls = []
    real = TM.structural_similarity_index_measure
    monkeypatch.setattr(TM, "structural_similarity_index_measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(F, "FIDELITY_CHUNK_VALUES", 4 * 3 * 16 * 16)   # 4 images a chunk: 3 chunks
    imgs = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert _fid(imgs, imgs.clone())["ssim_to_dense"] == 1.0 and calls == []
    other = imgs.clone()
    other[9] = 1 - other[9]
    r = _fid(imgs, other)
    assert len(calls) == 1 and r["ssim_to_dense"] < 1.0


def test_ssim_is_the_librarys_value_also_chunked(monkeypatch):
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim
    images, ref = _noisy_pair(10)
    want = ssim(images, ref, data_range=1.0, reduction="none")   # float32, as same_seed_fidelity runs it
    whole = _fid(images, ref)
    monkeypatch.setattr(F, "FIDELITY_CHUNK_VALUES", 3 * images[0].numel())   # 4 chunks of <= 3 images
    chunked = _fid(images, ref)
    assert whole["ssim_to_dense"] == pytest.approx(float(want.double().mean()), rel=1e-9)
    exact = ssim(images.double(), ref.double(), data_range=1.0, reduction="none")   # float32 costs < 1e-6
    assert whole["ssim_to_dense"] == pytest.approx(float(exact.mean()), abs=1e-6)
    assert _numbers(chunked) == pytest.approx(_numbers(whole), rel=1e-6)
    # constant images: SSIM = (2·a·b + C1) / (a² + b² + C1), C1 = (0.01·1)², the structure terms are 1;
    # PSNR of a 0.1 offset: 20 dB
    a, b = torch.full((4, 3, 16, 16), 0.5), torch.full((4, 3, 16, 16), 0.6)
    r = _fid(a, b)
    c1 = 0.01 ** 2
    assert r["ssim_to_dense"] == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1), rel=1e-6)
    assert r["fidelity_psnr_db"] == pytest.approx(20.0, rel=1e-6)


def test_intervals_contain_the_estimate_and_narrow_with_n():
    widths = {}
    for n in (30, 600):
        r = _fid(*_noisy_pair(n, seed=n))
        for m, est in (("psnr_to_dense", "fidelity_psnr_db"), ("ssim_to_dense", "ssim_to_dense")):
            lo, hi = r[f"{m}_ci_low"], r[f"{m}_ci_high"]
            assert lo < r[est] < hi, (n, m)
            widths[n, m] = hi - lo
    for m in ("psnr_to_dense", "ssim_to_dense"):
        assert widths[600, m] < 0.5 * widths[30, m]   # 1/sqrt(20) expected


def test_stratified_resampling_keeps_class_counts():
    """Each class's images get their own constant offset, so the mean over images depends only on how many images
    of each class a resample holds: stratified resamples keep the counts (zero width), unstratified ones do not."""
    labels = torch.arange(40) % 4
    ref = torch.full((40, 3, 8, 8), 0.5)
    images = ref + (0.01 * (1 + labels.double())).view(-1, 1, 1, 1).float()
    strat = _fid(images, ref, labels=labels)
    plain = _fid(images, ref)
    for m in ("psnr_to_dense", "ssim_to_dense"):
        assert strat[f"{m}_ci_high"] - strat[f"{m}_ci_low"] == pytest.approx(0, abs=1e-9)
        assert plain[f"{m}_ci_high"] - plain[f"{m}_ci_low"] > 1e-6
    with pytest.raises(BenchError, match="differ in count"):
        _fid(images, ref, labels=labels[:10])


def test_level_099_is_at_least_as_wide_as_095_and_levels_are_checked():
    images, ref = _noisy_pair(50)
    r95, r99 = _fid(images, ref, level=0.95), _fid(images, ref, level=0.99)
    for m in ("psnr_to_dense", "ssim_to_dense"):
        assert r99[f"{m}_ci_low"] <= r95[f"{m}_ci_low"] and r99[f"{m}_ci_high"] >= r95[f"{m}_ci_high"]
        assert r99[f"{m}_ci_high"] - r99[f"{m}_ci_low"] > r95[f"{m}_ci_high"] - r95[f"{m}_ci_low"]
    assert _fid(images, ref, seed=1) != _fid(images, ref, seed=0)
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(BenchError, match="level"):
            _fid(images, ref, level=bad)
    with pytest.raises(BenchError, match="resamples"):
        _fid(images, ref, resamples=-1)


def test_tiny_images_have_no_ssim():
    images, ref = _noisy_pair(6, side=4)
    r = _fid(images, ref)
    assert r["ssim_to_dense"] is None and r["ssim_to_dense_ci_low"] is None and r["ssim_to_dense_ci_high"] is None
    assert r["fidelity_psnr_db"] is not None and r["psnr_to_dense_ci_low"] <= r["fidelity_psnr_db"]


def _features(n, shift=0.0, seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def test_prc_indicators_are_the_precision_recall_of_prc_features():
    gen, ref = _features(80, 0.3), _features(120, seed=1)
    p, r = Q.prc_indicators(gen, ref)
    assert p.shape == (80,) and r.shape == (120,) and p.dtype == r.dtype == torch.bool
    assert (p.float().mean().item(), r.float().mean().item()) == Q.prc_features(gen, ref)


def test_precision_recall_delta_intervals():
    """The paired intervals paired_quality reports: the same resample indices for both arms (precision: over the
    generated samples, class-stratified; recall: over the reference points, generated sets fixed)."""
    labels = torch.arange(100) % 5
    ref = _features(150, seed=1)
    method, dense = _features(100, 0.8, seed=2), _features(100, 0.0, seed=3)
    mp, mr = Q.prc_indicators(method, ref)
    dp, dr = Q.prc_indicators(dense, ref)
    p_delta = mp.float().mean().item() - dp.float().mean().item()
    r_delta = mr.float().mean().item() - dr.float().mean().item()
    assert p_delta < 0 and r_delta != 0
    p95 = Q.paired_mean_interval(mp, dp, p_delta, _strata(labels, 100), 200, 0, 0.95)
    r95 = Q.paired_mean_interval(mr, dr, r_delta, [np.arange(150)], 200, 0, 0.95)
    for (lo, hi), est in ((p95, p_delta), (r95, r_delta)):
        assert lo < est < hi
    assert p95[1] < 0   # the shifted method is resolved worse in precision
    p99 = Q.paired_mean_interval(mp, dp, p_delta, _strata(labels, 100), 200, 0, 0.99)
    assert p99[0] <= p95[0] and p99[1] >= p95[1]
    # identical sets (dense itself): [0, 0], with or without resamples; different sets without resamples: none
    assert Q.paired_mean_interval(dp, dp.clone(), 0.0, _strata(labels, 100), 200, 0) == (0.0, 0.0)
    assert Q.paired_mean_interval(dr, dr.clone(), 0.0, [np.arange(150)], 0, 0) == (0.0, 0.0)
    assert Q.paired_mean_interval(mp, dp, p_delta, _strata(labels, 100), 0, 0) == (None, None)
    with pytest.raises(BenchError, match="differ in count"):
        Q.paired_mean_interval(mp, dr, 0.0, [np.arange(100)], 10, 0)


def test_paired_accuracy_bootstrap_numbers_are_unchanged_by_the_shared_resampler():
    """paired_accuracy_bootstrap now draws through _resampled_means: the same rng calls in the same order."""
    labels = torch.arange(60) % 3
    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 3, generator=g)
    b = torch.randn(60, 3, generator=g)
    lab = labels.numpy()
    x = (a.argmax(1).numpy() == lab).astype(float)
    y = (b.argmax(1).numpy() == lab).astype(float)
    d, groups, rng = x - y, _strata(labels, 60), np.random.default_rng(4)
    boot = np.array([d[np.concatenate([g_[rng.integers(0, len(g_), len(g_))] for g_ in groups])].mean()
                     for _ in range(50)])
    lo, hi = np.quantile(boot, [0.05, 0.95])
    assert Q.paired_accuracy_bootstrap(a, b, labels, 50, 4, level=0.9) == (pytest.approx(d.mean()), lo, hi)


def test_large_n_runs_chunk_wise(monkeypatch):
    """Many small images in many chunks: per-image values agree with one pass over all of them."""
    images, ref = _noisy_pair(3000, side=8)
    whole = _fid(images, ref, resamples=10)
    monkeypatch.setattr(F, "FIDELITY_CHUNK_VALUES", 700 * images[0].numel())
    assert _numbers(_fid(images, ref, resamples=10)) == pytest.approx(_numbers(whole), rel=1e-6)


def test_uint8_images_give_exactly_the_float_numbers_chunk_by_chunk(monkeypatch):
    """uint8 images are read as value/255 one chunk at a time: the same numbers, bit for bit, as the float copy of
    the whole set that callers made before (no float copy of N images is held)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 256, (9, 3, 16, 16), generator=g, dtype=torch.uint8)
    b = a.clone()
    b[:, :, :4] = torch.randint(0, 256, (9, 3, 4, 16), generator=g, dtype=torch.uint8)
    b[0] = a[0]   # one identical pair: PSNR capped, SSIM exactly 1
    labels = torch.arange(9) % 3
    monkeypatch.setattr(F, "FIDELITY_CHUNK_VALUES", 2 * a[0].numel())   # 5 chunks
    as_float = _fid(a.float().div(255), b.float().div(255), labels=labels, resamples=20)
    assert _fid(a, b, labels=labels, resamples=20) == as_float
    assert _fid(a, b.float().div(255), labels=labels, resamples=20) == as_float   # mixed: each side converted
