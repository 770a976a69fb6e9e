"""DMoE-VAR (Xia, Vincenti, Jazbec 2025): dense FFNs -> dynamic mixtures of experts on the last scales.

Pipeline (../shared/METHODS.md §3; the model in methods/_moe.py, its training in methods/_moe_recipe.py, its
artifact files in methods/_moe_artifacts.py; the prepare settings declared once below, in RECIPE):
  1. ReLUfication + Hoyer fine-tuning (FFN GELU -> ReLU, CE + w·Hoyer)   `python -m bench prepare dmoe`
  2. MoEfication: balanced k-means of the L2-normalised fc1 rows into FFN/expert_size equal experts
  3. One router per block (Linear(C,128)-GELU-Linear(128,E)-abs), MSE on each expert's output norm
  4. Sampling: on `moe_scales`, keep expert e iff r_e >= (1-τ)·max_j r_j (top expert always kept)

Artifacts (bench/artifacts.py): `dmoe-finetune` (fine-tuned weights, key: hoyer_weight, finetune_steps,
prepare_seed) must be prepared; `dmoe-experts` (split + routers, key: the fine-tune + expert_size, router_steps)
is prepared too, and when missing it is made on the fly (seconds on the embedded default) and cached in the
user cache, so an expert-size sweep needs no extra command.

Parameters: tau (one value or one per MoE scale), moe_scales (default: the last three), expert_size, oracle
(true expert norms instead of the router; its extra pass is not counted as FLOPs), dense_weights (finetuned:
every scale runs the fine-tuned ReLU model; original: scales before the first MoE scale run the original GELU
model, whose KV caches feed the fine-tuned MoE scales — what the reference code did implicitly).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import torch

from bench import registry
from bench.analytic import dense_scale_macs
from bench.artifacts import (artifact_dir_for_writing, find_artifact, provenance, read_meta, require_artifact,
                             reusable, write_artifact)
from bench.errors import BenchError
from bench.recipe import Recipe, Setting, prepare_command
from bench.registry import Method, Param, clone_structure, register_method
from methods import _moe, _moe_artifacts, _moe_recipe
from methods._moe import ROUTER_WIDTH, ExpertFFN, SwitchNet
from methods._moe_recipe import log

FINETUNE, EXPERTS = "dmoe-finetune", "dmoe-experts"
RECIPE_VERSION = 1      # in the fine-tune key: bump when the recipe changes what an artifact holds
# The prepare recipe (sized so the embedded default fine-tunes in a few CPU minutes; the paper: Adam, wd 0.05,
# clip 1.0, warm-up then decay, ~0.2 epoch suffices). Keyed settings identify an artifact (and are method
# parameters); the others are recorded in its metadata, and prepare refuses to silently reuse an artifact made
# with another recipe. Pruned-FFN reuses the fine-tune settings (its weights=finetuned runs this fine-tune).
RECIPE = Recipe(
    Setting(Param("hoyer_weight", float, 1e-4, "fine-tune artifact: Hoyer weight", low=0.0),
            artifacts=(FINETUNE,), key="hoyer_weight", sweep=True),
    Setting(Param("finetune_steps", int, 300, "fine-tune artifact: steps (0 = ReLU swap only)", low=0),
            flag="--steps", artifacts=(FINETUNE,), key="steps", sweep=True),
    Setting(Param("expert_size", int, 32, "neurons per expert (must divide the FFN width)", low=1),
            artifacts=(EXPERTS,), key="expert_size", sweep=True, each=True),
    Setting(Param("router_steps", int, 500, "experts artifact: router training steps", low=1),
            artifacts=(EXPERTS,), key="router_steps", sweep=True),
    Setting(Param("prepare_seed", int, 0, "seed of fine-tune, k-means and routers", low=0),
            flag="--seed", artifacts=(FINETUNE, EXPERTS), key="seed", sweep=True),
    Setting(Param("batch", int, 32, "fine-tune batch", low=1), artifacts=(FINETUNE,)),
    Setting(Param("lr", float, 2e-4, "fine-tune peak lr", low=0.0, low_open=True), artifacts=(FINETUNE,)),
    Setting(Param("images", int, 2000, "fine-tune images" + _moe.MIRRORS, low=1), artifacts=(FINETUNE,)),
    Setting(Param("eval_images", int, 128, "held-out images for the before/after losses", low=1),
            artifacts=(FINETUNE,)),
    Setting(Param("router_images", int, 256, "router training images", low=1), artifacts=(EXPERTS,)),
    fixed={FINETUNE: dict(recipe=RECIPE_VERSION), EXPERTS: dict(router_width=ROUTER_WIDTH)},
    nested={EXPERTS: dict(finetune=FINETUNE)})

DEFAULT_LAST_SCALES = 3


def resolve_scales(value, num_scales: int, what: str, method: str) -> List[int]:
    """A method's scale list (None = the last three), checked against the model's scale count."""
    return registry.resolve_scales(method, value, num_scales, DEFAULT_LAST_SCALES, what)


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@register_method("dmoe")
class DMoE(Method):
    kind = "weight"
    display_name = "DMoE-VAR"
    family = "dmoe"
    description = "DMoE-VAR: ReLU+Hoyer fine-tune, balanced k-means experts, norm-regression router, dynk_max"
    artifacts = ("dmoe-finetune", "dmoe-experts")
    params = (
        Param("tau", float, 0.8, "dynk_max threshold: keep e iff r_e >= (1-tau)·max r; one value or one per MoE scale",
              low=0.0, high=1.0, list_ok=True),
        Param("moe_scales", int, None, "scale indices run as MoE (default: the last three)", low=0, list_ok=True,
              nullable=True),
        *RECIPE.params("expert_size"),
        Param("oracle", bool, False, "select by the true expert norms instead of the router (not counted as FLOPs)"),
        Param("dense_weights", str, "finetuned", "weights of the scales before the first MoE scale",
              choices=("finetuned", "original")),
        *RECIPE.params("hoyer_weight", "finetune_steps", "router_steps", "prepare_seed"),
    )
    recipe = RECIPE

    # ------------------------------------------------------------------ validation
    def check(self):
        c = self.config
        registry.check_distinct_scales(self.name, c["moe_scales"], "moe_scales")
        if isinstance(c["tau"], list) and isinstance(c["moe_scales"], list) and len(c["tau"]) != len(c["moe_scales"]):
            raise BenchError(f"method dmoe: tau has {len(c['tau'])} values but moe_scales has {len(c['moe_scales'])} "
                             f"scales; give one tau or one per MoE scale")

    def scales(self, bundle) -> List[int]:
        return resolve_scales(self.config["moe_scales"], len(bundle.var.patch_nums), "moe_scales", self.name)

    def tau_by_scale(self, bundle) -> Dict[int, float]:
        scales, tau = self.scales(bundle), self.config["tau"]
        taus = tau if isinstance(tau, list) else [tau] * len(scales)
        if len(taus) != len(scales):
            raise BenchError(f"method dmoe: tau has {len(taus)} values but there are {len(scales)} MoE scales "
                             f"{scales}; give one tau or one per MoE scale")
        return dict(zip(scales, taus))

    def finetune_key(self, bundle=None) -> dict:
        """bundle: whose data identity scopes the key (_moe.data_scope; none for the shipped default)."""
        return RECIPE.key(FINETUNE, self.config, _moe.data_scope(bundle) if bundle is not None else None)

    def experts_key(self, bundle=None) -> dict:
        return RECIPE.key(EXPERTS, self.config, _moe.data_scope(bundle) if bundle is not None else None)

    def prepare_hint(self, bundle) -> str:
        return prepare_command(bundle, "dmoe", RECIPE.flags(self.config))

    def check_model(self, bundle):
        self.tau_by_scale(bundle)
        H = bundle.var.blocks[0].ffn.fc1.out_features
        e = self.config["expert_size"]
        if H % e:
            raise BenchError(f"method dmoe: expert_size={e} does not divide the FFN width {H}; valid: "
                             f"{', '.join(map(str, divisors(H)))}")
        ft = require_artifact(FINETUNE, bundle, self.finetune_key(bundle), self.prepare_hint(bundle))
        if find_artifact("dmoe-experts", bundle.model_id, self.experts_key(bundle)) is None \
                and read_meta(ft).get("data") is None:
            raise BenchError(f"no prepared dmoe-experts artifact for model {bundle.name} (expert_size={e}) and no "
                             f"dataset to make one; run `{self.prepare_hint(bundle)} --data <image folder>`")

    # ------------------------------------------------------------------ build
    def experts_dir(self, bundle, ft_dir: str, ft_var) -> str:
        """The split + routers for this expert size; made and cached on first use (an expert-size sweep)."""
        key = self.experts_key(bundle)
        d = find_artifact("dmoe-experts", bundle.model_id, key)
        if d is not None:
            return d
        c = self.config
        data = read_meta(ft_dir).get("data")
        log(f"dmoe: no experts artifact for expert_size={c['expert_size']}; splitting and training routers")
        return write_experts(bundle, ft_var, key, c["expert_size"], c["router_steps"], c["prepare_seed"], data,
                             out_root=None, force=False)

    def build(self, bundle):
        self.check_model(bundle)
        c = self.config
        ft_dir = find_artifact("dmoe-finetune", bundle.model_id, self.finetune_key(bundle))
        ft_var = _moe_artifacts.load_finetuned_var(bundle, ft_dir)
        ex_dir = self.experts_dir(bundle, ft_dir, ft_var)
        labels, routers = _moe_artifacts.load_experts(ex_dir, ft_var, bundle.device)
        taus = self.tau_by_scale(bundle)
        net = clone_structure(ft_var)
        for blk, lab, router in zip(net.blocks, labels, routers):
            blk.ffn = ExpertFFN(blk.ffn, lab, router, taus, oracle=c["oracle"])
        first_moe = min(taus)
        if c["dense_weights"] == "original" and first_moe > 0:
            net = SwitchNet(bundle.var, net, switch=first_moe)
        net.dmoe_info = dict(finetune=ft_dir, experts=ex_dir, tau_by_scale=taus)
        return net

    # ------------------------------------------------------------------ accounting
    @staticmethod
    def moe_layers(net) -> List[ExpertFFN]:
        return [m for m in net.modules() if isinstance(m, ExpertFFN)]

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        """Dense formula with each MoE scale's FFN term replaced by the recorded Σ_layers (pairs·2·C·e + router)."""
        layers = self.moe_layers(net)
        out = []
        for si, (sm, pn) in enumerate(zip(dense_scale_macs(bundle.var.cfg, batch), bundle.var.patch_nums)):
            total = sm.total
            if si in layers[0].tau_by_scale:
                tokens = 2 * batch * pn * pn        # CFG: conditional + unconditional rows
                total += sum(layer.macs_per_token(si) for layer in layers) * tokens - sm.ffn
            out.append(float(total))
        return out

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        layers = self.moe_layers(net)
        S, E = len(bundle.var.patch_nums), layers[0].num_experts
        active: List[Optional[float]] = [None] * S
        ffn_frac: List[Optional[float]] = [None] * S
        maps = {}
        H = layers[0].num_experts * layers[0].expert_size
        for si in sorted(layers[0].tau_by_scale):
            sts = [layer.stats.get(si) for layer in layers]
            if not all(st and st["tokens"] for st in sts):
                continue
            active[si] = sum(st["pairs"] / st["tokens"] for st in sts) / len(sts)
            ffn_frac[si] = sum(layer.macs_per_token(si) for layer in layers) / (len(layers) * 2 * layers[0].dim * H)
            if all(st["map"] is not None for st in sts):
                m = torch.stack([st["map"] for st in sts]).mean(0)      # (samples, pn, pn), mean over layers
                maps[str(si)] = [[[round(v, 3) for v in row] for row in sample] for sample in m.tolist()]
        info = getattr(net, "dmoe_info", {})
        ex_meta = read_meta(info["experts"]) if info.get("experts") else {}
        return dict(
            num_experts=E,
            moe_scales=sorted(layers[0].tau_by_scale),
            active_experts_per_scale=[None if a is None else round(a, 4) for a in active],
            active_expert_fraction_per_scale=[None if a is None else round(a / E, 5) for a in active],
            moe_ffn_macs_fraction_per_scale=[None if f is None else round(f, 5) for f in ffn_frac],
            expert_maps=json.dumps(dict(samples=len(next(iter(maps.values()))) if maps else 0,
                                        value="active experts per token (pn x pn), mean over layers",
                                        rows="the first samples of the first batch generated after reset_stats",
                                        num_experts=E, maps=maps)),
            dmoe_finetune_artifact=info.get("finetune", "").rsplit("/", 1)[-1],
            dmoe_experts_artifact=info.get("experts", "").rsplit("/", 1)[-1],
            router_val_mse=ex_meta.get("router", {}).get("val_mse_after"),
        )

    @property
    def label(self) -> str:
        c = self.config
        tau = ",".join(f"{t:g}" for t in c["tau"]) if isinstance(c["tau"], list) else f"{c['tau']:g}"
        extra = (" oracle" if c["oracle"] else "") + (" dense=original" if c["dense_weights"] == "original" else "")
        return f"dmoe τ={tau} e={c['expert_size']}{extra}"

    # ------------------------------------------------------------------ prepare hook (bench/commands/prepare.py)
    @classmethod
    def prepare(cls, bundle, values: dict, out_root: Optional[str], data: Optional[str] = None,
                force: bool = False) -> List[str]:
        """The fine-tune, then one expert split + routers per expert size (values: RECIPE's, sizes a list)."""
        sizes = values["expert_size"]
        H = bundle.var.blocks[0].ffn.fc1.out_features
        bad = [s for s in sizes if H % s]
        if bad:
            raise BenchError(f"--expert-size {bad[0]} does not divide the FFN width {H}; valid: "
                             f"{', '.join(map(str, divisors(H)))}")
        data = data or _moe.default_data(bundle)
        if data is None:
            raise BenchError(f"model {bundle.name} has no built-in dataset; give --data <image folder>")
        scope = _moe.data_scope(bundle, data)
        ft_key = RECIPE.key(FINETUNE, values, scope)
        recipe = dict(RECIPE.recorded(FINETUNE, values), data=data)
        ft_dir = artifact_dir_for_writing(FINETUNE, bundle.model_id, ft_key, out_root)
        if reusable(ft_dir, recipe, force):
            log(f"reusing the fine-tuned model {ft_dir}")
        else:
            ft_dir = write_finetune(bundle, ft_key, recipe, out_root, force)
        ft_var = _moe_artifacts.load_finetuned_var(bundle, ft_dir)
        dirs = [ft_dir]
        for size in sizes:
            key = RECIPE.key(EXPERTS, dict(values, expert_size=size), scope)
            d = artifact_dir_for_writing(EXPERTS, bundle.model_id, key, out_root)
            if reusable(d, dict(router_images=values["router_images"], data=data), force, recorded=_experts_recipe):
                log(f"reusing the expert split {d}")
            else:
                d = write_experts(bundle, ft_var, key, size, values["router_steps"], values["prepare_seed"], data,
                                  out_root, force, router_images=values["router_images"])
            dirs.append(d)
        return dirs


