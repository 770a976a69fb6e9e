"""Training of the embedded default: `python -m bench train vqvae|var|classifier`, then `train ship`.

Each trainer writes `<out>/<kind>.safetensors` plus `<out>/<kind>.json` (config, data, seed, command, code
commit, losses) and a resumable `<out>/<kind>-state.pt` (tensors only, loaded with weights_only=True).
`ship` copies finished weights into bench/assets and writes the manifest with their hashes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from bench.atomic import atomic_path, atomic_write_text
from bench.checkpoints import file_sha256, load_tensors, read_state_dict, save_state_dict
from bench.data import SPLIT_SEEDS, default_hflip_for, load_split
from bench.env import code_commit
from bench.errors import BenchError
from bench.log import get_logger, progress
from bench.models.classifier import ShapesClassifier
from bench.models.var import VAR, VARConfig
from bench.models.vqvae import VQVAE
from bench.shipped import ASSETS, MANIFEST, read_manifest

logger = get_logger(__name__)

DEFAULT_VQVAE = dict(vocab_size=512, z_channels=16, ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, share_quant_resi=4,
                     v_patch_nums=(1, 2, 3, 4, 5, 6, 8))


def lr_at(step: int, total: int, base: float, warmup: int, final_ratio: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _log(msg: str):
    logger.info(f"{time.strftime('%H:%M:%S')} {msg}")


def default_hflip(data: str, hflip: Optional[bool]) -> bool:
    """Mirroring is an explicit choice: on for `shapes` (what the shipped default was trained with), off for a
    user's folder unless asked for (a mirrored digit or letter is another image)."""
    return default_hflip_for(data) if hflip is None else bool(hflip)


def _data_meta(data: str, hflip: bool, *records) -> dict:
    return dict(hflip=hflip, data_splits=[r.to_dict() for r in records],
                data_seed=SPLIT_SEEDS["train"] if data == "shapes" else None)


class _Trainer:
    """Shared loop: resumable state, periodic checkpoints, metadata sidecar."""

    kind = "model"

    def __init__(self, out: str, steps: int, args: dict):
        self.out, self.steps, self.args = out, steps, args
        os.makedirs(out, exist_ok=True)
        self.state_path = os.path.join(out, f"{self.kind}-state.pt")
        self.history: List[dict] = []

    def resume(self, model, opt) -> int:
        if not os.path.isfile(self.state_path):
            return 0
        st = load_tensors(self.state_path, "training state (resume file)")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        torch.set_rng_state(st["rng"])
        self.history = json.loads(st["history"]) if "history" in st else []
        _log(f"resumed {self.kind} at step {int(st['step'])}")
        return int(st["step"])

    def checkpoint(self, model, opt, step: int):
        with atomic_path(self.state_path) as tmp:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": torch.tensor(step),
                        "rng": torch.get_rng_state(), "history": json.dumps(self.history)}, tmp)

    def finish(self, model, config: dict, extra: dict):
        weights = os.path.join(self.out, f"{self.kind}.safetensors")
        save_state_dict(model, weights)
        meta = dict(kind=self.kind, config=config, args=self.args, steps=self.steps, history=self.history[-20:],
                    command="python -m bench " + " ".join(sys.argv[1:]), code_commit=code_commit(),
                    torch=torch.__version__, threads=torch.get_num_threads(), sha256=file_sha256(weights), **extra)
        atomic_write_text(os.path.join(self.out, f"{self.kind}.json"), json.dumps(meta, indent=1, default=str))
        _log(f"wrote {weights}")
        return weights


# ---------------------------------------------------------------------------------------------- VQ-VAE
class VQVAETrainer(_Trainer):
    kind = "vqvae"


