"""Analytic multiply-accumulate counts of VAR generation (../shared/METHODS.md §2), per scale.

Scale k has n_k = p_k² tokens and cache length L_k = Σ_{j≤k} n_j; with CFG each image is β = 2 rows.
Per scale: projections β·d·n_k·4C², scores β·d·2·n_k·L_k·C, FFN β·d·n_k·2·C·H (H = FFN width),
head β·n_k·C·V, adaLN β·(6d+2)·C², word embedding n_k·Cvae·C for k ≥ 1 (embedded once, then repeated).
Methods reuse the components: e.g. DMoE replaces the FFN term by 2·C·e per (token, selected expert).

A method's analytic count is its routed work (the (token, expert) pairs its routing selected); inside
counting_executed() expert layers count the work their kernels ran instead (methods/_experts.macs_pairs: every
expert on masked-dense calls), which bench/measure.py reports as macs_executed_all.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List

_EXECUTED: List[bool] = []


@contextlib.contextmanager
def counting_executed():
    """Analytic counts inside count the MACs that ran rather than the routed ones."""
    _EXECUTED.append(True)
    try:
        yield
    finally:
        _EXECUTED.pop()


def executed_counting() -> bool:
    return bool(_EXECUTED)


@dataclass
class ScaleMACs:
    projections: float
    scores: float
    ffn: float
    head: float
    adaln: float
    word_embed: float

    @property
    def total(self) -> float:
        return self.projections + self.scores + self.ffn + self.head + self.adaln + self.word_embed

    def as_dict(self) -> Dict[str, float]:
        d = dict(self.__dict__)
        d["total"] = self.total
        return d


def dense_scale_macs(cfg, batch: int = 1, cfg_guidance: bool = True) -> List[ScaleMACs]:
    """Per-scale MACs of the dense transformer generating `batch` images (cfg: a VARConfig)."""
    beta = 2 if cfg_guidance else 1
    C, d, V = cfg.embed_dim, cfg.depth, cfg.vocab_size
    H = round(C * cfg.mlp_ratio)
    out, L = [], 0
    for k, p in enumerate(cfg.patch_nums):
        n = p * p
        L += n
        out.append(ScaleMACs(
            projections=batch * beta * d * n * 4 * C * C,
            scores=batch * beta * d * 2 * n * L * C,
            ffn=batch * beta * d * n * 2 * C * H,
            head=batch * beta * n * C * V,
            adaln=batch * beta * (6 * d + 2) * C * C,
            word_embed=batch * n * cfg.Cvae * C if k > 0 else 0.0,
        ))
    return out


# ------------------------------------------------------------------------------------------------ KV-cache bytes
def kv_bytes(keys_per_layer, width: int, rows_per_image: float, elem_bytes: float) -> float:
    """Bytes per image held in K and V by caches with keys_per_layer[l] positions in layer l:
    Σ_l 2 (K and V) · keys · width · element size · rows per image (2 under CFG: the unconditional row has its own).
    elem_bytes: the mean of the key and value element sizes (they differ where autocast leaves keys float32)."""
    return float(sum(2 * k * width * elem_bytes * rows_per_image for k in keys_per_layer))


def dense_kv_cache_bytes(cfg, elem_bytes: float = 4, cfg_guidance: bool = True) -> float:
    """K/V bytes per image the dense model holds after the last scale's append (its largest cache): every layer
    keeps every token of every scale, L = Σ p²."""
    L = sum(p * p for p in cfg.patch_nums)
    return kv_bytes([L] * cfg.depth, cfg.embed_dim, 2 if cfg_guidance else 1, elem_bytes)


def step_kv_bytes(cfg, stop: int, nocfg: int, elem_bytes: float = 4) -> float:
    """K/V bytes per image of a fixed step plan (methods/_steps.py): the last scale run is stop − 1 (skipped scales
    append nothing), every layer holds the L = Σ_{j<stop} p_j² positions, in 2 rows per image unless the
    unconditional row left the caches at scale nocfg < stop (then 1)."""
    L = sum(p * p for p in cfg.patch_nums[:stop])
    return kv_bytes([L] * cfg.depth, cfg.embed_dim, 2 if nocfg >= stop else 1, elem_bytes)
