"""Users' own models: `python -m bench register` puts trained weights in $VARBENCH_HOME/models/<name>/ (default
~/.var-bench; never inside the installed package) with a manifest.json that records the weights' hashes and
configs, the data (path, identity, classes, train/val/test partition, augmentation), the held-out reference,
the default sampling, the training commands and the code commit. Every command then finds the model by name
(`--model NAME`), and `prepare`, `run`, `sweep` and `evaluate` read its data and reference from the manifest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Dict, List, Optional

from bench.atomic import atomic_write_text, swap_directory, temp_directory
from bench.checkpoints import file_sha256
from bench.data import check_held_out_folder, default_hflip_for, folder_classes, folder_data
from bench.env import code_commit
from bench.errors import BenchError
from bench.sampling import SamplingConfig, validate_sampling
from bench.shipped import shipped_names
from bench.train import trained_meta

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SAMPLING_KEYS = ("cfg", "top_k", "top_p")


def home() -> str:
    return os.environ.get("VARBENCH_HOME") or os.path.join(os.path.expanduser("~"), ".var-bench")


def models_dir() -> str:
    return os.path.join(home(), "models")


def list_user_models() -> List[str]:
    root = models_dir()
    if not os.path.isdir(root):
        return []
    # NAME_RE: not a temp directory of a `register` under way or killed (.tmp-...), though it holds a manifest
    return sorted(d for d in os.listdir(root)
                  if NAME_RE.match(d) and os.path.isfile(os.path.join(root, d, "manifest.json")))


def read_user_manifest(name: str) -> Optional[dict]:
    """The manifest of a registered model with its files as absolute paths, or None."""
    path = os.path.join(models_dir(), name, "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        m = json.load(f)
    m["paths"] = {k: os.path.join(models_dir(), name, v) for k, v in m["files"].items()}
    return m


def parse_sampling(text: str) -> Dict[str, float]:
    """'cfg=3.0,top_k=100,top_p=0.95' -> dict; unknown keys and bad numbers are one-line errors."""
    out: Dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        k, sep, v = part.partition("=")
        if not sep or k.strip() not in SAMPLING_KEYS:
            raise BenchError(f"--sampling: bad item {part!r}; valid keys: {', '.join(SAMPLING_KEYS)} "
                             f"(e.g. cfg=3.0,top_k=100,top_p=0.95)")
        if k.strip() in out:
            raise BenchError(f"--sampling: {k.strip()} given twice; give it once")
        try:
            out[k.strip()] = int(v) if k.strip() == "top_k" else float(v)
        except ValueError:
            raise BenchError(f"--sampling: {k.strip()} must be a number, got {v!r}") from None
    return out


def _meta(path: Optional[str], kind: str) -> Optional[dict]:
    if path is None:
        return None
    return trained_meta(path, kind, f"--{kind}")   # the same checks as `train ship`: present, readable, of this kind


def register_model(name: str, vqvae: str, var: str, classifier: Optional[str] = None,
                   sampling: Optional[Dict[str, float]] = None, reference: Optional[str] = None,
                   force: bool = False) -> str:
    """Validate everything, then copy the weights and write the manifest atomically; returns the directory."""
    if not NAME_RE.match(name or ""):
        raise BenchError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (not starting with "
                         f"'.', '_' or '-')")
    taken = shipped_names()
    if name in taken:
        raise BenchError(f"model name {name!r} is taken by a shipped model; choose another (shipped: "
                         f"{', '.join(taken)})")
    final = os.path.join(models_dir(), name)
    if os.path.isdir(final) and not force:
        raise BenchError(f"model {name!r} is already registered in {final}; pass --force to replace it")
    metas = {k: _meta(p, k) for k, p in (("vqvae", vqvae), ("var", var), ("classifier", classifier))}
    vq_sha = file_sha256(vqvae)
    if metas["var"].get("vqvae_sha256") not in (None, vq_sha):
        raise BenchError(f"--var {var} was trained on another VQ-VAE (sha256 {metas['var']['vqvae_sha256'][:12]}), "
                         f"not {vqvae} ({vq_sha[:12]})")
    classes = list(metas["var"].get("classes") or [])
    data = metas["var"]["args"].get("data", "shapes")
    if metas["classifier"] is not None and list(metas["classifier"].get("classes") or classes) != classes:
        raise BenchError(f"--classifier {classifier} was trained on classes "
                         f"{', '.join(metas['classifier']['classes'])} but the VAR on {', '.join(classes)} (the same "
                         f"classes in the same order are needed for class accuracy)")
    if data == "shapes":
        dataset = dict(name="shapes", classes=classes, reference_split="val")
    else:
        fd = folder_data(data)
        if fd.classes != classes:
            raise BenchError(f"the VAR was trained on classes {', '.join(classes)} but its folder {data} now has "
                             f"{', '.join(fd.classes)}")
        for role, meta in metas.items():   # every model trained on this folder as it is now: else its held-out
            if meta is None:                 # split may hold images one of them was trained on
                continue
            trained_on = [r.get("data_id") for r in meta.get("data_splits") or []
                          if r.get("data") == fd.root]   # records of this folder (its real path)
            if trained_on and trained_on[0] != fd.data_id:
                raise BenchError(f"the image folder {data} changed since the {role} was trained on it (identity "
                                 f"{trained_on[0]} then, {fd.data_id} now); train it again on the folder as it is")
        dataset = dict(name="folder", path=fd.root, data_id=fd.data_id, classes=classes, partition=fd.partition,
                       reference_split="val")
    hflip = metas["var"].get("hflip", default_hflip_for(data))
    image_size = metas["vqvae"]["config"]["v_patch_nums"][-1] * 2 ** (len(metas["vqvae"]["config"]["ch_mult"]) - 1)
    dataset.update(image_size=image_size, hflip=hflip,
                   splits={k: m.get("data_splits") for k, m in metas.items() if m is not None})
    if reference is not None:
        if not os.path.isdir(reference):
            raise BenchError(f"--reference must be an image folder (DIR/<class>/*.png), got {reference}")
        if data != "shapes":   # the training folder itself (or a part of it) would put training images in FID
            check_held_out_folder(reference, data)
        subdirs = folder_classes(reference)
        if subdirs != classes:
            raise BenchError(f"reference folder {reference} has classes {', '.join(subdirs) or '(none)'} but the "
                             f"model was trained on {', '.join(classes)}; give a held-out folder of the same classes")
        dataset["reference"] = os.path.realpath(reference)
    vocab = metas["var"]["config"]["vocab_size"]   # the shipped default's sampling unless given
    s = dict(dict(cfg=3.0, top_k=min(100, vocab), top_p=0.95), **(sampling or {}))
    validate_sampling(SamplingConfig(**s), vocab)

    with temp_directory(final) as tmp:
        files, sha = {}, {}
        for kind, p in (("vqvae", vqvae), ("var", var), ("classifier", classifier)):
            if p is None:
                continue
            files[kind] = f"{kind}.safetensors"
            shutil.copyfile(p, os.path.join(tmp, files[kind]))
            sha[kind] = file_sha256(os.path.join(tmp, files[kind]))
        manifest = dict(
            name=name, files=files, sha256=sha, var_config=metas["var"]["config"],
            vqvae_config=metas["vqvae"]["config"],
            classifier_config=metas["classifier"]["config"] if metas["classifier"] else None,
            sampling=s, dataset=dataset, registered_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            code_commit=code_commit(),
            training={k: dict(command=m.get("command"), code_commit=m.get("code_commit"), steps=m.get("steps"),
                              args=m.get("args"), threads=m.get("threads"),
                              final=m["history"][-1] if m.get("history") else None,
                              **{x: m[x] for x in m if x.startswith("val_")})
                      for k, m in metas.items() if m is not None})
        atomic_write_text(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=1, default=str))
        if not swap_directory(tmp, final):
            raise BenchError(f"model {name!r} was registered by another process meanwhile ({final}); pass --force "
                             f"to replace it")
    return final
