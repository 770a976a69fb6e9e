"""SkipVAR: per-sample choice among step skipping and unconditional-branch replacement (Li et al., arXiv 2506.08908;
release fakerone-li/SkipVAR, `autoregressive_infer_cfg_SkipVAR`).

The release (Infinity, 13 steps): every image runs steps 0..9 densely. After step 9 it resamples the summed codes
after step 8 (old) and after step 9 (new) to one grid (8x8), decodes both with the VAE and computes HF_diff (L1
between the Sobel gradient magnitudes of the two grey images) and the new image's FFT high-frequency share (amplitude
outside a centred disc of radius int(0.4·min(H, W)/2)). A skip model (StandardScaler + logistic regression over
[HF_diff, share]) picks skipping 0..3 of the last steps; only when it picks 0 an unconditional-branch model picks
running the last 0..3 steps without the unconditional branch. Its models were fitted on Infinity-2B samples (3k),
one set per SSIM target (0.84 / 0.86 / 0.88) against the unaccelerated image.

`rule=release` (default) does that, with decision models fitted per model on the harness's own samples by
`python -m bench prepare skipvar` (methods/_skipvar_fit.py; made on first use otherwise): for each sample the
features at the decision, and for every outcome the SSIM of its image to the dense image of the same seed
(torchmetrics, as bench/quality.same_seed_fidelity); label = the most steps that keep SSIM >= `ssim_target`. The
fitted coefficients are the `skipvar-decision` artifact (JSON numbers, keyed by model, target, samples, seed,
max_last and decision scale).

Outcome set and its translation to the embedded default (7 scales, sides 1,2,3,4,5,6,8; 155 tokens): the release's
{dense, skip 1..3, uncond 1..3} after step 9 of 13 (the last 3 steps: 76% of Infinity's tokens) becomes
{dense, skip 1..3, uncond 1..3} of the last 3 of 7 scales (sides 5, 6, 8: 81% of the tokens), decided after scale 3
(4x4) from the maps after scales 2 and 3 — the release decides with 3 steps left, so do we. `max_last` (0..3, at
most scales-2: the decision needs two maps before it) shrinks the set; max_last=0 is {dense}, the dense model.

The measure, on one grid: the sampler's full-size map f_hat after scale d-1 and after scale d (the sum of the
scales run, as the release's summed codes) are both area-resampled to the decision scale's side pn_d (4x4 on the
default) and decoded by the VQ-VAE, as the release does; a map with no content change reads exactly 0. (The earlier
version compared the input maps of d and d+1, the old one bicubic-upsampled to the new grid: 0.14-0.20 with no
content change.) The decoder work is outside the transformer count, like the final decode.

What differs from the release: (1) models fitted on this model's samples, not Infinity-2B's (`fit_samples`, default
512, not 3k); (2) the grid is the decision scale's side (4x4 of an 8x8 latent, 16 px decoded on the default), not a
fixed 8x8 of a 64x64 latent, and maps are resampled by area (the release: the VAE's z_interplote_up); (3) the
release's labelling code is not published: we label by the most steps keeping the SSIM target and fit the
unconditional-branch model on all samples (the release applies it only where the skip model says 0);
(4) batches: the features of a batch are computed together and each image gets its own plan (the release runs B=1);
(5) class-conditional VAR, not text-to-image; samples for the fit are drawn with the model's own sampling settings.

`rule=threshold`: the earlier fixed-threshold variant (not the release): one measure (`measure=diff`: HF_diff
relative to the new image's mean gradient; `ratio`: the FFT share) below `skip_below` skips the last `skip`
scales, else below `uncond_below` drops the unconditional branch on the last `uncond` (defaults 1 and 2, thresholds
at the tertiles of measure=diff on the embedded default: about a third of its samples each); its parameters are
refused under rule=release.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from bench.analytic import step_kv_bytes
from bench.artifacts import artifact_dir_for_writing, find_artifact, is_done, provenance, read_meta, write_artifact
from bench.atomic import atomic_write_text
from bench.errors import BenchError
from bench.log import get_logger
from bench.recipe import Recipe, Setting, prepare_command
from bench.registry import Method, Param, register_method
from methods import _skipvar_fit as fitlib
from methods import _steps

KIND = "skipvar-decision"
FILE = "decision.json"
# the threshold rule's defaults: tertiles of measure=diff on the embedded default (256 samples, decision after scale 4)
THRESHOLD_DEFAULTS = dict(skip=1, uncond=2, measure="diff", skip_below=0.052, uncond_below=0.078)
RELEASE_TARGETS = (0.84, 0.86, 0.88)

RECIPE = Recipe(
    Setting(Param("ssim_target", float, 0.84, "rule=release: the SSIM to the dense image (same seed) an outcome must "
                  "keep to be a label (the release ships 0.84, 0.86, 0.88)", low=0.0, high=1.0, low_open=True),
            artifacts=(KIND,), key="ssim_target", sweep=True, each=True),
    Setting(Param("max_last", int, 3, "rule=release: outcomes skip / drop the unconditional branch on up to this "
                  "many last scales (the release: 3; 0: dense only)", low=0, high=3),
            artifacts=(KIND,), key="max_last", sweep=True),
    Setting(Param("fit_samples", int, 512, "rule=release: samples the decision models are fitted on", low=2),
            flag="--samples", artifacts=(KIND,), key="samples", sweep=True),
    Setting(Param("prepare_seed", int, 0, "rule=release: seed of the fit's samples", low=0),
            flag="--seed", artifacts=(KIND,), key="seed", sweep=True),
    fixed={KIND: dict(recipe=1, features="hf_diff,hf_ratio", grid="decision-scale-area", decision_scale=None)})


def on_grid(f_hat: torch.Tensor, side: int) -> torch.Tensor:
    """A full-size map on the decision grid, by area (as the sampler resamples every map)."""
    return F.interpolate(f_hat.float(), size=(side, side), mode="area")


class SkipVARPolicy(_steps.StepPolicy):
    """rule None: record the features only (every image dense); 'release': the decision models; 'threshold'."""

    def __init__(self, decision_scale: Optional[int], vqvae, rule: Optional[str], models: Optional[dict] = None,
                 thresholds: Optional[dict] = None):
        self.d, self.vqvae, self.rule = decision_scale, vqvae, rule
        self.models, self.th = models, thresholds
        self.reset()

    def reset(self):
        self.old: Optional[torch.Tensor] = None
        self.features: List[List[float]] = []

    def decide(self, si, x_in, B, net):
        if self.d is None:
            return
        side = net.patch_nums[self.d]
        if si == self.d:
            self.old = on_grid(net.f_hat, side)                       # f_hat after d-1, on pn_d
        if si != self.d + 1:
            return
        new = on_grid(net.f_hat, side)                                 # f_hat after d, on the same grid
        f = fitlib.decision_features(self.old, new, self.vqvae)
        self.old = None
        rows = f.cpu().tolist()
        self.features += rows
        S = len(net.patch_nums)
        if self.rule == "release":
            import numpy as np
            X = np.asarray(rows)[:, :len(fitlib.FEATURES)]
            sk = fitlib.predict(self.models["skip"], X)
            unc = fitlib.predict(self.models["uncond"], X)
            stop = [S - int(k) for k in sk]
            nocfg = [S - int(u) if k == 0 else S for k, u in zip(sk, unc)]
        elif self.rule == "threshold":
            t = self.th
            col = 2 if t["measure"] == "diff" else 1
            stop, nocfg = [], []
            for r in rows:
                skip = r[col] < t["skip_below"]
                stop.append(S - t["skip"] if skip else S)
                nocfg.append(S - t["uncond"] if not skip and r[col] < t["uncond_below"] else S)
        else:
            return
        net.set_plan(B, stop, nocfg)


@register_method("skipvar")
class SkipVAR(Method):
    kind = "token"
    display_name = "SkipVAR (adaptive)"
    family = "skipvar"
    description = ("per-sample choice of skipping 0-3 last scales or dropping the unconditional branch on 1-3, by "
                   "logistic regressions over frequency features (SkipVAR)")
    params = (
        Param("rule", str, "release", "release: decision models fitted on this model's samples (prepare skipvar); "
              "threshold: the earlier fixed thresholds on one measure", choices=("release", "threshold")),
        *RECIPE.params("ssim_target", "max_last", "fit_samples", "prepare_seed"),
        Param("decision_scale", int, None, "scale whose map and the one before it decide (default: the last scale "
              "before the outcomes act)", low=1, nullable=True),
        Param("skip", int, None, "rule=threshold: scales skipped by a sample that skips (default 1)", low=1,
              nullable=True),
        Param("uncond", int, None, "rule=threshold: last scales without the unconditional branch (default 2)",
              low=1, nullable=True),
        Param("measure", str, None, "rule=threshold: diff (HF_diff relative to the new image's mean gradient, "
              "default) or ratio (FFT high-frequency share)", choices=("diff", "ratio"), nullable=True),
        Param("skip_below", float, None, "rule=threshold: a measure below this skips (default 0.052)", low=0.0,
              nullable=True),
        Param("uncond_below", float, None, "rule=threshold: else below this drops the unconditional branch "
              "(default 0.078)", low=0.0, nullable=True),
    )
    artifacts = (KIND,)
    recipe = RECIPE

    # ------------------------------------------------------------------ settings
    def check(self):
        c = self.config
        given = [n for n in THRESHOLD_DEFAULTS if c[n] is not None]
        if c["rule"] == "release" and given:
            raise BenchError(f"method {self.name}: {given[0]} is a parameter of rule=threshold, not of rule=release "
                             f"(decision models); valid: rule=threshold with {', '.join(THRESHOLD_DEFAULTS)}, or "
                             f"rule=release with ssim_target, max_last")
        t = self.thresholds()
        if c["rule"] == "threshold" and t["uncond_below"] < t["skip_below"]:
            raise BenchError(f"method {self.name}: uncond_below={t['uncond_below']} is below skip_below="
                             f"{t['skip_below']}; valid: uncond_below >= skip_below (skipping is the stronger step)")

    def thresholds(self) -> dict:
        return {n: (d if self.config[n] is None else self.config[n]) for n, d in THRESHOLD_DEFAULTS.items()}

    def tail(self) -> int:
        """How many last scales the outcomes act on."""
        if self.config["rule"] == "release":
            return self.config["max_last"]
        t = self.thresholds()
        return max(t["skip"], t["uncond"])

    def decision_scale(self, num_scales: int) -> Optional[int]:
        """The scale d: the maps after d-1 and after d decide, before d+1 runs. None: nothing to decide (dense)."""
        c, S = self.config, num_scales
        names = ("max_last",) if c["rule"] == "release" else ("skip", "uncond")
        vals = {"max_last": c["max_last"], **self.thresholds()}
        for name in names:
            lo = 0 if name == "max_last" else 1
            if not lo <= vals[name] <= S - 2:
                raise BenchError(f"method {self.name}: {name}={vals[name]} is out of range for a model with {S} "
                                 f"scales (the decision needs scales 0 and 1 before it); valid: {lo}..{S - 2}")
        tail, given = self.tail(), c["decision_scale"]
        if tail == 0:
            return None
        if given is not None and not 1 <= given <= S - 2:
            raise BenchError(f"method {self.name}: decision_scale={given} must follow scale 0 and leave at least one "
                             f"scale to the outcomes in a model with {S} scales; valid: 1..{S - 2}")
        if given is not None and given > S - 1 - tail:
            what = f"max_last={tail}" if c["rule"] == "release" else \
                f"skip={vals['skip']} / uncond={vals['uncond']}"
            raise BenchError(f"method {self.name}: decision_scale={given} leaves {S - 1 - given} scale(s) after it, "
                             f"fewer than {what} act on; valid: decision_scale 1..{S - 1 - tail} with these")
        return S - 1 - tail if given is None else given

    # ------------------------------------------------------------------ the artifact
    def artifact_key(self, bundle, target: Optional[float] = None) -> dict:
        d = self.decision_scale(len(bundle.var.patch_nums))
        cfg = dict(self.config, ssim_target=self.config["ssim_target"] if target is None else target)
        return RECIPE.key(KIND, cfg, decision_scale=d)

    def prepare_hint(self, bundle) -> str:
        return prepare_command(bundle, "skipvar", RECIPE.flags(self.config, kind=KIND))

    def needs_models(self, bundle) -> bool:
        return self.config["rule"] == "release" and self.decision_scale(len(bundle.var.patch_nums)) is not None

    def check_model(self, bundle):
        self.decision_scale(len(bundle.var.patch_nums))

    def load_models(self, bundle) -> dict:
        """The decision models: the prepared artifact, or fitted now on first use (cached like a prepare)."""
        d = find_artifact(KIND, bundle.model_id, self.artifact_key(bundle))
        if d is None:
            get_logger("methods").info(f"skipvar: no decision models for {bundle.name}; fitting them now on "
                                       f"{self.config['fit_samples']} samples (`{self.prepare_hint(bundle)}`)")
            (d,) = self.prepare_models(bundle, [self.config["ssim_target"]], None)
        return read_models(d)

    def prepare_models(self, bundle, targets, out_root: Optional[str], force: bool = False) -> List[str]:
        c, S = self.config, len(bundle.var.patch_nums)
        d = self.decision_scale(S)
        sampling = bundle.sampling.to_dict()
        todo, out = [], {}
        for t in targets:
            key = self.artifact_key(bundle, t)
            path = artifact_dir_for_writing(KIND, bundle.model_id, key, out_root)
            if is_done(path) and not force:
                old = read_meta(path).get("sampling")
                if old != sampling:
                    raise BenchError(f"{path} was fitted on samples drawn with sampling {old}, not {sampling}; "
                                     f"pass --force to redo it")
                out[t] = path
            else:
                todo.append(t)
        if todo:
            import time
            log = get_logger("methods")
            t0 = time.time()
            samples = fitlib.collect(bundle, d, c["max_last"], c["fit_samples"], c["prepare_seed"],
                                     policy_cls=SkipVARPolicy, progress=lambda i, n: log.info(f"skipvar fit samples {i}/{n}"))
            took = round(time.time() - t0, 1)
            for t in todo:
                models = fitlib.fit(samples, t, c["max_last"])

                def write(tmp, models=models):
                    atomic_write_text(os.path.join(tmp, FILE), json.dumps(dict(models, samples=samples), indent=0))
                    return dict(model=bundle.name, sampling=sampling, decision_scale=d, seconds_to_collect=took,
                                train=models["train"], **provenance())
                out[t] = write_artifact(KIND, bundle.model_id, self.artifact_key(bundle, t), out_root, write, force)
        return [out[t] for t in targets]

    # ------------------------------------------------------------------ the net
    def build(self, bundle):
        S = len(bundle.var.patch_nums)
        d = self.decision_scale(S)
        if d is None:                                                  # {dense}: the dense model, step for step
            return _steps.StepNet(bundle.var, _steps.FixedPlan(S, S))
        if self.config["rule"] == "release":
            policy = SkipVARPolicy(d, bundle.vqvae, "release", models=self.load_models(bundle))
        else:
            policy = SkipVARPolicy(d, bundle.vqvae, "threshold", thresholds=self.thresholds())
        return _steps.StepNet(bundle.var, policy)

    def analytic_macs(self, net, bundle, batch: int) -> Optional[List[float]]:
        return net.analytic_macs(bundle, batch)

    def kv_cache_bytes(self, net, bundle, elem_bytes: float = 4) -> float:
        """Per image, the cache its own rows hold after the last scale it runs (as skip-scales and cfg-skip count a
        fixed plan: a skipped scale appends nothing, a CFG-free scale leaves one row), the mean over the images
        generated since reset_stats. An image's rows leave the caches at the first scale it does not run, so a batch
        holds at most this much per image after any scale, exactly this when its images share a plan."""
        if not net.plans:
            raise BenchError("no recorded step plans; generate before counting KV-cache bytes")
        return sum(step_kv_bytes(bundle.var.cfg, s, c, elem_bytes) for s, c in net.plans) / len(net.plans)

    def row_metrics(self, net, bundle) -> Dict[str, Any]:
        S = len(bundle.var.patch_nums)
        plans = net.plans
        n = max(len(plans), 1)
        got = [fitlib.plan_outcome(s, c, S) for s, c in plans]
        feats = getattr(net.policy, "features", [])
        share = {f"skipvar_share_{o}": round(got.count(o) / n, 4) for o in fitlib.outcome_names(3)}
        return dict(net.row_metrics(bundle), **share,
                    skipvar_share_skip=round(sum(1 for s, _ in plans if s < S) / n, 4),
                    skipvar_share_uncond=round(sum(1 for s, c in plans if s == S and c < S) / n, 4),
                    skipvar_hf_diff_mean=round(sum(f[0] for f in feats) / len(feats), 6) if feats else None,
                    skipvar_hf_ratio_mean=round(sum(f[1] for f in feats) / len(feats), 6) if feats else None,
                    skipvar_rule=self.config["rule"], skipvar_decision_scale=self.decision_scale(S),
                    macs_saved_fraction=self.macs_saved_fraction(net, bundle))

    @property
    def label(self) -> str:
        c = self.config
        if c["rule"] == "threshold":
            t = self.thresholds()
            return f"skipvar threshold {t['measure']}<{t['skip_below']:g}/{t['uncond_below']:g}"
        if c["max_last"] == 0:
            return "skipvar dense-only"
        return f"skipvar ssim>={c['ssim_target']:g}"

    # ------------------------------------------------------------------ prepare hook (bench/commands/prepare.py)
    @classmethod
    def prepare(cls, bundle, values: dict, out_root: Optional[str], data: Optional[str] = None,
                force: bool = False) -> List[str]:
        if data is not None:
            raise BenchError("prepare skipvar fits on the model's own generated samples; --data is not used "
                             "(valid: leave it out)")
        configs = RECIPE.method_configs(values)
        m = cls(**configs[0])
        if not m.needs_models(bundle):
            raise BenchError("prepare skipvar: max_last=0 is the dense model, with nothing to decide or fit; "
                             "valid: --max-last 1..3")
        return m.prepare_models(bundle, [c["ssim_target"] for c in configs], out_root, force)


def read_models(directory: str) -> dict:
    """The decision models of an artifact directory (JSON numbers; nothing is unpickled)."""
    path = os.path.join(directory, FILE)
    try:
        with open(path) as f:
            models = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: cannot read SkipVAR decision models ({e}); run `python -m bench prepare skipvar "
                         f"--force`") from None
    n = len(fitlib.FEATURES)
    for part in ("skip", "uncond"):
        fitlib.check_model_dict(models.get(part, {}), n, f"{path} [{part}]")
    return models
