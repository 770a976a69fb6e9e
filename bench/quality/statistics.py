"""The statistics of the quality metrics: FID statistics, bootstrap and paired intervals, KID, k-NN precision/recall.

FID is torch-fidelity's function of the features; KID and precision/recall give torch-fidelity's numbers (tested) by
faster routes (one kernel pass; cached reference k-NN radii, distances in row blocks); the FID bootstrap resamples
the same generated features (no second extraction).
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import numpy as np
import torch

from bench.errors import BenchError
from bench.memory import release_freed_memory

KID_SUBSETS = 100                          # torch-fidelity's default
KID_SUBSET_SIZE = 1000                     # torch-fidelity's default, lowered to min(N, reference) for small sets
PRC_NEIGHBORHOOD = 3                       # k of the k-NN manifold (Kynkäänniemi et al.; torch-fidelity default)


@contextlib.contextmanager
def single_threaded(enabled: bool = True):
    """Run small LAPACK work (128×128 eigen-decompositions, a hundred times per bootstrap) on one thread: with
    two threads on a busy 2-core machine they spin-wait and run 10-50x slower (measured: 8.4 s vs 0.6 s)."""
    if not enabled:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits  # numpy's BLAS (scikit-learn's dependency)
        except ImportError:
            yield
        else:
            with threadpool_limits(1):
                yield
    finally:
        torch.set_num_threads(threads)


def fid_statistics(features: torch.Tensor) -> dict:
    """torch-fidelity's mu/sigma, in float64."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    return fid_features_to_statistics(features.double().cpu())


def fid_from_statistics(stats_1: dict, stats_2: dict) -> float:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    s1 = {k: np.asarray(v, np.float64) for k, v in stats_1.items()}
    s2 = {k: np.asarray(v, np.float64) for k, v in stats_2.items()}
    return float(fid_statistics_to_metric(s1, s2, False)[KEY_METRIC_FID])


class FIDAgainst:
    """FID of feature sets against fixed reference statistics, fast enough to bootstrap.

    tr sqrt(Σ_g Σ_r) is the sum of singular values of X_c·Σ_r^½ / sqrt(N-1) (X_c: centred generated features),
    since Σ_g Σ_r and Σ_r^½ Σ_g Σ_r^½ share eigenvalues: a symmetric eigen-decomposition of the smaller Gram
    matrix per resample instead of a D×D non-symmetric one. Equal to torch-fidelity's formula up to rounding (tested)."""

    def __init__(self, ref_stats: dict):
        self.mu = torch.as_tensor(np.asarray(ref_stats["mu"], np.float64))
        sigma = torch.as_tensor(np.asarray(ref_stats["sigma"], np.float64))
        w, v = torch.linalg.eigh(sigma)
        self.sqrt_sigma = (v * w.clamp(min=0).sqrt()) @ v.T
        self.trace = float(sigma.trace())

    def __call__(self, feats) -> float:
        feats = torch.as_tensor(feats, dtype=torch.float64)
        n = len(feats)
        mu = feats.mean(0)
        xc = feats - mu
        m = xc @ self.sqrt_sigma
        gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
        nuc = float(torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum()) / math.sqrt(n - 1)
        d = mu - self.mu
        return float(d @ d) + float((xc * xc).sum()) / (n - 1) + self.trace - 2 * nuc


def fid_bootstrap(features: torch.Tensor, ref_stats: dict, fid: float, resamples: int, seed: int,
                  labels: Optional[torch.Tensor] = None, level: float = 0.95) -> Tuple[float, float, np.ndarray]:
    """95% interval of the FID estimate at this sample count, from resampling the generated features.

    - With `labels` (the conditioning classes), resampling is stratified: each class keeps its count, as the
      sampling design fixes it. Unstratified resamples unbalance the classes, and in a class-clustered feature
      space that alone inflates FID several-fold (measured: bootstrap spread 7x the spread over independent
      balanced sets; stratified: within 1.2-1.4x).
    - Resampling with replacement duplicates samples, which biases FID upwards (the bootstrap mean sits above the
      estimate by about the estimate's own finite-N bias). The interval is the bootstrap percentiles shifted by
      that offset, [FID + q_lo - mean, FID + q_hi - mean]: the spread of FID at this N, centred on the estimate.
    The reference statistics are held fixed."""
    f = features.double().cpu()
    groups = _strata(labels, len(f))
    fid_of = FIDAgainst(ref_stats)
    rng = np.random.default_rng(seed)
    boot = np.array([fid_of(f[torch.from_numpy(np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]))])
                     for _ in range(resamples)])
    lo_q, hi_q = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    shift = fid - float(boot.mean())
    lo = float(lo_q) + shift
    return (max(0.0, lo) if math.isfinite(lo) else lo), float(hi_q) + shift, boot   # max(0, nan) would be 0


