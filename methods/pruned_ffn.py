"""Pruned-FFN: the static twin of DMoE-VAR (../shared/METHODS.md §4).

Each block's FFN neurons are ranked by their mean |activation| over calibration tokens (a teacher-forced pass
over real training images, only the tokens of the pruned scales); on those scales the lowest `fraction` is
dropped (fc1 rows and fc2 columns physically sliced, fc2's bias kept), so the time saving is real. Other scales
run the full FFN. Runs on the ReLU fine-tuned DMoE model (`weights=finetuned`, needs `prepare dmoe`) or on the
original one (`weights=original`).

Matching FLOPs with a dynamic method (every DMoE point gets a static twin at equal FLOPs):

    from methods.pruned_ffn import match_prune_fraction
    f = match_prune_fraction(bundle, dmoe_row["macs_analytic"], scales=[4, 5, 6])   # MACs per image
    create_method("pruned-ffn", fraction=f, scales=[4, 5, 6])

or directly `create_method("pruned-ffn", match_macs=<MACs per image>)` / `match_fraction=<MACs ÷ dense MACs>`,
which override `fraction`. MACs are the analytic transformer MACs per image (bench/analytic.py, CFG rows
included, decoder excluded: the `macs_analytic` column). Pruning moves MACs in steps of one neuron per block,
so the match is within half a step (`macs_per_pruned_neuron`) unless the target is out of reach.

Calibration importances are cached as the `pruned-calib` artifact (made on first use, or by
`python -m bench prepare pruned-ffn`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.analytic import dense_scale_macs
from bench.artifacts import artifact_dir_for_writing, find_artifact, read_meta, reusable, write_artifact
from bench.checkpoints import read_state_dict, save_state_dict
from bench.errors import BenchError
from bench.recipe import Recipe, Setting, prepare_command
from bench.registry import Method, Param, check_distinct_scales, clone_structure, register_method
from methods import _moe, _moe_artifacts
from methods._moe_recipe import ROUTER_TRAINING, FFNActivations
from methods.dmoe import FINETUNE
from methods.dmoe import RECIPE as DMOE_RECIPE
from methods.dmoe import resolve_scales

CALIB = "pruned-calib"
# The calibration recipe; with weights=finetuned it runs DMoE's fine-tune, whose settings are DMoE's own (the
# same declarations: the same key). Calibration uses the router data's share of unconditional rows.
RECIPE = Recipe(
    Setting(Param("scales", int, None, "scale indices pruned (default: the last three)", low=0, list_ok=True,
                  nullable=True), artifacts=(CALIB,), key="scales", sweep=True),
    Setting(Param("weights", str, "finetuned", "the ReLU fine-tuned DMoE model or the original one",
                  choices=("finetuned", "original")), artifacts=(CALIB,), key="weights", sweep=True),
    Setting(Param("calib_images", int, 256, "calibration images" + _moe.MIRRORS, low=1),
            artifacts=(CALIB,), key="images", sweep=True),
    DMOE_RECIPE["hoyer_weight"],
    DMOE_RECIPE["finetune_steps"],
    dataclasses.replace(DMOE_RECIPE["prepare_seed"], artifacts=(FINETUNE, CALIB)),
    fixed={FINETUNE: DMOE_RECIPE.fixed[FINETUNE], CALIB: dict(uncond_fraction=ROUTER_TRAINING["uncond_fraction"])},
    nested={CALIB: dict(finetune=FINETUNE)})


# ------------------------------------------------------------------------------------------------ FLOP matching
def _dims(var_cfg):
    return var_cfg.embed_dim, round(var_cfg.embed_dim * var_cfg.mlp_ratio), var_cfg.depth


def macs_per_pruned_neuron(var_cfg, scales: Sequence[int]) -> float:
    """MACs per image saved by dropping one neuron in every block on `scales` (CFG: 2 rows per image)."""
    C, H, d = _dims(var_cfg)
    return float(sum(2 * d * var_cfg.patch_nums[s] ** 2 * 2 * C for s in scales))


def pruned_macs_per_image(var_cfg, scales: Sequence[int], fraction: float) -> float:
    """Analytic transformer MACs per image with `fraction` of the FFN neurons dropped on `scales`."""
    C, H, d = _dims(var_cfg)
    dropped = H - kept_neurons(H, fraction)
    return float(sum(s.total for s in dense_scale_macs(var_cfg, 1))) - dropped * macs_per_pruned_neuron(var_cfg, scales)


def kept_neurons(H: int, fraction: float) -> int:
    return H - int(round(fraction * H))


def match_prune_fraction(bundle_or_cfg, macs_per_image: float, scales: Optional[Sequence[int]] = None,
                         clamp: bool = False) -> float:
    """The pruning fraction on `scales` (default: the last three) whose analytic MACs per image are closest to
    `macs_per_image` (e.g. a DMoE row's `macs_analytic`). Out of reach (above dense, or below keeping one neuron
    per block): BenchError, or the nearest end with clamp=True."""
    cfg = getattr(getattr(bundle_or_cfg, "var", None), "cfg", bundle_or_cfg)
    C, H, d = _dims(cfg)
    scales = resolve_scales(None if scales is None else list(scales), len(cfg.patch_nums), "scales", "pruned-ffn")
    dense = pruned_macs_per_image(cfg, scales, 0.0)
    step = macs_per_pruned_neuron(cfg, scales)
    dropped = round((dense - float(macs_per_image)) / step)
    if not 0 <= dropped <= H - 1:
        if not clamp:
            lo = dense - (H - 1) * step
            raise BenchError(f"method pruned-ffn: target {macs_per_image:.4g} MACs per image is out of reach on scales "
                             f"{scales}; valid: {lo:.4g} .. {dense:.4g}")
        dropped = min(max(dropped, 0), H - 1)
    return dropped / H


# ------------------------------------------------------------------------------------------------ module
class PrunedFFN(nn.Module):
    """The FFN with only the `keep` neurons (physically sliced) on `scales`; the full FFN elsewhere."""

    def __init__(self, ffn, keep: torch.Tensor, scales: Sequence[int]):
        super().__init__()
        self.full = ffn
        self.scales = set(scales)
        self.act_name = ffn.act_name
        C, k = ffn.fc1.in_features, int(keep.numel())
        self.fc1, self.fc2 = nn.Linear(C, k), nn.Linear(k, C)
        with torch.no_grad():
            self.fc1.weight.copy_(ffn.fc1.weight[keep])
            self.fc1.bias.copy_(ffn.fc1.bias[keep])
            self.fc2.weight.copy_(ffn.fc2.weight[:, keep])
            self.fc2.bias.copy_(ffn.fc2.bias)            # fc2's bias is kept whole
        self.to(ffn.fc1.weight.device).requires_grad_(False)
        self.register_buffer("keep", keep.clone(), persistent=False)

    def forward(self, x, si: Optional[int] = None):
        if si is None or si not in self.scales:
            return self.full(x, si)
        h = self.fc1(x)
        return self.fc2(F.relu(h) if self.act_name == "relu" else F.gelu(h, approximate="tanh"))


@torch.no_grad()
def neuron_importance(var, vqvae, toks, labels, scales: Sequence[int], uncond_fraction: float, seed: int,
                      batch: int = 32) -> List[torch.Tensor]:
    """Mean |activation| of every FFN neuron of every block over the tokens of `scales` (teacher-forced)."""
    var.eval()
    positions = torch.cat([torch.arange(*var.begin_ends[s]) for s in scales]).to(labels.device)
    sums = [torch.zeros(blk.ffn.fc1.out_features, dtype=torch.float64, device=labels.device) for blk in var.blocks]
    count = 0
    gen = torch.Generator().manual_seed(seed)
    with FFNActivations(var, detach=True) as cap:
        for i in range(0, labels.shape[0], batch):
            pick = torch.arange(i, min(labels.shape[0], i + batch), device=labels.device)
            lab, x_in, _ = _moe.teacher_forcing_input(vqvae, toks, labels, pick)
            lab = _moe.drop_labels(lab, uncond_fraction, var.num_classes, gen)
            cap.clear()
            var(lab, x_in)
            for li, a in enumerate(cap.acts):
                sums[li] += a.index_select(1, positions).abs().sum((0, 1)).double()
            count += len(pick) * positions.numel()
    return [(s / count).float() for s in sums]


# ------------------------------------------------------------------------------------------------ method
@register_method("pruned-ffn")
class PrunedFFNMethod(Method):
    kind = "weight"
    display_name = "Pruned-FFN"
    family = "pruned-ffn"
    paper_names = {"actvar-table-5": "Static weight pruning"}
    description = "static FFN pruning by mean |activation| on chosen scales (DMoE's static twin)"
    artifacts = ("dmoe-finetune",)   # only with weights=finetuned; the calibration is made on first use
    params = (
        Param("fraction", float, 0.5, "fraction of FFN neurons dropped on the pruned scales", low=0.0, high=1.0,
              high_open=True),
        *RECIPE.params("scales", "weights"),
        Param("match_macs", float, None, "overrides fraction: match these analytic MACs per image", low=0.0,
              low_open=True, nullable=True),
        Param("match_fraction", float, None, "overrides fraction: match this share of the dense model's MACs",
              low=0.0, high=1.0, low_open=True, nullable=True),
        Param("match_clamp", bool, False, "a match target out of reach takes the nearest end (above dense MACs -> "
              "fraction 0) instead of failing; the row records the gap"),
        *RECIPE.params("calib_images", "hoyer_weight", "finetune_steps", "prepare_seed"),
    )
    recipe = RECIPE

    def check(self):
        c = self.config
        check_distinct_scales(self.name, c["scales"])
        if c["match_macs"] is not None and c["match_fraction"] is not None:
            raise BenchError("method pruned-ffn: give match_macs or match_fraction, not both")

    def scales(self, bundle) -> List[int]:
        return resolve_scales(self.config["scales"], len(bundle.var.patch_nums), "scales", self.name)

    def effective_fraction(self, bundle) -> float:
        c = self.config
        scales = self.scales(bundle)
        target = self.match_target(bundle)
        if target is not None:
            return match_prune_fraction(bundle, target, scales, clamp=c["match_clamp"])
        return c["fraction"]

    def match_target(self, bundle) -> Optional[float]:
        """The analytic MACs per image to match, or None when `fraction` is used as given."""
        c = self.config
        if c["match_fraction"] is not None:
            return c["match_fraction"] * pruned_macs_per_image(bundle.var.cfg, self.scales(bundle), 0.0)
        return c["match_macs"]

    def finetune_key(self, bundle=None, data: Optional[str] = None) -> dict:
        """bundle, data: whose data identity scopes the key (_moe.data_scope; data None: the model's own)."""
        return RECIPE.key(FINETUNE, self.config, _moe.data_scope(bundle, data) if bundle is not None else None)

    def calib_key(self, bundle, data: Optional[str] = None) -> dict:
        """The calibration's key includes the data it was made from (prepare's --data, else the model's own)."""
        no_finetune = {} if self.config["weights"] == "finetuned" else dict(finetune=None)
        return RECIPE.key(CALIB, self.config, _moe.data_scope(bundle, data), scales=self.scales(bundle),
                          **no_finetune)

    def check_model(self, bundle, data: Optional[str] = None):
        self.scales(bundle)
        fraction = self.effective_fraction(bundle)
        H = bundle.var.blocks[0].ffn.fc1.out_features
        if kept_neurons(H, fraction) < 1:
            raise BenchError(f"method pruned-ffn: fraction={fraction:g} keeps no FFN neuron of {H}; valid: "
                             f"[0, {(H - 0.5) / H:.6g})")
        c = self.config
        key = self.calib_key(bundle, data)
        ft_key = self.finetune_key(bundle, data)
        data = data or _moe.default_data(bundle)
        if c["weights"] == "finetuned":
            ft = find_artifact("dmoe-finetune", bundle.model_id, ft_key)
            if ft is None:
                hint = prepare_command(bundle, "dmoe", RECIPE.flags(c, kind=FINETUNE))
                raise BenchError(f"method pruned-ffn (weights=finetuned): no prepared dmoe-finetune artifact for "
                                 f"model {bundle.name}; run `{hint}` (or use weights=original)")
            data = data or read_meta(ft).get("data")
        if data is None and find_artifact("pruned-calib", bundle.model_id, key) is None:
            raise BenchError(f"method pruned-ffn: no calibration for model {bundle.name} and no dataset to make one; "
                             f"run `{prepare_command(bundle, 'pruned-ffn', '--data <image folder>')}`")

    def base_var(self, bundle, data: Optional[str] = None):
        if self.config["weights"] == "original":
            return bundle.var, None
        ft = find_artifact("dmoe-finetune", bundle.model_id, self.finetune_key(bundle, data))
        return _moe_artifacts.load_finetuned_var(bundle, ft), ft

    def importance(self, bundle, var, ft_dir, data=None, out_root=None, force=False):
        key = self.calib_key(bundle, data)
        # prepare --out: exactly there, else the user cache or the shipped copy
        d = find_artifact(CALIB, bundle.model_id, key) if out_root is None else \
            artifact_dir_for_writing(CALIB, bundle.model_id, key, out_root)
        # a model without data of its own keys its calibration without the data: the metadata says which
        wanted = {} if data is None else dict(data=data)
        if not reusable(d, wanted, force, recorded=lambda meta: {k: meta.get(k) for k in wanted}, paths=("data",)):
            data = data or _moe.default_data(bundle) or (read_meta(ft_dir).get("data") if ft_dir else None)
            c = self.config

            def write(tmp):
                toks, labels = _moe.token_data(bundle, c["calib_images"], "train", data)
                imp = neuron_importance(var, bundle.vqvae, toks, labels, key["scales"], key["uncond_fraction"],
                                        c["prepare_seed"])
                save_state_dict({f"blocks.{i}": v.cpu() for i, v in enumerate(imp)},
                                os.path.join(tmp, "importance.safetensors"))
                return dict(data=data, rows=int(labels.shape[0]), model=bundle.name,
                            finetune_artifact=os.path.basename(ft_dir) if ft_dir else None)
            d = write_artifact(CALIB, bundle.model_id, key, out_root, write, force)
        sd = read_state_dict(os.path.join(d, "importance.safetensors"), "pruning calibration")
        return [sd[f"blocks.{i}"].to(bundle.device) for i in range(len(var.blocks))], d

    def build(self, bundle):
        self.check_model(bundle)
        var, ft_dir = self.base_var(bundle)
        imp, calib_dir = self.importance(bundle, var, ft_dir)
        scales, fraction = self.scales(bundle), self.effective_fraction(bundle)
        H = var.blocks[0].ffn.fc1.out_features
        k = kept_neurons(H, fraction)
        net = clone_structure(var)
        for blk, score in zip(net.blocks, imp):
            keep = torch.sort(torch.argsort(score, descending=True, stable=True)[:k]).values
            blk.ffn = PrunedFFN(blk.ffn, keep, scales)
        net.pruned_info = dict(fraction=fraction, kept=k, scales=scales, calib=calib_dir, finetune=ft_dir)
        return net

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        info = net.pruned_info
        H = bundle.var.blocks[0].ffn.fc1.out_features
        return [float(sm.total - (sm.ffn * (H - info["kept"]) / H if si in info["scales"] else 0.0))
                for si, sm in enumerate(dense_scale_macs(bundle.var.cfg, batch))]

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        info = net.pruned_info
        target = self.match_target(bundle)
        match = {}
        if target is not None:   # how close the static twin came to its FLOP target (a clamped match is far)
            got = pruned_macs_per_image(bundle.var.cfg, self.scales(bundle), info["fraction"])
            step = macs_per_pruned_neuron(bundle.var.cfg, self.scales(bundle))
            match = dict(match_target_macs=float(target), match_gap_macs=float(got - target),
                         match_clamped=bool(abs(got - target) > 0.5 * step + 1e-6 * target))
        return dict(prune_fraction_effective=round(info["fraction"], 6), kept_neurons=info["kept"], **match,
                    pruned_scales=info["scales"], pruned_calib_artifact=os.path.basename(info["calib"]),
                    dmoe_finetune_artifact=os.path.basename(info["finetune"]) if info["finetune"] else None)

    @property
    def label(self) -> str:
        c = self.config
        what = (f"match={c['match_fraction']:g}" if c["match_fraction"] is not None else
                f"match={c['match_macs']:.3g}" if c["match_macs"] is not None else f"f={c['fraction']:g}")
        return f"pruned-ffn {what}" + (" original" if c["weights"] == "original" else "")

    # ------------------------------------------------------------------ prepare hook (bench/commands/prepare.py)
    @classmethod
    def prepare(cls, bundle, values: dict, out_root: Optional[str], data: Optional[str] = None,
                force: bool = False) -> str:
        (config,) = RECIPE.method_configs(values)
        m = cls(**config)
        m.check_model(bundle, data=data)
        var, ft_dir = m.base_var(bundle, data)
        _, d = m.importance(bundle, var, ft_dir, data=data, out_root=out_root, force=force)
        return d
