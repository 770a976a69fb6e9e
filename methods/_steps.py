"""Per-image step plans shared by skip-scales, cfg-skip and skipvar (SkipVAR, arXiv 2506.08908).

    StepNet(var, policy)    wraps the VAR; each image has a plan: `stop` (first scale it does not run; S = runs all)
                            and `nocfg` (first scale it runs without the unconditional branch; S = never)

Two mechanisms, both exact in MACs:
  * step skipping: through the sampler's `scale_rows` hook (bench/sampling.py) an image with stop <= si gets no
    tokens at si and nothing added to its f_hat; its final f_hat is the sum of the scales it ran, each already
    upsampled to full size by the VQ-VAE (SkipVAR's code breaks out of the loop and decodes the summed codes).
    A scale no image runs is not called at all: 0 transformer MACs; the decoder still runs on the final map.
  * unconditional-branch replacement: from nocfg on, the image's unconditional row is not run (the batch is not
    doubled for it) and its unconditional logits are replaced by its conditional ones, so the guided logits
    (1+t)·cond − t·uncond become the conditional logits (SkipVAR's code: cfg·cond + (1−cfg)·cond).

Rows only ever leave (a plan is a tail of the scales), so the KV caches are cut to the rows still running with
index_select (data movement, 0 MACs) and never grow back. Cost accounting is by recording: per scale, the query rows
that ran and the rows whose input map was word-embedded (bench/analytic.py components per row).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from bench.analytic import dense_scale_macs, step_kv_bytes
from bench.errors import BenchError
from bench.registry import Method, Param
from methods._tokens import VarView


class StepPolicy:
    """Decides each image's plan. `fixed(S)` -> (stop, nocfg) for every image, or None when it decides per image in
    `decide(si, x_in, B, state)` (called by the sampler hook at every scale before it runs)."""

    def fixed(self, num_scales: int):
        return None

    def decide(self, si: int, x_in, B: int, net: "StepNet") -> None:
        """x_in: the input map of scale si (None at 0); net.f_hat: the full-size sum of the scales run so far."""

    def reset(self) -> None:
        """Forget recorded statistics (StepNet.reset_stats)."""


class FixedPlan(StepPolicy):
    def __init__(self, stop: int, nocfg: int):
        self.stop, self.nocfg = stop, nocfg

    def fixed(self, num_scales):
        return self.stop, self.nocfg


class StepNet(VarView):
    """The VAR with per-image step plans; exposes the sampler interface (scale_forward, new_caches, scale_rows)."""

    def __init__(self, var, policy: StepPolicy):
        super().__init__(var)
        self.policy = policy
        self.stop: List[int] = []
        self.nocfg: List[int] = []
        self._cache_rows: List[int] = []
        self.f_hat: Optional[torch.Tensor] = None   # while the policy decides: the sampler's full-size map
        self.reset_stats()

    # -- the sampler interface ----------------------------------------------------------------------------------
    def set_plan(self, B: int, stop, nocfg) -> None:
        S = len(self.patch_nums)
        as_list = (lambda v: [int(v)] * B if isinstance(v, int) else [int(x) for x in v])
        self.stop, self.nocfg = as_list(stop), as_list(nocfg)
        if not all(0 <= s <= S for s in self.stop + self.nocfg):
            raise RuntimeError(f"step plan out of range: stop={self.stop} nocfg={self.nocfg}")

    @torch.no_grad()
    def scale_rows(self, si: int, x_in, B: int, f_hat=None) -> Optional[torch.Tensor]:
        self.f_hat = f_hat
        if si == 0:
            plan = self.policy.fixed(len(self.patch_nums))
            self.set_plan(B, *(plan if plan is not None else (len(self.patch_nums),) * 2))
            self.images += B
        self.policy.decide(si, x_in, B, self)
        self.f_hat = None
        if si == len(self.patch_nums) - 1:
            self.plans.extend(zip(self.stop, self.nocfg))
        if all(s > si for s in self.stop):
            return None
        device = self.var.pos_1LC.device
        return torch.tensor([s > si for s in self.stop], dtype=torch.bool, device=device)

    def scale_forward(self, si: int, x_in, label_2B, caches):
        B = int(label_2B.shape[0]) // 2   # a python int also inside fvcore's jit trace
        if len(self.stop) != B:          # called without the sampler hook (e.g. teacher-forced by scale)
            self.set_plan(B, len(self.patch_nums), len(self.patch_nums))
        cond = [i for i in range(B) if self.stop[i] > si]
        unc = [i for i in cond if self.nocfg[i] > si]
        rows = cond + [B + i for i in unc]
        if si == 0:
            self._cache_rows = list(range(2 * B))
        if rows == list(range(2 * B)):   # the dense step: the VAR embeds the map once and repeats it
            self._record(si, 2 * B, B)
            return self.var.scale_forward(si, x_in, label_2B, caches)
        if not rows:
            raise RuntimeError(f"scale {si} called with no image running it")
        self._cut_caches(caches, rows)
        dev = label_2B.device
        lab = label_2B.index_select(0, torch.tensor(rows, device=dev))
        if x_in is None:
            x, embedded = None, 0
        elif unc == cond:                # both rows of each running image: embed once, the VAR repeats it
            x, embedded = x_in.index_select(0, torch.tensor(cond, device=dev)), len(cond)
        else:                            # one input row per query row (some images without their uncond row)
            x, embedded = x_in.index_select(0, torch.tensor([r % B for r in rows], device=dev)), len(rows)
        self._record(si, len(rows), embedded)
        sub = self.var.scale_forward(si, x, lab, caches)
        out = sub.new_zeros((2 * B,) + tuple(sub.shape[1:]))
        out[torch.tensor(rows, device=dev)] = sub
        nocfg = [i for i in cond if i not in unc]
        if nocfg:                        # unconditional logits := conditional ones -> guidance gives the cond logits
            idx = torch.tensor(nocfg, device=dev)
            out[idx + B] = out[idx]
        return out

    def _cut_caches(self, caches, rows: List[int]) -> None:
        if rows == self._cache_rows:
            return
        pos = {r: p for p, r in enumerate(self._cache_rows)}
        if any(r not in pos for r in rows):
            raise RuntimeError("a row came back after leaving the KV caches (plans must be tails of the scales)")
        keep = torch.tensor([pos[r] for r in rows], device=self.var.pos_1LC.device)
        for c in caches:
            if c.k is not None:
                c.k, c.v = c.k.index_select(0, keep), c.v.index_select(0, keep)
        self._cache_rows = list(rows)

    # -- statistics ---------------------------------------------------------------------------------------------
    def reset_stats(self):
        getattr(self.policy, "reset", lambda: None)()
        self.images = 0
        self.query_rows: Dict[int, int] = {}
        self.embed_rows: Dict[int, int] = {}
        self.plans: List[tuple] = []

    def _record(self, si, q, e):
        self.query_rows[si] = self.query_rows.get(si, 0) + q
        self.embed_rows[si] = self.embed_rows.get(si, 0) + e

    def analytic_macs(self, bundle, batch: int) -> List[float]:
        """Per-scale transformer MACs for `batch` images: the recorded rows per image (means over the images
        generated since reset_stats) times bench/analytic.py's per-row components."""
        if not self.images:
            raise BenchError("no recorded step statistics; generate before counting FLOPs")
        out = []
        for si, sm in enumerate(dense_scale_macs(bundle.var.cfg, 1, cfg_guidance=False)):
            q = self.query_rows.get(si, 0) / self.images
            e = self.embed_rows.get(si, 0) / self.images
            out.append(float(batch * (q * (sm.total - sm.word_embed) + e * sm.word_embed)))
        return out

    def row_metrics(self, bundle) -> dict:
        S = len(bundle.var.patch_nums)
        n = max(self.images, 1)
        plans = self.plans
        ran = [round(sum(1 for s, _ in plans if s > si) / max(len(plans), 1), 4) for si in range(S)]
        cfg = [round(sum(1 for s, c in plans if s > si and c > si) / max(len(plans), 1), 4) for si in range(S)]
        return dict(step_images=n, step_run_share_per_scale=ran, step_cfg_share_per_scale=cfg)


