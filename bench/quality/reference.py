"""Reference sets of the quality metrics and the on-disk feature cache: parse, check, load, extract, cache.

Reference features and FID statistics are cached on disk (default <cache root>/quality/ref-<key>.npz), keyed by
everything they depend on, as are the features of dense's same-seed images (paired-features-<key>.npz); cache files
are plain .npz read with allow_pickle=False and written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bench.artifacts import cache_root
from bench.atomic import atomic_path
from bench.data import (SHAPES_CLASSES, SPLIT_SEEDS, check_held_out_folder, folder_classes, folder_data, load_split,
                        shapes_images, stratified_pick)
from bench.defaults import MAX_REFERENCE_COUNT
from bench.errors import BenchError
from bench.log import get_logger
from bench.quality.extractors import Extractor
from bench.quality.statistics import PRC_NEIGHBORHOOD, fid_statistics, knn_radii
from bench.stored_images import Images, images_digest

logger = get_logger(__name__)

DEFAULT_REFERENCE_COUNT = 5000             # held-out shapes images (render ~3 ms each once, then cached)
CACHE_VERSION = 1                          # bump when the extraction or the cached content changes
IMAGE_EXTS = "png,jpg,jpeg,bmp,webp"


class Reference:
    """A parsed reference spec: kind shapes | folder | npz, its description, image count and cache identity."""

    def __init__(self, kind: str, desc: str, count: Optional[int], has_images: bool, identity: dict, **info):
        self.kind, self.desc, self.count, self.has_images, self.identity, self.info = (
            kind, desc, count, has_images, identity, info)


def _npz_members(path: str) -> Dict[str, Tuple[tuple, str]]:
    """{name: (shape, dtype)} of an .npz without loading its arrays."""
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for n in z.namelist():
                if not n.endswith(".npy"):
                    continue
                with z.open(n) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                out[n[:-4]] = (tuple(shape), str(dtype))
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise BenchError(f"cannot read reference statistics {path}: {str(e).splitlines()[0][:160]}") from None
    return out


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return dict(path=os.path.realpath(path), file_size=st.st_size, mtime_ns=st.st_mtime_ns)


def parse_reference(bundle, reference: Optional[str] = None, reference_count: Optional[int] = None) -> Reference:
    """Validate a reference spec (no images are read): None (the model's held-out set), 'shapes[:split]',
    an image folder, or an .npz with mu/sigma (FID statistics) and/or arr_0 (N,H,W,3) uint8 images."""
    valid = "valid: none (embedded models), shapes[:val|test], an image folder, or an .npz with mu/sigma and/or arr_0"
    if reference_count is not None and not 1 <= reference_count <= MAX_REFERENCE_COUNT:
        raise BenchError(f"reference count must be in 1..{MAX_REFERENCE_COUNT}, got {reference_count}")
    ds = getattr(bundle, "dataset", None) or {}
    size = int(getattr(bundle, "image_size", 0) or ds.get("image_size", 32))
    if reference is None and ds.get("reference"):   # a user's model registered with its own held-out folder
        reference = ds["reference"]
    if reference is None and ds.get("name") == "folder":   # a user's model: the held-out 'val' split of its folder
        fd = folder_data(ds["path"], ds.get("partition"))
        _check_classes(fd.classes, bundle, f"image folder {ds['path']}")
        if ds.get("data_id") not in (None, fd.data_id):   # its split would move: training images in the reference
            raise BenchError(f"the image folder {ds['path']} changed since model {getattr(bundle, 'name', '?')} was "
                             f"registered (identity {ds['data_id']} then, {fd.data_id} now), so its held-out split "
                             f"may now hold training images; train and register again, or give --reference")
        _, _, rec = fd.sample("val", reference_count, 0)
        return Reference("split", f"{fd.data_id}:val ({rec.count} images, {min(rec.per_class)}-{max(rec.per_class)} "
                         f"per class, {size}px)", rec.count, True,
                         dict(kind="split", data_id=fd.data_id, partition=fd.partition, count=reference_count,
                              size=size), root=ds["path"], partition=ds.get("partition"), size=size,
                         record=rec.to_dict())
    if reference is None or str(reference).startswith("shapes"):
        if reference is None and ds.get("name") != "shapes":
            raise BenchError(f"model {getattr(bundle, 'name', '?')} has no built-in held-out set; give a reference "
                             f"(image folder or .npz such as ADM's VIRTUAL_imagenet256_labeled.npz)")
        split = ds.get("reference_split", "val") if reference in (None, "shapes") else str(reference).partition(":")[2]
        if split not in SPLIT_SEEDS or split == "train":
            raise BenchError(f"unknown reference {reference!r}; held-out shapes splits: val, test; {valid}")
        n = int(reference_count or DEFAULT_REFERENCE_COUNT)
        num_classes = len(ds.get("classes", SHAPES_CLASSES))
        size = int(ds.get("image_size", size))
        record = dict(data="shapes", data_id="shapes", split=split, count=n, seed=SPLIT_SEEDS[split],
                      per_class=np.bincount(np.arange(n) % num_classes, minlength=num_classes).tolist())
        return Reference("shapes", f"shapes:{split}[0:{n}]@{size}px", n, True,
                         dict(kind="shapes", split=split, seed=SPLIT_SEEDS[split], count=n, size=size,
                              num_classes=num_classes), split=split, size=size, num_classes=num_classes,
                         record=record)
    path = str(reference)
    if os.path.isdir(path):
        if ds.get("name") == "folder" and ds.get("path"):   # as `register`: never FID against training images
            check_held_out_folder(path, ds["path"])
        subdirs = folder_classes(path)   # the same class listing as training (hidden folders left out)
        if not subdirs:   # the class-stratified subset and the class checks need one subfolder per class
            raise BenchError(f"reference folder {path} has no class subfolders; valid layout: DIR/<class>/*.png (one "
                             f"subfolder per class, as a training folder), or an .npz")
        if ds.get("name") == "folder":   # a class-per-subfolder reference must have the model's classes
            _check_classes(subdirs, bundle, f"reference folder {path}")
        from torch_fidelity.utils import glob_samples_paths
        files = glob_samples_paths(path, True, IMAGE_EXTS, verbose=False)
        if not files:
            raise BenchError(f"reference folder {path} has no images ({IMAGE_EXTS}, searched recursively)")
        n = min(len(files), reference_count) if reference_count else len(files)
        listing = hashlib.sha256("\n".join(f"{f}:{os.path.getsize(f)}:{os.stat(f).st_mtime_ns}"
                                           for f in files).encode()).hexdigest()
        return Reference("folder", f"folder:{os.path.realpath(path)} ({n} of {len(files)} images, {size}px)", n, True,
                         dict(kind="folder", path=os.path.realpath(path), listing=listing, count=n, size=size,
                              sample="stratified"), files=files, size=size, root=path)
    if os.path.isfile(path) and path.endswith(".npz"):
        members = _npz_members(path)
        has_stats = "mu" in members and "sigma" in members
        imgs = members.get("arr_0")
        if imgs is not None and not (len(imgs[0]) == 4 and imgs[0][-1] == 3 and imgs[1] == "uint8"):
            raise BenchError(f"{path}: arr_0 must be (N,H,W,3) uint8 images, got {imgs[0]} {imgs[1]}")
        if not has_stats and imgs is None:
            raise BenchError(f"{path} has neither mu/sigma (FID statistics) nor arr_0 (images); keys: "
                             f"{', '.join(members) or '(none)'}")
        n_img = imgs[0][0] if imgs is not None else None
        n = min(n_img, reference_count) if (n_img and reference_count) else n_img
        labels = members.get("arr_1")   # ADM-style labelled batches: (N,) class labels beside the images
        sample = "all" if n == n_img else "stratified" if labels is not None else "random"
        if sample == "stratified" and tuple(labels[0]) != (n_img,):
            raise BenchError(f"{path}: arr_1 (labels) must have one entry per arr_0 image ({n_img}) to draw a "
                             f"class-stratified subset of {n}, got shape {labels[0]}")
        subset = {"all": "", "stratified": ", a seeded subset stratified by arr_1's classes",
                  "random": ", a seeded random subset (no arr_1 labels to stratify by)"}[sample]
        parts = (["mu/sigma"] if has_stats else []) + ([f"arr_0 {n} of {n_img} images{subset}"]
                                                       if imgs is not None else [])
        return Reference("npz", f"npz:{os.path.realpath(path)} ({', '.join(parts)})", n, imgs is not None,
                         dict(kind="npz", **_file_identity(path), count=n, size=size,
                              **({"sample": sample} if sample != "all" else {})), path=path,
                         has_stats=has_stats, stats_dim=members["mu"][0][0] if has_stats and members["mu"][0] else None,
                         size=size)
    if not os.path.exists(path):
        raise BenchError(f"reference not found: {path}; {valid}")
    raise BenchError(f"cannot use {path} as a reference; {valid}")


def _check_classes(classes, bundle, what: str) -> None:
    want = list(getattr(bundle, "class_names", None) or [])
    if want and list(classes) != want:
        raise BenchError(f"{what} has classes {', '.join(classes)} but model {getattr(bundle, 'name', '?')} was "
                         f"trained on {', '.join(want)}; give a reference with the model's classes")


def _reference_files(ref: Reference) -> List[str]:
    """The image files of a folder reference that are read: all, or a seeded class-stratified subset (class = first
    subfolder, if any)."""
    files = ref.info["files"]
    if ref.count < len(files):
        root = ref.info.get("root") or os.path.commonpath(files)
        groups = [os.path.relpath(f, root).split(os.sep)[0] if os.sep in os.path.relpath(f, root) else ""
                  for f in files]
        files = [files[i] for i in stratified_pick(groups, ref.count, 0)]
    return files


def check_reference_images(ref: Reference) -> None:
    """One line (BenchError) naming the first reference image of a folder that is empty or not a readable image:
    each file read for the reference is opened and verified (header and checksums, no decoding), so a corrupt file
    is found before any generation, not after it."""
    if ref.kind != "folder":
        return
    from PIL import Image
    for f in _reference_files(ref):
        try:
            if os.path.getsize(f) == 0:
                raise BenchError(f"reference image {f} is empty (0 bytes); remove it or replace it with an image")
            with Image.open(f) as im:
                im.verify()
        except BenchError:
            raise
        except Exception as e:   # PIL raises many types for a bad file (OSError, SyntaxError, struct.error, ...)
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise BenchError(f"reference image {f} is not a readable image ({why}); remove it or replace "
                             f"it with an image") from None


def _load_reference_images(ref: Reference) -> torch.Tensor:
    """uint8 (N,3,H,W) on CPU."""
    if ref.kind == "split":
        logger.info(f"reading {ref.count} reference images ({ref.desc})")
        imgs = load_split(ref.info["root"], "val", ref.identity["count"], ref.info["size"], 0,
                          ref.info["partition"])[0]
        return imgs.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    if ref.kind == "shapes":
        logger.info(f"rendering {ref.count} reference images ({ref.desc})")
        imgs, _ = shapes_images(ref.info["split"], ref.count, ref.info["size"], num_classes=ref.info["num_classes"])
        return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    if ref.kind == "folder":
        import torchvision
        from torch_fidelity.datasets import ImagesPathDataset, TransformPILtoRGBTensor
        files = _reference_files(ref)
        tf = torchvision.transforms.Compose([torchvision.transforms.Resize(ref.info["size"]),
                                             torchvision.transforms.CenterCrop(ref.info["size"]),
                                             TransformPILtoRGBTensor()])
        ds = ImagesPathDataset(files, tf)
        logger.info(f"reading {len(files)} reference images from {ref.desc}")
        try:
            return torch.stack([ds[i] for i in range(len(ds))])
        except OSError as e:
            raise BenchError(f"cannot read a reference image in {ref.desc}: {str(e).splitlines()[0][:160]}") from None
    with np.load(ref.info["path"], allow_pickle=False) as z:
        sample = ref.identity.get("sample", "all")
        if sample == "all":
            arr = z["arr_0"]
        else:   # the first images of a file may be one class (files written class by class): a seeded subset
            n_img = len(z["arr_0"])
            if sample == "stratified":
                pick = stratified_pick([str(c) for c in z["arr_1"].reshape(-1).tolist()], ref.count, 0)
            else:
                pick = np.sort(np.random.default_rng([0, 17]).permutation(n_img)[:ref.count])
            arr = z["arr_0"][np.asarray(pick)]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "quality")


def reference_key(extractor: Extractor, ref: Reference) -> str:
    ident = dict(version=CACHE_VERSION, extractor=extractor.name, weights_sha256=extractor.sha256,
                 layer=extractor.feature_layer, prc_neighborhood=PRC_NEIGHBORHOOD, reference=ref.identity)
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{extractor.name}-{extractor.sha256[:8]}-{ref.kind}-{h}"


def _atomic_savez(path: str, **arrays) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _checked_stats(mu: np.ndarray, sigma: np.ndarray, where: str) -> dict:
    """FID statistics as float64, or one line (BenchError) when they cannot define a FID: a NaN or Inf in them
    would make every FID of the run NaN."""
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise BenchError(f"{where}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise BenchError(f"{where}: mu/sigma hold non-finite values (NaN or Inf); they cannot define a FID")
    return dict(mu=mu, sigma=sigma)


def reference_features(extractor: Extractor, ref: Reference, *, device="cpu", cache_dir: Optional[str] = None
                       ) -> Tuple[Optional[torch.Tensor], dict, Optional[torch.Tensor], bool, str]:
    """(features (N,D) or None, FID statistics {mu, sigma} float64, k-NN radii for precision (N,) or None,
    came from the cache, cache key)."""
    key = reference_key(extractor, ref)
    path = os.path.join(cache_dir or default_cache_dir(), f"ref-{key}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                feats = torch.from_numpy(z["features"]) if "features" in z.files else None
                radii = torch.from_numpy(z["prc_radii"]) if "prc_radii" in z.files else None
                stats = _checked_stats(z["mu"], z["sigma"], path)
            logger.info(f"reusing cached reference features {key}")
            return feats, stats, radii, True, key
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, BenchError):
            logger.info(f"cache file {path} is unreadable; recomputing")
    feats, stats, radii = None, None, None
    if ref.kind == "npz" and ref.info["has_stats"]:
        with np.load(ref.info["path"], allow_pickle=False) as z:  # the published statistics define the FID
            stats = _checked_stats(z["mu"], z["sigma"], ref.info["path"])
    if ref.has_images:
        t0 = time.time()
        images = _load_reference_images(ref)
        feats = extractor.extract(images, device)[extractor.feature_layer]
        logger.info(f"extracted {extractor.tag} features of {len(feats)} reference images in {time.time() - t0:.1f}s")
    if stats is None:
        stats = _checked_stats(**fid_statistics(feats), where=f"the features of {ref.desc}")
    arrays = dict(mu=stats["mu"], sigma=stats["sigma"],
                  meta=np.array(json.dumps(dict(key=key, reference=ref.desc, count=ref.count, extractor=extractor.tag,
                                                created=time.strftime("%Y-%m-%dT%H:%M:%S%z")))))
    if feats is not None:
        radii = knn_radii(feats, PRC_NEIGHBORHOOD) if len(feats) > PRC_NEIGHBORHOOD else None
        arrays["features"] = feats.numpy()
        if radii is not None:
            arrays["prc_radii"] = radii.numpy()
    _atomic_savez(path, **arrays)
    logger.info(f"cached reference features {key}")
    return feats, stats, radii, False, key



def _paired_features(images: Images, extractor: Extractor, key: Optional[str], cache_dir: Optional[str],
                     batch_size: Optional[int]) -> Dict[str, torch.Tensor]:
    """Features of dense's same-seed images, cached on disk by (dense outputs entry, the images' own bytes,
    extractor): an entry regenerated with other content (a rebuilt entry, a nondeterministic GPU) is a new key."""
    path = None
    if key is not None:
        # hashed a chunk at a time (the digest of the whole buffer): a copy would hold every image (9.8 GB at 256²)
        content = images_digest(images)
        h = hashlib.sha256(json.dumps([CACHE_VERSION, key, extractor.name, extractor.sha256, content,
                                       tuple(images.shape)]).encode()).hexdigest()
        path = os.path.join(cache_dir or default_cache_dir(), f"paired-features-{h[:20]}.npz")
        if os.path.isfile(path):
            try:
                with np.load(path, allow_pickle=False) as z:
                    return {k: torch.from_numpy(z[k]) for k in z.files}
            except (OSError, ValueError, zipfile.BadZipFile):
                pass   # a damaged entry is recomputed
    got = extractor.extract(images, batch_size=batch_size)
    if path is not None:
        _atomic_savez(path, **{k: v.cpu().numpy() for k, v in got.items()})
    return got