INTERVALS = ("percentile", "normal")   # bootstrap intervals: centred percentiles, or estimate ± z·sd


def _strata(labels: Optional[torch.Tensor], n: int) -> List[np.ndarray]:
    if labels is None:
        return [np.arange(n)]
    lab = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    if len(lab) != n:
        raise BenchError(f"labels ({len(lab)}) and images ({n}) differ in count")
    return [np.flatnonzero(lab == c) for c in np.unique(lab)]


def _check_level(level: float) -> float:
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise BenchError(f"interval level must be in (0, 1), got {level!r}")
    return float(level)


def _resampled_means(values: np.ndarray, groups: List[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of per-sample values; each stratum (group of indices) keeps its
    count. The rng conventions of every bootstrap here: default_rng(seed), strata drawn in order."""
    rng = np.random.default_rng(seed)
    return np.array([values[np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])].mean()
                     for _ in range(resamples)])


def mean_interval(values, estimate: float, groups: List[np.ndarray], resamples: int, seed: int,
                  level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval at `level` of the mean of per-sample values (stratified by `groups`, see
    _strata). (None, None) without resamples; [estimate, estimate] when every value is equal (every resample
    has that mean; not left to rounding)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if resamples < 1 or values.size == 0:
        return None, None
    if np.ptp(values) == 0:
        return estimate, estimate
    lo, hi = np.quantile(_resampled_means(values, groups, resamples, seed), [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_mean_interval(a, b, delta: float, groups: List[np.ndarray], resamples: int, seed: int,
                         level: float = 0.95) -> Tuple[Optional[float], Optional[float]]:
    """Interval of mean(a) - mean(b) for paired per-sample values (a[i], b[i] share label and seed): the same
    resample indices for both, i.e. mean_interval of a - b. Identical arms give [delta, delta] even without
    resamples, as paired_fid_bootstrap and paired_accuracy_bootstrap do."""
    a = np.asarray(torch.as_tensor(a).cpu().double()).reshape(-1)
    b = np.asarray(torch.as_tensor(b).cpu().double()).reshape(-1)
    if a.shape != b.shape:
        raise BenchError(f"paired per-sample values differ in count: {a.size} vs {b.size}")
    if np.array_equal(a, b):
        return delta, delta
    return mean_interval(a - b, delta, groups, resamples, seed, level)


def paired_fid_bootstrap(features: torch.Tensor, dense_features: torch.Tensor, ref_stats: dict, resamples: int,
                         seed: int, labels: Optional[torch.Tensor] = None, level: float = 0.95,
                         interval: str = "percentile") -> Tuple[float, float, float, np.ndarray]:
    """FID(method) - FID(dense) and its 95% interval, from a paired bootstrap: sample i of the method and of
    dense share label and seed, so each resample draws the SAME indices (class-stratified, as fid_bootstrap) from
    both feature sets and takes the difference of their FIDs. What the two share (which classes and seeds were
    drawn, the reference) cancels, leaving the spread of the difference itself. The interval is centred on the
    estimate as in fid_bootstrap. interval="normal": delta ± z·sd(resampled deltas) instead of the percentiles, for
    levels whose tails hold too few resamples to read percentiles from (bench/resolve.py's corrected levels).
    Returns (delta, low, high, resampled deltas)."""
    if interval not in INTERVALS:
        raise BenchError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    f, g = features.double().cpu(), dense_features.double().cpu()
    if f.shape != g.shape:
        raise BenchError(f"paired features differ in shape: {tuple(f.shape)} vs {tuple(g.shape)}")
    groups = _strata(labels, len(f))
    fid_of = FIDAgainst(ref_stats)
    delta = fid_from_statistics(fid_statistics(f), ref_stats) - fid_from_statistics(fid_statistics(g), ref_stats)
    if torch.equal(f, g):   # identical sets: every resample differs by exactly 0
        return 0.0, 0.0, 0.0, np.zeros(resamples)
    if resamples < 1:       # --bootstrap 0: the estimate without an interval
        return delta, float("nan"), float("nan"), np.zeros(0)
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples)
    for r in range(resamples):
        idx = torch.from_numpy(np.concatenate([grp[rng.integers(0, len(grp), len(grp))] for grp in groups]))
        boot[r] = fid_of(f[idx]) - fid_of(g[idx])
    if interval == "normal":
        from scipy.stats import norm
        half = float(norm.ppf(1 - (1 - level) / 2)) * float(boot.std(ddof=1)) if resamples > 1 else float("nan")
        return delta, delta - half, delta + half, boot
    lo_q, hi_q = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    shift = delta - float(boot.mean())
    return delta, float(lo_q) + shift, float(hi_q) + shift, boot



def samples_for_halfwidth(n: int, halfwidth: float, target: float) -> Optional[int]:
    """Sample count at which an interval of `halfwidth` at n samples shrinks to `target`, assuming the 1/sqrt(N)
    scaling of a mean (an estimate: FID's finite-N bias is not a mean). None when either is not positive."""
    if not (halfwidth > 0 and target > 0) or not math.isfinite(halfwidth):
        return None
    return int(math.ceil(n * (halfwidth / target) ** 2))


KERNEL_ROWS = 256   # KID kernel rows per block: 256 × 60,000 float64 = 123 MB (2048 rows held 1 GB at 60k)


def kid_features(features_1: torch.Tensor, features_2: torch.Tensor, subsets: int = KID_SUBSETS,
                 subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> Tuple[float, float]:
    """torch-fidelity's KID, same numbers (tested): polynomial kernel (x·y/D + 1)³, unbiased MMD² (its `mmd2`)
    averaged over `subsets` random subsets drawn exactly as torch-fidelity draws them.

    Faster when it pays: torch-fidelity evaluates three m×m kernels per subset with numpy `** 3` (~20 s for 100
    subsets of 1000 on 2 cores). Here each kernel over all samples/reference is evaluated once, in row blocks, and
    every subset's block sums come from one matrix product with the subsets' 0/1 membership matrix."""
    f1, f2 = features_1.double().cpu(), features_2.double().cpu()
    n1, n2, d = len(f1), len(f2), f1.shape[1]
    m = subset_size
    rng = np.random.RandomState(seed)
    draws = [(rng.choice(n1, m, replace=False), rng.choice(n2, m, replace=False)) for _ in range(subsets)]
    gamma = 1.0 / d

    def kernel(x, y):
        return (x @ y.T).mul_(gamma).add_(1).pow_(3)

    if (n1 * n1 + n1 * n2 + n2 * n2) * (d + subsets) > subsets * 3 * m * m * d:  # per-subset kernels are cheaper
        from torch_fidelity.metric_kid import mmd2
        mmds = np.array([mmd2(kernel(x, x).numpy(), kernel(x, y).numpy(), kernel(y, y).numpy())
                         for a, b in draws for x, y in [(f1[torch.from_numpy(a)], f2[torch.from_numpy(b)])]])
        return float(np.mean(mmds)), float(np.std(mmds))
    wx, wy = torch.zeros(n1, subsets, dtype=torch.float64), torch.zeros(n2, subsets, dtype=torch.float64)
    for s, (a, b) in enumerate(draws):
        wx[torch.from_numpy(a), s] = 1
        wy[torch.from_numpy(b), s] = 1

    def block_sums(x, y, wr, wc, rows=KERNEL_ROWS):  # diag(wr^T K(x, y) wc) without holding K
        return sum((wr[i:i + rows] * (kernel(x[i:i + rows], y) @ wc)).sum(0) for i in range(0, len(x), rows))

    sum_xx, sum_yy, sum_xy = block_sums(f1, f1, wx, wx), block_sums(f2, f2, wy, wy), block_sums(f1, f2, wx, wy)
    diag_x = wx.T @ (f1 * f1).sum(1).mul_(gamma).add_(1).pow_(3)
    diag_y = wy.T @ (f2 * f2).sum(1).mul_(gamma).add_(1).pow_(3)
    mmds = ((sum_xx - diag_x + sum_yy - diag_y) / (m * (m - 1)) - 2 * sum_xy / (m * m)).numpy()
    return float(np.mean(mmds)), float(np.std(mmds))


CDIST_ROWS = 10000   # torch-fidelity's calc_cdist_full block: column blocks of this size give its numbers exactly
DIST_ROWS = 1000     # rows of a distance block held at once, at most
DIST_BLOCK_VALUES = 1_000_000   # and at most this many distances (4 MB float32; with cdist's and kthvalue's temporaries
                                # ~30 MB): flat in N (1000 × 60,000 rows held 240 MB; 5M values ~150 MB at 5000)


def dist_rows(columns: int) -> int:
    """Rows of a distance block against `columns` points: DIST_ROWS, fewer where that would exceed DIST_BLOCK_VALUES."""
    return max(1, min(DIST_ROWS, DIST_BLOCK_VALUES // max(1, columns)))


def knn_radii(features: torch.Tensor, k: int = PRC_NEIGHBORHOOD) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour (itself excluded), as torch-fidelity computes it, one
    block of dist_rows(N) rows at a time: the full N×N matrix would hold 14 GB at N = 60,000."""
    from torch_fidelity.metric_prc import calc_cdist_full
    # written into one tensor: small per-block results kept among the freed blocks fragment the heap (RSS grows)
    radii = torch.empty(len(features), dtype=features.dtype, device=features.device)
    rows = dist_rows(len(features))
    for s in range(0, len(features), rows):
        radii[s:s + rows] = calc_cdist_full(features[s:s + rows], features, CDIST_ROWS).kthvalue(k + 1, dim=1).values
    return radii


def prc_indicators(gen: torch.Tensor, ref: torch.Tensor, k: int = PRC_NEIGHBORHOOD,
                   ref_radii: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-sample indicators whose means are improved precision and recall: (bool (n_gen,): generated sample
    inside some reference point's k-NN ball, bool (n_ref,): reference point inside some generated sample's ball).
    The reference × generated distances are taken dist_rows(n_gen) reference rows at a time (5000 × 60,000 at once:
    1.2 GB)."""
    from torch_fidelity.metric_prc import calc_cdist_full
    gen_radii = knn_radii(gen, k)
    ref_radii = knn_radii(ref, k) if ref_radii is None else ref_radii.to(gen_radii.device)
    precision = torch.zeros(len(gen), dtype=torch.bool, device=gen_radii.device)
    recall = torch.zeros(len(ref), dtype=torch.bool, device=gen_radii.device)
    rows = dist_rows(len(gen))
    for s in range(0, len(ref), rows):
        dist = calc_cdist_full(ref[s:s + rows], gen, CDIST_ROWS)
        recall[s:s + rows] = (dist <= gen_radii).any(dim=1)                             # real inside generated
        precision |= (dist <= ref_radii[s:s + rows, None]).any(dim=0)                  # generated inside real
    release_freed_memory()
    return precision, recall


def prc_features(gen: torch.Tensor, ref: torch.Tensor, k: int = PRC_NEIGHBORHOOD,
                 ref_radii: Optional[torch.Tensor] = None) -> Tuple[float, float]:
    """torch-fidelity's improved precision/recall (`calculate_precision_recall_full`, same numbers, tested), with
    the reference's k-NN radii — the n_ref² part of the work — passed in from the reference cache."""
    precision, recall = prc_indicators(gen, ref, k, ref_radii)
    return precision.float().mean().item(), recall.float().mean().item()
