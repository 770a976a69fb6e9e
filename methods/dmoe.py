"""DMoE-VAR (Xia, Vincenti, Jazbec 2025): dense FFNs -> dynamic mixtures of experts on the last scales.

Pipeline (../shared/METHODS.md §3; machinery in methods/_moe.py):
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
from bench.errors import BenchError
from bench.registry import Method, Param, clone_structure, register_method
from methods import _moe
from methods._moe import (FINETUNE_DEFAULTS, ROUTER_DEFAULTS, ExpertFFN, SwitchNet, experts_key, finetune_key,
                          prepare_command)

DEFAULT_LAST_SCALES = 3


def resolve_scales(value, num_scales: int, what: str, method: str) -> List[int]:
    """A method's scale list (None = the last three), checked against the model's scale count."""
    return registry.resolve_scales(method, value, num_scales, DEFAULT_LAST_SCALES, what)


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@register_method("dmoe")
class DMoE(Method):
    kind = "weight"
    description = "DMoE-VAR: ReLU+Hoyer fine-tune, balanced k-means experts, norm-regression router, dynk_max"
    artifacts = ("dmoe-finetune", "dmoe-experts")
    params = (
        Param("tau", float, 0.8, "dynk_max threshold: keep e iff r_e >= (1-tau)·max r; one value or one per MoE scale",
              low=0.0, high=1.0, list_ok=True),
        Param("moe_scales", int, None, "scale indices run as MoE (default: the last three)", low=0, list_ok=True,
              nullable=True),
        Param("expert_size", int, 32, "neurons per expert (must divide the FFN width)", low=1),
        Param("oracle", bool, False, "select by the true expert norms instead of the router (not counted as FLOPs)"),
        Param("dense_weights", str, "finetuned", "weights of the scales before the first MoE scale",
              choices=("finetuned", "original")),
        Param("hoyer_weight", float, FINETUNE_DEFAULTS["hoyer_weight"], "fine-tune artifact: Hoyer weight", low=0.0),
        Param("finetune_steps", int, FINETUNE_DEFAULTS["steps"], "fine-tune artifact: steps (0 = ReLU swap only)",
              low=0),
        Param("router_steps", int, ROUTER_DEFAULTS["steps"], "experts artifact: router training steps", low=1),
        Param("prepare_seed", int, FINETUNE_DEFAULTS["seed"], "seed of fine-tune, k-means and routers", low=0),
    )

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

    def finetune_key(self) -> dict:
        c = self.config
        return finetune_key(c["hoyer_weight"], c["finetune_steps"], c["prepare_seed"])

    def experts_key(self) -> dict:
        c = self.config
        return experts_key(self.finetune_key(), c["expert_size"], c["router_steps"], c["prepare_seed"])

    def prepare_hint(self, bundle) -> str:
        c = self.config
        return prepare_command(bundle, "dmoe", f"--hoyer-weight {c['hoyer_weight']:g} --steps {c['finetune_steps']} "
                               f"--expert-size {c['expert_size']} --router-steps {c['router_steps']} "
                               f"--seed {c['prepare_seed']}")

    def check_model(self, bundle):
        from bench.artifacts import find_artifact
        self.tau_by_scale(bundle)
        H = bundle.var.blocks[0].ffn.fc1.out_features
        e = self.config["expert_size"]
        if H % e:
            raise BenchError(f"method dmoe: expert_size={e} does not divide the FFN width {H}; valid: "
                             f"{', '.join(map(str, divisors(H)))}")
        ft = find_artifact("dmoe-finetune", bundle.model_id, self.finetune_key())
        if ft is None:
            raise BenchError(f"no prepared dmoe-finetune artifact for model {bundle.name} with "
                             f"{json.dumps(self.finetune_key(), sort_keys=True)}; run `{self.prepare_hint(bundle)}`")
        if find_artifact("dmoe-experts", bundle.model_id, self.experts_key()) is None \
                and _moe.read_meta(ft).get("data") is None:
            raise BenchError(f"no prepared dmoe-experts artifact for model {bundle.name} (expert_size={e}) and no "
                             f"dataset to make one; run `{self.prepare_hint(bundle)} --data <image folder>`")

    # ------------------------------------------------------------------ build
    def experts_dir(self, bundle, ft_dir: str, ft_var) -> str:
        """The split + routers for this expert size; made and cached on first use (an expert-size sweep)."""
        from bench.artifacts import find_artifact
        key = self.experts_key()
        d = find_artifact("dmoe-experts", bundle.model_id, key)
        if d is not None:
            return d
        c = self.config
        data = _moe.read_meta(ft_dir).get("data")
        _moe.log(f"dmoe: no experts artifact for expert_size={c['expert_size']}; splitting and training routers")
        return write_experts(bundle, ft_var, key, c["expert_size"], c["router_steps"], c["prepare_seed"], data,
                             out_root=None, force=False)

    def build(self, bundle):
        from bench.artifacts import find_artifact
        self.check_model(bundle)
        c = self.config
        ft_dir = find_artifact("dmoe-finetune", bundle.model_id, self.finetune_key())
        ft_var = _moe.load_finetuned_var(bundle, ft_dir)
        ex_dir = self.experts_dir(bundle, ft_dir, ft_var)
        labels, routers = _moe.load_experts(ex_dir, ft_var, bundle.device)
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
        from bench.analytic import dense_scale_macs
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
        ex_meta = _moe.read_meta(info["experts"]) if info.get("experts") else {}
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
    def add_prepare_args(cls, p):
        p.add_argument("--expert-size", default="32", help="expert width(s), comma-separated: one split each "
                       "(default 32)")
        p.add_argument("--hoyer-weight", type=float, default=FINETUNE_DEFAULTS["hoyer_weight"])
        p.add_argument("--steps", type=int, default=FINETUNE_DEFAULTS["steps"],
                       help="fine-tune steps (0: ReLU swap without fine-tuning)")
        p.add_argument("--router-steps", type=int, default=ROUTER_DEFAULTS["steps"])
        p.add_argument("--seed", type=int, default=FINETUNE_DEFAULTS["seed"])
        p.add_argument("--batch", type=int, default=FINETUNE_DEFAULTS["batch"], help="fine-tune batch (recorded)")
        p.add_argument("--lr", type=float, default=FINETUNE_DEFAULTS["lr"], help="fine-tune peak lr (recorded)")
        p.add_argument("--images", type=int, default=FINETUNE_DEFAULTS["images"],
                       help="fine-tune images (x2 with mirrors; recorded)")
        p.add_argument("--eval-images", type=int, default=FINETUNE_DEFAULTS["eval_images"],
                       help="held-out images for the before/after losses (recorded)")
        p.add_argument("--router-images", type=int, default=ROUTER_DEFAULTS["images"],
                       help="router training images (recorded)")
        p.add_argument("--data", default=None, help="'shapes' or an image folder (default: the model's dataset)")
        p.add_argument("--force", action="store_true", help="redo even if a matching artifact exists")

    @classmethod
    def validate_prepare_args(cls, a):
        sizes = parse_sizes(a.expert_size)
        checks = [("--hoyer-weight", a.hoyer_weight >= 0, ">= 0"), ("--steps", a.steps >= 0, ">= 0"),
                  ("--router-steps", a.router_steps >= 1, ">= 1"), ("--seed", a.seed >= 0, ">= 0"),
                  ("--batch", a.batch >= 1, ">= 1"), ("--lr", a.lr > 0, "> 0"), ("--images", a.images >= 1, ">= 1"),
                  ("--eval-images", a.eval_images >= 1, ">= 1"), ("--router-images", a.router_images >= 1, ">= 1")]
        for flag, ok, valid in checks:
            if not ok:
                raise BenchError(f"{flag} must be {valid}, got {getattr(a, flag[2:].replace('-', '_'))}")
        return sizes

    @classmethod
    def prepare(cls, bundle, a, out_root: Optional[str]) -> List[str]:
        from bench.artifacts import artifact_dir_for_writing
        sizes = cls.validate_prepare_args(a)
        H = bundle.var.blocks[0].ffn.fc1.out_features
        bad = [s for s in sizes if H % s]
        if bad:
            raise BenchError(f"--expert-size {bad[0]} does not divide the FFN width {H}; valid: "
                             f"{', '.join(map(str, divisors(H)))}")
        data = a.data or _moe.default_data(bundle)
        if data is None:
            raise BenchError(f"model {bundle.name} has no built-in dataset; give --data <image folder>")
        ft_key = finetune_key(a.hoyer_weight, a.steps, a.seed)
        recipe = dict(batch=a.batch, lr=a.lr, images=a.images, eval_images=a.eval_images, data=data)
        ft_dir = artifact_dir_for_writing("dmoe-finetune", bundle.model_id, ft_key, out_root)
        if _done(ft_dir) and not a.force:
            old = _moe.read_meta(ft_dir).get("recipe", {})
            if old != recipe:
                raise BenchError(f"{ft_dir} was made with {old}, not {recipe}; pass --force to redo it")
            _moe.log(f"reusing the fine-tuned model {ft_dir}")
        else:
            ft_dir = write_finetune(bundle, ft_key, recipe, out_root, a.force)
        ft_var = _moe.load_finetuned_var(bundle, ft_dir)
        dirs = [ft_dir]
        for size in sizes:
            key = experts_key(ft_key, size, a.router_steps, a.seed)
            d = artifact_dir_for_writing("dmoe-experts", bundle.model_id, key, out_root)
            if _done(d) and not a.force:
                _moe.log(f"reusing the expert split {d}")
            else:
                d = write_experts(bundle, ft_var, key, size, a.router_steps, a.seed, data, out_root, a.force,
                                  router_images=a.router_images)
            dirs.append(d)
        return dirs


def parse_sizes(text) -> List[int]:
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise BenchError(f"--expert-size must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise BenchError(f"--expert-size must be positive integers, got {text!r}")
    return sizes


def _done(d: str) -> bool:
    import os
    return os.path.isfile(os.path.join(d, "DONE"))


def _command() -> str:
    import os
    import sys
    if sys.argv and sys.argv[0].endswith(os.path.join("bench", "__main__.py")):
        return "python -m bench " + " ".join(sys.argv[1:])
    return "(python API) " + " ".join(sys.argv)


def _env() -> dict:
    import platform
    from bench.train import code_commit
    return dict(torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads(),
                machine=platform.machine(), code_commit=code_commit())


def write_finetune(bundle, ft_key: dict, recipe: dict, out_root: Optional[str], force: bool) -> str:
    _moe.log(f"dmoe: fine-tuning {bundle.name} (ReLU, hoyer_weight={ft_key['hoyer_weight']:g}, "
             f"{ft_key['steps']} steps, batch {recipe['batch']})")

    def write(tmp):
        model, meta = _moe.finetune_relu_hoyer(
            bundle, steps=ft_key["steps"], hoyer_weight=ft_key["hoyer_weight"], batch=recipe["batch"],
            lr=recipe["lr"], seed=ft_key["seed"], images=recipe["images"],
            eval_images=recipe["eval_images"], data=recipe["data"])
        _moe.save_finetune(model, meta, tmp)
        return dict(meta, recipe=recipe, data=recipe["data"], model=bundle.name, command=_command(), env=_env(),
                    weights_dtype="float16")
    return _moe.write_artifact("dmoe-finetune", bundle.model_id, ft_key, out_root, write, force)


def write_experts(bundle, ft_var, key: dict, expert_size: int, router_steps: int, seed: int, data: Optional[str],
                  out_root: Optional[str], force: bool, router_images: int = ROUTER_DEFAULTS["images"]) -> str:
    def write(tmp):
        toks, labels = _moe.token_data(bundle, router_images, "train", data)
        all_labels, routers, meta = _moe.make_experts(ft_var, bundle.vqvae, expert_size, router_steps, seed,
                                                      toks, labels, router_cfg=dict(images=router_images))
        _moe.save_experts(all_labels, routers, tmp)
        return dict(meta, data=data, model=bundle.name, command=_command(), env=_env())
    return _moe.write_artifact("dmoe-experts", bundle.model_id, key, out_root, write, force)