def check_last(method: str, name: str, value: int, num_scales: int, allow_all: bool) -> None:
    """A `last k scales` parameter against the model: 0 is the dense model; skipping every scale leaves nothing to
    decode."""
    hi = num_scales if allow_all else num_scales - 1
    if not 0 <= value <= hi:
        what = "" if allow_all else " (skipping every scale leaves no image)"
        raise BenchError(f"method {method}: {name}={value} is out of range for a model with {num_scales} scales"
                         f"{what}; valid: 0..{hi}")


def saved_fraction(cfg, stop: int, nocfg: int) -> float:
    """Share of the dense transformer MACs per image that a fixed plan (stop, nocfg) saves, by formula."""
    dense = dense_scale_macs(cfg, 1)
    run = 0.0
    for si, sm in enumerate(dense):
        if si >= stop:
            continue
        run += sm.total if si < nocfg else (sm.total - sm.word_embed) / 2 + sm.word_embed
    return 1 - run / sum(s.total for s in dense)


def nearest_k(cfg, target: float, plan, ks) -> int:
    """The k in ks whose plan(k) = (stop, nocfg) saves the share nearest to target (ties: the smaller k)."""
    return min(ks, key=lambda k: (abs(saved_fraction(cfg, *plan(k)) - target), k))


def match_saved_param(k_param: str) -> Param:
    return Param("match_saved", float, None, f"overrides {k_param}: the k whose saved share of the dense transformer "
                 "MACs is nearest to this", low=0.0, high=1.0, high_open=True, nullable=True)