def train_vqvae(out: str, steps: int = 3000, batch: int = 32, lr: float = 5e-4, seed: int = 0, data: str = "shapes",
                count: int = 20_000, image_size: int = 32, config: Optional[dict] = None, restart_every: int = 200,
                hflip: Optional[bool] = None):
    cfg = dict(DEFAULT_VQVAE, **(config or {}))
    model = VQVAE(**cfg)
    if model.image_size != image_size:
        raise BenchError(f"VQ-VAE config gives {model.image_size}px images (last patch {cfg['v_patch_nums'][-1]} x "
                         f"downsample {model.downsample}), but --image-size is {image_size}")
    torch.manual_seed(seed)
    hflip = default_hflip(data, hflip)
    images, _, classes, train_rec = load_split(data, "train", count, image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    args = dict(batch=batch, lr=lr, seed=seed, data=data, count=count, image_size=image_size)
    if data != "shapes" or not hflip:  # the shipped default's recorded args stay as they were
        args["hflip"] = hflip
    tr = VQVAETrainer(out, steps, args)
    start = tr.resume(model, opt)
    usage = torch.zeros(cfg["vocab_size"])
    gen = torch.Generator().manual_seed(seed + start)
    model.train()
    t0 = time.time()
    for step in progress(range(start, steps), desc="train vqvae", unit="step", logger=logger):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1))
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        if hflip and torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(-1)
        rec, vq_loss, idx = model(x)
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        for i in idx:
            usage += torch.bincount(i.flatten(), minlength=usage.numel()).float()
        if restart_every and (step + 1) % restart_every == 0 and step + 1 < steps * 0.8:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):  # re-seed unused codes from encoder outputs so the whole codebook gets used
                with torch.no_grad():
                    f = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, cfg["z_channels"])
                    pick = f[torch.randint(0, len(f), (len(dead),), generator=gen)]
                    model.quantize.embedding.weight.data[dead] = pick * torch.empty_like(pick).uniform_(0.1, 1.0, generator=gen)
            tr.history.append(dict(step=step + 1, loss=round(loss.item(), 5), rec=round(rec_loss.item(), 5),
                                   used_codes=int((usage > 0).sum()), restarted=int(len(dead))))
            usage.zero_()
        if (step + 1) % 50 == 0:
            _log(f"vqvae step {step + 1}/{steps} loss {loss.item():.4f} rec {rec_loss.item():.4f} "
                 f"vq {float(vq_loss):.4f} ({(time.time() - t0) / (step + 1 - start):.2f}s/step)")
        if (step + 1) % 250 == 0:
            tr.checkpoint(model, opt, step + 1)
    model.eval()
    val, _, _, val_rec = load_split(data, "val", 500, image_size)  # held out: never in the training sample
    with torch.no_grad():
        rec = torch.cat([model(val[i:i + 100])[0] for i in range(0, len(val), 100)])
        idx = torch.cat([torch.cat(model.img_to_idx(val[i:i + 100]), 1) for i in range(0, len(val), 100)])
    mse = F.mse_loss(rec.clamp(-1, 1), val).item()
    psnr = 10 * math.log10(4 / mse)
    _log(f"val PSNR {psnr:.2f} dB, codes used {idx.unique().numel()}/{cfg['vocab_size']}")
    return tr.finish(model, {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                     dict(val_psnr_db=psnr, val_codes_used=int(idx.unique().numel()), classes=classes,
                          **_data_meta(data, hflip, train_rec, val_rec)))


def vqvae_image_size(cfg: dict) -> int:
    """The image side a VQ-VAE config works at: its last patch side times its downsampling (2 per extra level)."""
    return int(cfg["v_patch_nums"][-1]) * 2 ** (len(cfg["ch_mult"]) - 1)


def trained_meta(path: str, kind: str, what: Optional[str] = None) -> dict:
    """The metadata `<name>.json` that `train <kind>` wrote beside `path`, refused in one line if the weights or it
    are missing, unreadable, or of another kind (`what` names the flag in the messages)."""
    what = what or f"{kind} weights"
    if not os.path.isfile(path):
        raise BenchError(f"{what}: file not found: {path}; give the {kind}.safetensors written by "
                         f"`python -m bench train {kind}`")
    side = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(side):
        raise BenchError(f"{what}: {path} has no training metadata beside it ({side}); give the {kind}.safetensors "
                         f"written by `python -m bench train {kind}`")
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BenchError(f"{what}: cannot read its training metadata {side}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise BenchError(f"{what}: {side} is not the training metadata of `python -m bench train {kind}` (no config)")
    if meta.get("kind", kind) != kind:
        raise BenchError(f"{what}: {path} holds a {meta['kind']}, not a {kind} ({side}); give the "
                         f"{kind}.safetensors written by `python -m bench train {kind}`")
    return meta


def trained_vqvae_config(path: str, what: Optional[str] = None) -> dict:
    cfg = trained_meta(path, "vqvae", what or "VQ-VAE")["config"]
    if not isinstance(cfg.get("v_patch_nums"), list) or not cfg["v_patch_nums"] or "ch_mult" not in cfg:
        raise BenchError(f"{what or 'VQ-VAE'}: the config beside {path} has no v_patch_nums / ch_mult")
    return cfg


def load_trained_vqvae(path: str) -> VQVAE:
    cfg = trained_vqvae_config(path)
    model = VQVAE(**cfg)
    model.load_state_dict(read_state_dict(path, "VQ-VAE checkpoint"), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------- VAR
class VARTrainer(_Trainer):
    kind = "var"


def tokenize(vqvae: VQVAE, images: torch.Tensor, batch: int = 200, hflip: bool = True) -> List[torch.Tensor]:
    """Multi-scale token indices of images, then (hflip) of their mirror images: 2N rows, labels repeated."""
    out = None
    with torch.no_grad():
        for flip in ((False, True) if hflip else (False,)):
            for i in range(0, len(images), batch):
                x = images[i:i + batch]
                idx = vqvae.img_to_idx(x.flip(-1) if flip else x)
                out = [t.to(torch.int16) for t in idx] if out is None else \
                    [torch.cat((a, t.to(torch.int16))) for a, t in zip(out, idx)]
    return out


def var_shape(depth: int, width_per_depth: int = 32, width: Optional[int] = None,
              heads: Optional[int] = None) -> Tuple[int, int]:
    """(embedding width, heads) of a VAR of the embedded family, refused in one line naming the flags when the
    depth, widths or heads are not positive or the width does not split into the heads. Defaults: width =
    width_per_depth * depth; heads = depth when it divides the width (the release's recipe), else width // 32."""
    for flag, v in (("--depth", depth), ("--width-per-depth", width_per_depth), ("--width", width),
                    ("--heads", heads)):
        if v is not None and v < 1:
            raise BenchError(f"{flag} must be >= 1, got {v}")
    C = width if width is not None else width_per_depth * depth
    src = f"--width {C}" if width is not None else f"width {C} (--width-per-depth {width_per_depth} x --depth {depth})"
    if heads is not None:
        H = heads
    elif C % depth == 0:
        H = depth
    else:
        H = C // 32
        if H < 1 or C % H:
            raise BenchError(f"{src} is divisible neither by --depth {depth} nor by width // 32 heads; give "
                             f"--heads H with H a divisor of {C}, or a width that --depth divides")
    if C % H:
        raise BenchError(f"{src} is not divisible by --heads {H}; valid --heads: a divisor of {C}")
    return C, H


def var_config(depth: int, vqvae: VQVAE, num_classes: int, width_per_depth: int = 32, width: Optional[int] = None,
               heads: Optional[int] = None) -> VARConfig:
    """The embedded family: the release's recipe (heads = depth) at half width per layer, unless width/heads are
    given (the depth-sweep model keeps the default's width so that only depth changes)."""
    C, H = var_shape(depth, width_per_depth, width, heads)
    return VARConfig(depth=depth, embed_dim=C, num_heads=H, vocab_size=vqvae.vocab_size,
                     Cvae=vqvae.Cvae, num_classes=num_classes, patch_nums=tuple(vqvae.v_patch_nums))


def train_var(out: str, vqvae_path: str, depth: int = 4, steps: int = 4000, batch: int = 64, lr: float = 1e-3,
              seed: int = 0, data: str = "shapes", count: int = 20_000, width_per_depth: int = 32,
              label_smooth: float = 0.0, width: Optional[int] = None, heads: Optional[int] = None,
              hflip: Optional[bool] = None):
    var_shape(depth, width_per_depth, width, heads)   # before the tokens are cached in `out`
    vq = load_trained_vqvae(vqvae_path)
    image_size = vq.image_size
    torch.manual_seed(seed)
    hflip = default_hflip(data, hflip)
    images, labels, classes, rec = load_split(data, "train", count, image_size)
    ident = "shapes" if data == "shapes" else rec.data_id
    cache = os.path.join(out, f"tokens-{file_sha256(vqvae_path)[:8]}-{ident}-{count}{'' if hflip else '-noflip'}.pt")
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(cache):
        toks = load_tensors(cache, "token cache")
    else:
        _log(f"tokenizing {len(images)} images" + (" (x2 with mirrors)" if hflip else ""))
        toks = tokenize(vq, images, hflip=hflip)
        torch.save(toks, cache)
    labels2 = torch.cat((labels, labels)) if hflip else labels
    cfg = var_config(depth, vq, len(classes), width_per_depth, width, heads)
    model = VAR(cfg).init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    args = dict(batch=batch, lr=lr, seed=seed, data=data, count=count, depth=depth, label_smooth=label_smooth,
                vqvae=vqvae_path, width=cfg.embed_dim, heads=cfg.num_heads)
    if data != "shapes" or not hflip:
        args["hflip"] = hflip
    tr = VARTrainer(out, steps, args)
    start = tr.resume(model, opt)
    gen = torch.Generator().manual_seed(seed + start)
    model.train()
    last = vq.v_patch_nums[-1] ** 2
    t0 = time.time()
    for step in progress(range(start, steps), desc=f"train var-d{depth}", unit="step", logger=logger):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=min(300, steps // 10 + 1))
        pick = torch.randint(0, len(labels2), (batch,), generator=gen)
        idx = [t[pick].long() for t in toks]
        with torch.no_grad():
            x_in = vq.quantize.idx_to_var_input(idx)
        gt = torch.cat(idx, 1)
        logits = model(labels2[pick], x_in)
        loss = F.cross_entropy(logits.reshape(-1, model.V), gt.reshape(-1), label_smoothing=label_smooth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        if (step + 1) % 50 == 0:
            with torch.no_grad():
                acc_tail = (logits[:, -last:].argmax(-1) == gt[:, -last:]).float().mean().item()
                loss_tail = F.cross_entropy(logits[:, -last:].reshape(-1, model.V), gt[:, -last:].reshape(-1)).item()
            tr.history.append(dict(step=step + 1, loss=round(loss.item(), 4), loss_tail=round(loss_tail, 4),
                                   acc_tail=round(acc_tail, 4)))
            _log(f"var-d{depth} step {step + 1}/{steps} loss {loss.item():.4f} tail {loss_tail:.4f} "
                 f"acc_tail {acc_tail:.3f} ({(time.time() - t0) / (step + 1 - start):.2f}s/step)")
        if (step + 1) % 250 == 0:
            tr.checkpoint(model, opt, step + 1)
    model.eval()
    return tr.finish(model, cfg.to_dict(), dict(classes=classes, vqvae_sha256=file_sha256(vqvae_path),
                                                **_data_meta(data, hflip, rec)))


# ---------------------------------------------------------------------------------------------- classifier
class ClassifierTrainer(_Trainer):
    kind = "classifier"


def train_classifier(out: str, vqvae_path: Optional[str] = None, steps: int = 3000, batch: int = 128, lr: float = 2e-3,
                     seed: int = 0, data: str = "shapes", count: int = 20_000, image_size: int = 32,
                     recon_fraction: float = 0.5, hflip: Optional[bool] = None):
    """Trained on real images and, with probability recon_fraction, on their VQ-VAE reconstructions, so that the
    feature space it defines for FID is not thrown off by the tokenizer's blur."""
    torch.manual_seed(seed)
    hflip = default_hflip(data, hflip)
    images, labels, classes, rec = load_split(data, "train", count, image_size)
    recon = None
    if vqvae_path and recon_fraction > 0:
        vq = load_trained_vqvae(vqvae_path)
        n = min(len(images), 10_000)
        _log(f"reconstructing {n} images through the VQ-VAE")
        with torch.no_grad():
            recon = torch.cat([vq(images[i:i + 200])[0].clamp(-1, 1) for i in range(0, n, 200)])
    model = ShapesClassifier(len(classes), image_size=image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    args = dict(batch=batch, lr=lr, seed=seed, data=data, count=count, recon_fraction=recon_fraction,
                vqvae=vqvae_path)
    if data != "shapes" or not hflip:
        args["hflip"] = hflip
    tr = ClassifierTrainer(out, steps, args)
    start = tr.resume(model, opt)
    gen = torch.Generator().manual_seed(seed + start)
    model.train()
    for step in progress(range(start, steps), desc="train classifier", unit="step", logger=logger):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        pick = torch.randint(0, len(images), (batch,), generator=gen)
        x, y = images[pick].clone(), labels[pick]
        if recon is not None:
            use = (torch.rand(batch, generator=gen) < recon_fraction) & (pick < len(recon))
            x[use] = recon[pick[use]]
        if hflip:
            x = torch.where(torch.rand(batch, 1, 1, 1, generator=gen) < 0.5, x.flip(-1), x)
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shift, dims=(-2, -1))
        x = x + 0.03 * torch.randn(x.shape, generator=gen)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            tr.history.append(dict(step=step + 1, loss=round(loss.item(), 4)))
            _log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}")
        if (step + 1) % 500 == 0:
            tr.checkpoint(model, opt, step + 1)
    model.eval()
    val, vlab, _, val_rec = load_split(data, "val", 2000, image_size)  # held out: never in the training sample
    with torch.no_grad():
        acc = (torch.cat([model(val[i:i + 500]) for i in range(0, len(val), 500)]).argmax(1) == vlab).float().mean().item()
        extra = dict(val_accuracy=acc)
        if vqvae_path:
            vq = load_trained_vqvae(vqvae_path)
            rv = torch.cat([vq(val[i:i + 200])[0].clamp(-1, 1) for i in range(0, len(val), 200)])
            extra["val_accuracy_on_vqvae_reconstructions"] = (model(rv).argmax(1) == vlab).float().mean().item()
    _log(f"classifier {extra}")
    return tr.finish(model, model.config, dict(classes=classes, **extra, **_data_meta(data, hflip, rec, val_rec)))


# ---------------------------------------------------------------------------------------------- ship
def ship(name: str, vqvae_path: str, var_path: str, classifier_path: Optional[str], sampling: Dict,
         alias: Optional[str] = None):
    """Copy trained weights into bench/assets and record them in the manifest."""
    metas = {}   # all three checked before anything is written
    for kind, p in (("vqvae", vqvae_path), ("var", var_path), ("classifier", classifier_path)):
        if p is None:
            continue
        metas[kind] = trained_meta(p, kind, f"--{kind}")
    paths = dict(vqvae=vqvae_path, var=var_path, classifier=classifier_path)
    for kind, meta in metas.items():
        for key in ("args", "history", "command", "code_commit", "steps") + (("classes",) if kind == "var" else ()):
            if key not in meta:
                raise BenchError(f"--{kind}: the metadata beside {paths[kind]} has no {key!r}; give the "
                                 f"{kind}.safetensors written by `python -m bench train {kind}`")
    trained_vqvae_config(vqvae_path, "--vqvae")
    # shipped in float16 to stay small; loading casts back to float32, and every artifact derived later
    # (method fine-tunes) starts from these rounded weights, so nothing depends on the fp32 originals
    sds = {kind: {k: (v.half() if v.is_floating_point() else v) for k, v in read_state_dict(paths[kind]).items()}
           for kind in metas}   # every file read (a corrupt one refused) before any is written
    os.makedirs(ASSETS, exist_ok=True)
    files, sha = {}, {}
    for kind, sd in sds.items():
        tmp = os.path.join(ASSETS, f".{kind}.tmp.safetensors")
        save_state_dict(sd, tmp)
        h = file_sha256(tmp)
        fname = f"{kind}-{name if kind == 'var' else 'shapes'}-{h[:8]}.safetensors"
        os.replace(tmp, os.path.join(ASSETS, fname))
        files[kind], sha[kind] = fname, h
    m = read_manifest()
    var_meta = metas["var"]
    m.setdefault("models", {})[name] = dict(
        files=files, sha256=sha, var_config=var_meta["config"], vqvae_config=metas["vqvae"]["config"],
        sampling=sampling, classifier_config=metas["classifier"]["config"] if "classifier" in metas else None,
        dataset=dict(name=var_meta["args"]["data"], classes=var_meta["classes"],
                     image_size=load_trained_vqvae(vqvae_path).image_size, train_seed=SPLIT_SEEDS["train"],
                     reference_split="val", reference_seed=SPLIT_SEEDS["val"]),
        training={k: dict(command=v["command"], code_commit=v["code_commit"], steps=v["steps"], args=v["args"],
                          final=v["history"][-1] if v["history"] else None,
                          **{x: v[x] for x in v if x.startswith("val_")}) for k, v in metas.items()})
    if alias:
        m.setdefault("aliases", {})[alias] = name
    atomic_write_text(MANIFEST, json.dumps(m, indent=1))
    _log(f"shipped {name}: {files}")