def _experts_recipe(meta: dict) -> dict:
    """What an experts artifact records of the settings its key leaves out."""
    return dict(router_images=meta.get("router_recipe", {}).get("images"), data=meta.get("data"))


def write_finetune(bundle, ft_key: dict, recipe: dict, out_root: Optional[str], force: bool) -> str:
    """Fine-tune (the recipe's recorded settings: batch, lr, images, eval_images, data) and write the artifact."""
    log(f"dmoe: fine-tuning {bundle.name} (ReLU, hoyer_weight={ft_key['hoyer_weight']:g}, "
        f"{ft_key['steps']} steps, batch {recipe['batch']})")

    def write(tmp):
        model, meta = _moe_recipe.finetune_relu_hoyer(
            bundle, steps=ft_key["steps"], hoyer_weight=ft_key["hoyer_weight"], batch=recipe["batch"],
            lr=recipe["lr"], seed=ft_key["seed"], images=recipe["images"],
            eval_images=recipe["eval_images"], data=recipe["data"])
        _moe_artifacts.save_finetune(model, meta, tmp)
        return dict(meta, recipe=recipe, data=recipe["data"], model=bundle.name, **provenance(),
                    weights_dtype="float16")
    return write_artifact(FINETUNE, bundle.model_id, ft_key, out_root, write, force)


def write_experts(bundle, ft_var, key: dict, expert_size: int, router_steps: int, seed: int, data: Optional[str],
                  out_root: Optional[str], force: bool,
                  router_images: int = RECIPE["router_images"].param.default) -> str:
    def write(tmp):
        toks, labels = _moe.token_data(bundle, router_images, "train", data)
        all_labels, routers, meta = _moe_recipe.make_experts(ft_var, bundle.vqvae, expert_size, router_steps, seed,
                                                             toks, labels, router_images)
        _moe_artifacts.save_experts(all_labels, routers, tmp)
        return dict(meta, data=data, model=bundle.name, **provenance())
    return write_artifact(EXPERTS, bundle.model_id, key, out_root, write, force)