class LastScalesMethod(Method):
    """skip-scales and cfg-skip: one fixed plan for every image, acting on the last k scales (k = the parameter named
    `k_param`, or the k nearest to match_saved). k=0 is the dense model: every row runs every scale, bitwise dense."""

    kind = "token"
    k_param = ""                 # the parameter that holds k
    allow_all = False            # whether k may cover every scale
    scales_column = ""           # the results column listing the scales acted on

    def plan(self, k: int, num_scales: int) -> Tuple[int, int]:
        """(stop, nocfg) of the plan that acts on the last k scales."""
        raise NotImplementedError

    def k(self, bundle) -> int:
        S = len(bundle.var.patch_nums)
        if self.config["match_saved"] is None:
            return self.config[self.k_param]
        hi = S if self.allow_all else S - 1
        return nearest_k(bundle.var.cfg, self.config["match_saved"], lambda k: self.plan(k, S), range(1, hi + 1))

    def check_model(self, bundle):
        check_last(self.name, self.k_param, self.k(bundle), len(bundle.var.patch_nums), self.allow_all)

    def build(self, bundle):
        self.check_model(bundle)
        return StepNet(bundle.var, FixedPlan(*self.plan(self.k(bundle), len(bundle.var.patch_nums))))

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return net.analytic_macs(bundle, batch)

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        return step_kv_bytes(bundle.var.cfg, *self.plan(self.k(bundle), len(bundle.var.patch_nums)), elem_bytes)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        S = len(bundle.var.patch_nums)
        return {**net.row_metrics(bundle), self.scales_column: list(range(S - self.k(bundle), S)),
                "macs_saved_fraction": self.macs_saved_fraction(net, bundle)}

    @property
    def label(self) -> str:
        if self.config["match_saved"] is not None:
            return f"{self.name} match {self.config['match_saved']:g} saved"
        return f"{self.name} k={self.config[self.k_param]}"
