"""Sample quality: FID (with a bootstrap interval), IS, precision/recall and KID in one call, torch-fidelity style.

    q = quality_metrics(images_uint8, bundle, labels=labels)   # embedded model: held-out shapes, its classifier
    q = quality_metrics(images_uint8, bundle, reference="VIRTUAL_imagenet256_labeled.npz",
                        inception_weights="weights-inception-2015-12-05-6726825d.pth")
    q["fid"], q["fid_ci_low"], q["fid_ci_high"], q["precision"], q["kid_mean"], q["reference_cached"] ...

Feature extractors are torch-fidelity's: our small shapes classifier is registered with torch-fidelity as
'var-bench-classifier' (works offline; `torch_fidelity.calculate_metrics(feature_extractor='var-bench-classifier',
feature_extractor_weights_path=...)` uses it too), and an Inception weights file selects torch-fidelity's standard
'inception-v3-compat'. Features are extracted once per call (torch-fidelity's extractor modules, our batching on the
images' device); FID and IS are torch-fidelity's functions applied to those features; KID and precision/recall
give torch-fidelity's numbers (tested) by faster routes (one kernel pass; cached reference k-NN radii); the FID
bootstrap resamples the same generated features (no second extraction).

Reference features and FID statistics are cached on disk (default <cache root>/quality/ref-<key>.npz), keyed by
everything they depend on; cache files are plain .npz read with allow_pickle=False and written atomically.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from bench.errors import BenchError
from bench.log import get_logger, progress

logger = get_logger(__name__)

EXTRACTOR_NAME = "var-bench-classifier"    # our classifier, as registered with torch-fidelity
INCEPTION_NAME = "inception-v3-compat"     # torch-fidelity's TF-compatible Inception-v3
METRICS = ("fid", "isc", "prc", "kid")
DEFAULT_REFERENCE_COUNT = 5000             # held-out shapes images (render ~3 ms each once, then cached)
MAX_REFERENCE_COUNT = 1_000_000            # more reference images than any FID protocol uses (ImageNet: 50k)
ISC_SPLITS = 10                            # torch-fidelity's default
KID_SUBSETS = 100                          # torch-fidelity's default
KID_SUBSET_SIZE = 1000                     # torch-fidelity's default, lowered to min(N, reference) for small sets
PRC_NEIGHBORHOOD = 3                       # k of the k-NN manifold (Kynkäänniemi et al.; torch-fidelity default)
PSNR_CAP_DB = 100.0                        # PSNR of identical images (infinite) is reported as this value
FIDELITY_CHUNK_VALUES = 1 << 20            # image values (N·C·H·W) per chunk of the per-image PSNR/SSIM pass
SSIM_MIN_SIDE = 6                          # torchmetrics reflect-pads by 5 px (11-px Gaussian window)
CACHE_VERSION = 1                          # bump when the extraction or the cached content changes
IMAGE_EXTS = "png,jpg,jpeg,bmp,webp"
FID_DELTA_TARGET = 0.01                    # the sample-size guidance: ΔFID interval half-width at 1% of dense FID


# ---------------------------------------------------------------------------------------------- extractor
def infer_classifier_config(sd: Dict[str, torch.Tensor]) -> dict:
    """ShapesClassifier kwargs read off its weights (the architecture fixes them)."""
    try:
        width = int(sd["body.0.0.weight"].shape[0])
        feature_dim, flat = (int(s) for s in sd["features.weight"].shape)
        num_classes = int(sd["head.weight"].shape[0])
    except KeyError as e:
        raise BenchError(f"quality classifier weights lack {e.args[0]!r}; is this a ShapesClassifier state dict?") \
            from None
    side = math.isqrt(max(flat // (4 * width), 0))
    return dict(num_classes=num_classes, width=width, feature_dim=feature_dim, image_size=8 * side)


def _classifier_config_for(path: str) -> Optional[dict]:
    """The manifest's `classifier_config` of a shipped classifier file, if this is one."""
    from bench.zoo import read_manifest
    base = os.path.basename(path)
    for entry in read_manifest().get("models", {}).values():
        if entry.get("files", {}).get("classifier") == base and entry.get("classifier_config"):
            return dict(entry["classifier_config"])
    return None


def _register():
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.helpers import vassert
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """bench.models.classifier.ShapesClassifier as a torch-fidelity feature extractor.

        Input: uint8 (N,3,H,W) as torch-fidelity passes images. Features: 'features' (the 128-d penultimate layer:
        FID, KID, PR), 'logits' (the trained class posterior: IS) and 'logits_unbiased' (head without its bias, for
        parity with Inception's feature names). Weights: `feature_extractor_weights_path` (safetensors or a plain
        state dict, loaded without pickled code); `classifier_config` (ShapesClassifier kwargs) is optional."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, classifier_config=None, **kwargs):
            super().__init__(name, features_list)
            from bench.checkpoints import check_compatible, read_state_dict
            from bench.models.classifier import ShapesClassifier
            vassert(feature_extractor_weights_path is not None,
                    f"{name} needs feature_extractor_weights_path (the classifier's .safetensors)")
            sd = read_state_dict(feature_extractor_weights_path, "quality classifier weights")
            cfg = dict(classifier_config or _classifier_config_for(feature_extractor_weights_path)
                       or infer_classifier_config(sd))
            self.net = ShapesClassifier(**cfg)
            check_compatible(self.net, sd, f"quality classifier weights {feature_extractor_weights_path}",
                             f"ShapesClassifier({cfg})")
            self.net.load_state_dict(sd, strict=True)  # shipped fp16 weights are cast to fp32 here
            self.net.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPU
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "features", "logits", "logits_unbiased"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

        def forward(self, x):
            vassert(torch.is_tensor(x) and x.dtype == torch.uint8,
                    "Expecting image as torch.Tensor with dtype=torch.uint8")
            vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
            x = x.float().div(127.5).sub(1).contiguous(memory_format=torch.channels_last)  # range of to_model_range
            f, logits = self.net.embed(x)
            out = {"features": f, "logits": logits}
            if "logits_unbiased" in self.features_list:
                out["logits_unbiased"] = logits - self.net.head.bias
            return tuple(out[k].float() for k in self.features_list)

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, ClassifierFeatureExtractor)
    return FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME]


ClassifierFeatureExtractor = _register()

_SHA_MEMO: Dict[tuple, str] = {}
_EXTRACTORS: Dict[tuple, torch.nn.Module] = {}
_INCEPTION: Dict[str, Dict[str, torch.Tensor]] = {}


def _verified_inception(path: str):
    """(sha256, tensors) of an Inception weights file whose bytes are read exactly once: the hash, the safe load
    (no pickled code) and the finiteness check all see those bytes, so a file swapped later changes nothing."""
    from bench.checkpoints import read_state_dict
    with open(path, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    if sha not in _INCEPTION:
        _INCEPTION.clear()   # one set of Inception weights in memory at a time (~100 MB)
        _INCEPTION[sha] = read_state_dict(path, "Inception weights", data=data)
    return sha, _INCEPTION[sha]


def _weights_sha(path: str) -> str:
    from bench.checkpoints import file_sha256
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


class Extractor:
    """Which torch-fidelity extractor, with which weights, and the layer each metric reads."""

    def __init__(self, name: str, weights: str, config: Optional[dict] = None):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        self.name, self.weights, self.config = name, weights, config
        if name == INCEPTION_NAME:
            self.sha256, self._state = _verified_inception(weights)
        else:
            self.sha256 = _weights_sha(weights)
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.layers = {m: cls.get_default_feature_layer_for_metric(m) for m in METRICS}
        # one feature array serves FID, KID and PR (true for both extractors; the cache stores that one)
        assert self.layers["fid"] == self.layers["kid"] == self.layers["prc"]
        self.feature_layer, self.isc_layer = self.layers["fid"], self.layers["isc"]

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.sha256[:8]}"

    @property
    def feature_dim(self) -> int:
        if self.name == INCEPTION_NAME:
            return int(self.feature_layer)
        from bench.checkpoints import read_state_dict
        return int(read_state_dict(self.weights, "quality classifier weights")["features.weight"].shape[0])

    def module(self, device) -> torch.nn.Module:
        """The torch-fidelity module on `device`, built once per (weights, device)."""
        key = (self.name, self.sha256, str(device))
        if key not in _EXTRACTORS:
            from torch_fidelity.utils import create_feature_extractor
            with tempfile.TemporaryDirectory(prefix="var-bench-inception-") as private:
                weights = self.weights
                if self.name == INCEPTION_NAME:
                    # torch-fidelity unpickles its weights file with weights_only=False: it never sees the user's
                    # file, only a copy written here (in a directory only we can read) from the verified tensors
                    weights = os.path.join(private, "inception-verified.pt")
                    torch.save(self._state, weights)
                kwargs = dict(feature_extractor_weights_path=weights, verbose=False)
                if self.config:
                    kwargs["classifier_config"] = self.config
                try:
                    fe = create_feature_extractor(self.name, [self.feature_layer, self.isc_layer], cuda=False,
                                                  **kwargs)
                except RuntimeError as e:  # load_state_dict: wrong file for this architecture
                    first = str(e).strip().splitlines()[0][:200]
                    raise BenchError(f"weights {self.weights} do not fit torch-fidelity's {self.name}: {first}") \
                        from None
            if len(_EXTRACTORS) >= 4:
                _EXTRACTORS.pop(next(iter(_EXTRACTORS)))
            _EXTRACTORS[key] = fe.to(device)
        return _EXTRACTORS[key]

    @torch.no_grad()
    def extract(self, images: torch.Tensor, device=None, batch_size: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """uint8 (N,3,H,W) -> {layer: (N, D) float32 CPU tensor}, batched on `device` (default: the images')."""
        device = torch.device(device) if device is not None else images.device
        batch_size = batch_size or (64 if self.name == INCEPTION_NAME else 250)  # Inception works at 299px
        fe = self.module(device)
        parts: Dict[str, List[torch.Tensor]] = {}
        for batch in progress(images.split(batch_size), desc=f"{self.name} features", unit="batch", logger=logger):
            out = fe.convert_features_tuple_to_dict(fe(batch.to(device, non_blocking=True)))
            for k, v in out.items():
                parts.setdefault(k, []).append(v.float().cpu())
        return {k: torch.cat(v) for k, v in parts.items()}


def resolve_extractor(bundle=None, inception_weights: Optional[str] = None,
                      classifier: Optional[str] = None) -> Extractor:
    """Inception-v3 when a weights file is given (nothing is downloaded), else the model's shipped classifier."""
    if inception_weights is not None:
        if not os.path.isfile(inception_weights):
            raise BenchError(f"Inception weights not found: {inception_weights} (torch-fidelity's "
                             f"weights-inception-2015-12-05-6726825d.pth; nothing can be downloaded here)")
        return Extractor(INCEPTION_NAME, inception_weights)   # verified as it is read (_verified_inception)
    path = classifier or (bundle.classifier if bundle is not None else None)
    if not path:
        name = getattr(bundle, "name", "this model")
        raise BenchError(f"{name} ships no quality classifier; give Inception weights (inception_weights= / "
                         f"--inception-weights) or a classifier .safetensors")
    if not os.path.isfile(path):
        raise BenchError(f"quality classifier weights not found: {path}")
    return Extractor(EXTRACTOR_NAME, path, _classifier_config_for(path))


# ---------------------------------------------------------------------------------------------- reference sets
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
        from bench.data import folder_data
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
        from bench.data import SHAPES_CLASSES, SPLIT_SEEDS
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
        from bench.data import check_held_out_folder, folder_classes
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
        from bench.data import stratified_pick
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
        from bench.data import load_split
        logger.info(f"reading {ref.count} reference images ({ref.desc})")
        imgs = load_split(ref.info["root"], "val", ref.identity["count"], ref.info["size"], 0,
                          ref.info["partition"])[0]
        return imgs.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    if ref.kind == "shapes":
        from bench.data import shapes_images
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
                from bench.data import stratified_pick
                pick = stratified_pick([str(c) for c in z["arr_1"].reshape(-1).tolist()], ref.count, 0)
            else:
                pick = np.sort(np.random.default_rng([0, 17]).permutation(n_img)[:ref.count])
            arr = z["arr_0"][np.asarray(pick)]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def default_cache_dir() -> str:
    from bench.artifacts import cache_root
    return os.path.join(cache_root(), "quality")


def reference_key(extractor: Extractor, ref: Reference) -> str:
    ident = dict(version=CACHE_VERSION, extractor=extractor.name, weights_sha256=extractor.sha256,
                 layer=extractor.feature_layer, prc_neighborhood=PRC_NEIGHBORHOOD, reference=ref.identity)
    h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return f"{extractor.name}-{extractor.sha256[:8]}-{ref.kind}-{h}"


def _atomic_savez(path: str, **arrays) -> None:
    from bench.atomic import atomic_path
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


# ---------------------------------------------------------------------------------------------- metrics
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


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples the classifier assigns to their conditioning class (conditional accuracy)."""
    return float((logits.argmax(1).cpu() == torch.as_tensor(labels).cpu()).double().mean())


def paired_accuracy_bootstrap(logits: torch.Tensor, dense_logits: torch.Tensor, labels: torch.Tensor,
                              resamples: int, seed: int, level: float = 0.95) -> Tuple[float, float, float]:
    """class accuracy(method) - class accuracy(dense) and its 95% interval: the paired, class-stratified bootstrap
    of paired_fid_bootstrap (the same resample indices for both sets) over per-sample correctness."""
    lab = torch.as_tensor(labels).cpu()
    a = (logits.argmax(1).cpu() == lab).double().numpy()
    b = (dense_logits.argmax(1).cpu() == lab).double().numpy()
    delta = float(a.mean() - b.mean())
    if np.array_equal(a, b):   # every resample differs by exactly 0
        return delta, delta, delta
    if resamples < 1:          # --bootstrap 0: the estimate without an interval
        return delta, None, None
    boot = _resampled_means(a - b, _strata(lab, len(a)), resamples, seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return delta, float(lo), float(hi)


def _accuracy_applies(extractor, logits: torch.Tensor, labels, bundle) -> bool:
    """Class accuracy needs the model's own classifier (its classes are the model's); not Inception."""
    return (extractor.name == EXTRACTOR_NAME and labels is not None
            and logits.shape[1] == getattr(bundle, "num_classes", logits.shape[1]))


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
DIST_ROWS = 1000     # rows of a distance block held at once: 1000 × 60,000 float32 = 240 MB (10,000 rows: 2.4 GB)


def knn_radii(features: torch.Tensor, k: int = PRC_NEIGHBORHOOD) -> torch.Tensor:
    """Distance of each point to its k-th nearest neighbour (itself excluded), as torch-fidelity computes it, one
    block of DIST_ROWS rows at a time: the full N×N matrix would hold 14 GB at N = 60,000."""
    from torch_fidelity.metric_prc import calc_cdist_full
    return torch.cat([calc_cdist_full(block, features, CDIST_ROWS).kthvalue(k + 1, dim=1).values
                      for block in features.split(DIST_ROWS)])


def prc_indicators(gen: torch.Tensor, ref: torch.Tensor, k: int = PRC_NEIGHBORHOOD,
                   ref_radii: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The per-sample indicators whose means are improved precision and recall: (bool (n_gen,): generated sample
    inside some reference point's k-NN ball, bool (n_ref,): reference point inside some generated sample's ball).
    The reference × generated distances are taken DIST_ROWS reference rows at a time (5000 × 60,000 at once: 1.2 GB)."""
    from torch_fidelity.metric_prc import calc_cdist_full
    gen_radii = knn_radii(gen, k)
    ref_radii = knn_radii(ref, k) if ref_radii is None else ref_radii.to(gen_radii.device)
    precision = torch.zeros(len(gen), dtype=torch.bool, device=gen_radii.device)
    recall = []
    for s in range(0, len(ref), DIST_ROWS):
        dist = calc_cdist_full(ref[s:s + DIST_ROWS], gen, CDIST_ROWS)
        recall.append((dist <= gen_radii).any(dim=1))                                   # real inside generated
        precision |= (dist <= ref_radii[s:s + DIST_ROWS, None]).any(dim=0)             # generated inside real
    return precision, torch.cat(recall)


def prc_features(gen: torch.Tensor, ref: torch.Tensor, k: int = PRC_NEIGHBORHOOD,
                 ref_radii: Optional[torch.Tensor] = None) -> Tuple[float, float]:
    """torch-fidelity's improved precision/recall (`calculate_precision_recall_full`, same numbers, tested), with
    the reference's k-NN radii — the n_ref² part of the work — passed in from the reference cache."""
    precision, recall = prc_indicators(gen, ref, k, ref_radii)
    return precision.float().mean().item(), recall.float().mean().item()


def metric_requirements(n: int, n_ref: Optional[int], metrics: Sequence[str], ref_has_images: bool = True) -> List[str]:
    """Problems with set sizes for the requested metrics (empty if fine)."""
    bad = []
    if "fid" in metrics and n < 2:
        bad.append(f"FID needs >= 2 samples (covariance), got {n}")
    if "isc" in metrics and n < ISC_SPLITS:
        bad.append(f"IS needs >= {ISC_SPLITS} samples ({ISC_SPLITS} splits), got {n}")
    if "prc" in metrics and n < PRC_NEIGHBORHOOD + 1:
        bad.append(f"precision/recall need > {PRC_NEIGHBORHOOD} samples (k={PRC_NEIGHBORHOOD} neighbours), got {n}")
    if "kid" in metrics and n < 2:
        bad.append(f"KID needs >= 2 samples (subset size >= 2), got {n}")
    if n_ref is not None and ref_has_images:
        if "fid" in metrics and n_ref < 2:
            bad.append(f"FID needs >= 2 reference images, got {n_ref}")
        if "prc" in metrics and n_ref < PRC_NEIGHBORHOOD + 1:
            bad.append(f"precision/recall need > {PRC_NEIGHBORHOOD} reference images, got {n_ref}")
        if "kid" in metrics and n_ref < 2:
            bad.append(f"KID needs >= 2 reference images, got {n_ref}")
    return bad


def _check_metrics(metrics) -> Tuple[str, ...]:
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise BenchError(f"unknown quality metric {unknown[0] if unknown else '(none)'!r}; valid: {', '.join(METRICS)}")
    return metrics


def _prepare(bundle, samples, reference, inception_weights, metrics, reference_count, classifier):
    metrics = _check_metrics(metrics)
    extractor = resolve_extractor(bundle, inception_weights, classifier)
    ref = parse_reference(bundle, reference, reference_count)
    notes = []
    if ref.kind == "npz":
        if ref.info["has_stats"] and ref.info["stats_dim"] != extractor.feature_dim and "fid" in metrics:
            raise BenchError(f"reference statistics {ref.desc} are {ref.info['stats_dim']}-d but {extractor.tag} gives "
                             f"{extractor.feature_dim}-d features; Inception statistics need inception_weights")
        if not ref.has_images:
            lost = [m for m in ("prc", "kid") if m in metrics]
            if lost:
                notes.append(f"{'/'.join(lost)} need reference images (arr_0), which {ref.desc} lacks: reported as NaN")
    bad = metric_requirements(samples, ref.count, metrics, ref.has_images)
    if bad:
        raise BenchError("; ".join(bad) + f" (reference {ref.desc})")
    return metrics, extractor, ref, notes


def check_reference(bundle, samples: int, reference: Optional[str] = None, inception_weights: Optional[str] = None,
                    metrics: Sequence[str] = METRICS, *, reference_count: Optional[int] = None,
                    classifier: Optional[str] = None) -> dict:
    """Validate quality settings before any generation; raises BenchError (one line) or returns a summary
    {extractor, reference, reference_count, notes}. Decodes no images: folder listings (each image read for the
    reference opened and verified), .npz headers and FID statistics, a given classifier's weights."""
    _, extractor, ref, notes = _prepare(bundle, samples, reference, inception_weights, metrics, reference_count,
                                        classifier)
    # what would otherwise be found only after the generation (both small: read whole)
    if classifier and extractor.name == EXTRACTOR_NAME:   # a user's classifier: readable and finite
        from bench.checkpoints import read_state_dict
        read_state_dict(extractor.weights, "quality classifier")
    if ref.kind == "npz" and ref.info.get("has_stats"):   # published statistics that can define a FID
        with np.load(ref.info["path"], allow_pickle=False) as z:
            _checked_stats(z["mu"], z["sigma"], ref.info["path"])
    check_reference_images(ref)   # a corrupt or empty image of a folder: found now, not after the generation
    return dict(extractor=extractor.tag, reference=ref.desc, reference_count=ref.count, notes=notes)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0,1] float images (as bench.sampling.generate returns them) -> uint8; uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return images.detach().mul(255).round_().clamp_(0, 255).to(torch.uint8)


def quality_metrics(images: torch.Tensor, bundle, *, labels: Optional[torch.Tensor] = None,
                    reference: Optional[str] = None,
                    inception_weights: Optional[str] = None, metrics: Sequence[str] = METRICS, bootstrap: int = 100,
                    seed: int = 0, cache_dir: Optional[str] = None,
                    reference_count: Optional[int] = None, classifier: Optional[str] = None,
                    batch_size: Optional[int] = None, paired_images: Optional[torch.Tensor] = None,
                    paired_key: Optional[str] = None, interval: str = "percentile", level: float = 0.95) -> dict:
    """FID (+ bootstrap interval), IS, precision/recall, KID of generated images against a reference set.

    images: uint8 (N,3,H,W) (float [0,1] is converted); features are extracted on images.device. labels: the
    conditioning classes of the images (stratify the FID bootstrap; see fid_bootstrap). `seed` drives the
    bootstrap, KID subsets and IS split shuffle. `level`: the confidence level of every interval computed here
    (recorded as quality_level). Metrics not requested come back NaN.

    paired_images: dense's images with the same labels and seeds (sample i of both shares them): adds fid_delta
    (paired bootstrap interval, paired_fid_bootstrap), fid_delta_pct, the sample-size guidance, and the
    differences of precision, recall (with paired intervals, paired_quality) and IS. paired_key names them for the
    feature cache (None: no caching).
    interval: how the ΔFID interval is read from its bootstrap (INTERVALS: percentile, or normal for --resolve)."""
    t0 = time.time()
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise BenchError(f"images must be a (N,3,H,W) tensor, got {getattr(images, 'shape', type(images))}")
    if bootstrap < 0:
        raise BenchError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    _check_level(level)
    images = to_uint8(images)
    n = len(images)
    if labels is not None and len(labels) != n:
        raise BenchError(f"labels ({len(labels)}) and images ({n}) differ in count")
    metrics, extractor, ref, notes = _prepare(bundle, n, reference, inception_weights, metrics, reference_count,
                                              classifier)
    ref_feats, ref_stats, ref_radii, cached, key = reference_features(extractor, ref, device=images.device,
                                                                      cache_dir=cache_dir)
    gen = extractor.extract(images, batch_size=batch_size)
    feats = gen[extractor.feature_layer]
    nan = float("nan")
    out = dict(fid=nan, fid_ci_low=nan, fid_ci_high=nan, isc_mean=nan, isc_std=nan, precision=nan, recall=nan,
               kid_mean=nan, kid_std=nan)
    kid_size = min(KID_SUBSET_SIZE, n, len(ref_feats)) if ref_feats is not None else None
    if "fid" in metrics:
        with single_threaded(feats.shape[1] <= 512):
            out["fid"] = fid_from_statistics(fid_statistics(feats), ref_stats)
            if bootstrap > 0:
                out["fid_ci_low"], out["fid_ci_high"], _ = fid_bootstrap(feats, ref_stats, out["fid"], bootstrap,
                                                                         seed, labels, level)
    if "isc" in metrics:
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
        r = isc_features_to_metric(gen[extractor.isc_layer], ISC_SPLITS, True, seed)
        out["isc_mean"], out["isc_std"] = r[KEY_METRIC_ISC_MEAN], r[KEY_METRIC_ISC_STD]
    if ref_feats is not None and "kid" in metrics:
        with single_threaded(feats.shape[1] <= 512):   # as FID: two threads spin-wait on a busy machine
            out["kid_mean"], out["kid_std"] = kid_features(feats, ref_feats, KID_SUBSETS, kid_size, seed)
    prc = None   # the per-sample indicators behind precision and recall (their paired intervals)
    if ref_feats is not None and "prc" in metrics:
        dev = images.device  # pairwise distances on the GPU when there is one
        prc = prc_indicators(feats.to(dev), ref_feats.to(dev), PRC_NEIGHBORHOOD, ref_radii)
        out["precision"], out["recall"] = (x.float().mean().item() for x in prc)
    with_acc = _accuracy_applies(extractor, gen[extractor.isc_layer], labels, bundle)
    out["class_accuracy"] = class_accuracy(gen[extractor.isc_layer], labels) if with_acc else None
    if paired_images is not None:
        out.update(paired_quality(images, feats, gen, to_uint8(paired_images), extractor, metrics, ref_feats, ref_stats,
                                  ref_radii, out, labels, bootstrap, seed, paired_key, cache_dir, batch_size,
                                  interval=interval, level=level, prc=prc))
        if with_acc:
            d = (gen if torch.equal(to_uint8(paired_images).cpu(), images.cpu()) else
                 _paired_features(to_uint8(paired_images), extractor, paired_key, cache_dir, batch_size))
            out["class_accuracy_delta"], out["class_accuracy_delta_ci_low"], out["class_accuracy_delta_ci_high"] = \
                paired_accuracy_bootstrap(gen[extractor.isc_layer], d[extractor.isc_layer], labels, bootstrap, seed,
                                          level)
    out.update(extractor=extractor.tag, reference=ref.desc, reference_count=ref.count, reference_cached=cached,
               reference_split=json.dumps(ref.info["record"]) if ref.info.get("record") else None,
               quality_samples=n, quality_metrics=",".join(metrics),
               quality_bootstrap=bootstrap if "fid" in metrics else 0,
               quality_seed=seed, quality_level=level,
               quality_bootstrap_stratified=labels is not None and "fid" in metrics,
               quality_kid_subset_size=kid_size if "kid" in metrics else None,
               quality_isc_splits=ISC_SPLITS if "isc" in metrics else None,
               quality_prc_neighborhood=PRC_NEIGHBORHOOD if "prc" in metrics else None,
               quality_cache_key=key, quality_notes="; ".join(notes), quality_s=round(time.time() - t0, 3))
    return out


def _paired_features(images: torch.Tensor, extractor: Extractor, key: Optional[str], cache_dir: Optional[str],
                     batch_size: Optional[int]) -> Dict[str, torch.Tensor]:
    """Features of dense's same-seed images, cached on disk by (dense outputs entry, the images' own bytes,
    extractor): an entry regenerated with other content (a rebuilt entry, a nondeterministic GPU) is a new key."""
    path = None
    if key is not None:
        content = hashlib.sha256(images.cpu().contiguous().numpy().tobytes()).hexdigest()
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


def paired_quality(images, feats, gen, dense_images, extractor, metrics, ref_feats, ref_stats, ref_radii, own: dict,
                   labels, bootstrap: int, seed: int, key, cache_dir, batch_size, interval: str = "percentile",
                   level: float = 0.95, prc: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> dict:
    """The quality columns paired with dense on the same seeds (see quality_metrics). prc: the method's own
    per-sample precision/recall indicators (prc_indicators; recomputed when not given).

    Intervals of precision_delta and recall_delta at `level` from `bootstrap` resamples (`seed`), percentile
    bootstrap of a mean of per-sample differences (identical indicators: [delta, delta]; bootstrap 0: none):
    - precision is a mean over generated samples of "inside some reference point's k-NN ball"; sample i of the
      method and of dense share label and seed, so the resample draws the same class-stratified indices from both
      indicator vectors (as paired_accuracy_bootstrap). The reference balls are held fixed.
    - recall is a mean over reference points of "inside some generated sample's k-NN ball". Resampling the
      generated samples would need their k-NN radii recomputed per resample (an N² distance pass each), so the
      interval resamples the reference points instead, the same indices for both arms, with both generated sets
      (and so their balls) fixed. It covers the variability from which reference images probe the two manifolds;
      it leaves out the variability from which seeds were drawn (the generated balls), so it is narrower than a
      full interval of the difference would be; read it as a lower bound on the uncertainty of recall_delta."""
    nan = float("nan")
    n = len(feats)
    if len(dense_images) != n:
        raise BenchError(f"paired images ({len(dense_images)}) and images ({n}) differ in count")
    if torch.equal(dense_images.cpu(), images.cpu()):   # dense itself (or a method identical to it)
        dense = gen
    else:
        dense = _paired_features(dense_images, extractor, key, cache_dir, batch_size)
    out = dict(fid_delta=nan, fid_delta_ci_low=nan, fid_delta_ci_high=nan, fid_delta_pct=nan,
               fid_delta_samples_for_1pct=None, precision_delta=nan, precision_delta_ci_low=nan,
               precision_delta_ci_high=nan, recall_delta=nan, recall_delta_ci_low=nan, recall_delta_ci_high=nan,
               isc_delta=nan)
    dfeats = dense[extractor.feature_layer]
    if "fid" in metrics:
        with single_threaded(feats.shape[1] <= 512):
            delta, lo, hi, _ = paired_fid_bootstrap(feats, dfeats, ref_stats, bootstrap, seed, labels, level,
                                                    interval=interval)
        fid_dense = own["fid"] - delta
        out.update(fid_delta=delta, fid_delta_ci_low=lo, fid_delta_ci_high=hi,
                   fid_delta_pct=100 * delta / fid_dense if fid_dense > 0 else nan,
                   fid_delta_samples_for_1pct=samples_for_halfwidth(n, (hi - lo) / 2, FID_DELTA_TARGET * fid_dense))
    if "isc" in metrics:
        from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric
        out["isc_delta"] = own["isc_mean"] - isc_features_to_metric(dense[extractor.isc_layer], ISC_SPLITS, True,
                                                                    seed)[KEY_METRIC_ISC_MEAN]
    if ref_feats is not None and "prc" in metrics:
        dev = images.device   # where the method's own precision/recall ran: dense itself gets exactly 0
        mp, mr = prc if prc is not None else prc_indicators(feats.to(dev), ref_feats.to(dev), PRC_NEIGHBORHOOD,
                                                            ref_radii)
        dp, dr = prc_indicators(dfeats.to(dev), ref_feats.to(dev), PRC_NEIGHBORHOOD, ref_radii)
        p_delta = own["precision"] - dp.float().mean().item()
        r_delta = own["recall"] - dr.float().mean().item()
        p_lo, p_hi = paired_mean_interval(mp, dp, p_delta, _strata(labels, n), bootstrap, seed, level)
        r_lo, r_hi = paired_mean_interval(mr, dr, r_delta, [np.arange(len(dr))], bootstrap, seed, level)
        out.update(precision_delta=p_delta, precision_delta_ci_low=p_lo, precision_delta_ci_high=p_hi,
                   recall_delta=r_delta, recall_delta_ci_low=r_lo, recall_delta_ci_high=r_hi)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def classifier_logits(images: torch.Tensor, bundle=None, classifier: Optional[str] = None,
                      batch_size: Optional[int] = None) -> torch.Tensor:
    """The quality classifier's class logits of images (uint8 or [0,1] float), on the images' device."""
    ex = resolve_extractor(bundle, None, classifier)
    return ex.extract(to_uint8(images), batch_size=batch_size)["logits"]


# ---------------------------------------------------------------------------------------------- same-seed fidelity
def same_seed_fidelity(tokens: Sequence[torch.Tensor], ref_tokens: Sequence[torch.Tensor], images: torch.Tensor,
                       ref_images: torch.Tensor, *, labels: Optional[torch.Tensor] = None, resamples: int = 100,
                       seed: int = 0, level: float = 0.95) -> dict:
    """How close a method's samples are to dense samples drawn with the same seeds and labels.

    tokens / ref_tokens: per-scale (N, pn²) integer tensors; images / ref_images: float (N,3,H,W) in [0,1].
    fidelity_token_agreement: equal tokens / all tokens (scales weighted by their token count);
    fidelity_psnr_db: mean over images of per-image PSNR (peak 1.0); identical images count as PSNR_CAP_DB;
    ssim_to_dense: mean over images of per-image SSIM (torchmetrics' structural_similarity_index_measure, data
    range 1.0, 11-px Gaussian window σ 1.5, in float32); an image identical to its dense image counts exactly 1.
    None for images under SSIM_MIN_SIDE px on a side (the window's reflect padding needs 6).

    Intervals (psnr_to_dense_ci_low/high, ssim_to_dense_ci_low/high): percentile bootstrap at `level` of the mean
    over images, `resamples` resamples with default_rng(seed), class-stratified by `labels` (the conditioning
    classes) when given (mean_interval); None when resamples is 0; [estimate, estimate] when every per-image value
    is equal (identical images). Images are compared in chunks of FIDELITY_CHUNK_VALUES values, on ref_images'
    device. Non-finite values come back None."""
    if len(tokens) != len(ref_tokens) or not tokens:
        raise BenchError(f"token lists differ in scale count: {len(tokens)} vs {len(ref_tokens)}")
    if resamples < 0:
        raise BenchError(f"resamples must be >= 0, got {resamples}")
    _check_level(level)
    per_scale, equal, total = [], 0, 0
    for si, (a, b) in enumerate(zip(tokens, ref_tokens)):
        if a.shape != b.shape:
            raise BenchError(f"scale {si}: token shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        eq = int((a.to(b.device) == b).sum())
        per_scale.append(eq / b.numel())
        equal, total = equal + eq, total + b.numel()
    if images.shape != ref_images.shape:
        raise BenchError(f"image shapes differ: {tuple(images.shape)} vs {tuple(ref_images.shape)}")
    groups = _strata(labels, len(images))
    psnr, ssim = _per_image_fidelity(images, ref_images)
    out = dict(fidelity_token_agreement=equal / total, fidelity_token_agreement_per_scale=per_scale,
               fidelity_psnr_db=float(psnr.mean()) if psnr.size else float("nan"))
    out["psnr_to_dense_ci_low"], out["psnr_to_dense_ci_high"] = mean_interval(psnr, out["fidelity_psnr_db"], groups,
                                                                              resamples, seed, level)
    out["ssim_to_dense"] = float(ssim.mean()) if ssim is not None and ssim.size else None
    out["ssim_to_dense_ci_low"], out["ssim_to_dense_ci_high"] = (
        mean_interval(ssim, out["ssim_to_dense"], groups, resamples, seed, level) if out["ssim_to_dense"] is not None
        else (None, None))
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def _per_image_fidelity(images: torch.Tensor, ref_images: torch.Tensor) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Per-image PSNR (dB, peak 1.0, capped at PSNR_CAP_DB; float64) and SSIM (None under SSIM_MIN_SIDE px) of
    images against ref_images, chunk by chunk. SSIM runs in float32: its depthwise convolutions take ~10x the time
    and ~5x the memory in float64 on CPU (measured: 8 s and +5.8 GB for 1365 images of 32x32), and float32 per-image
    SSIM is within 3e-7 of float64's (measured, noise 0 to 0.2). A chunk of FIDELITY_CHUNK_VALUES (2^20) values
    costs ~300 MB of SSIM work on CPU, whatever N (60,000 images of 32x32: 176 chunks)."""
    n = len(images)
    psnr = np.empty(n)
    with_ssim = images.dim() == 4 and min(images.shape[-2:]) >= SSIM_MIN_SIDE
    ssim = np.empty(n) if with_ssim else None
    if with_ssim:
        from torchmetrics.functional.image import structural_similarity_index_measure
    per = max(1, FIDELITY_CHUNK_VALUES // max(1, images[0].numel() if n else 1))
    dev = ref_images.device
    for i in range(0, n, per):
        a, b = images[i:i + per].to(dev), ref_images[i:i + per]
        mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
        p = torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-300)), torch.full_like(mse, PSNR_CAP_DB))
        psnr[i:i + per] = p.clamp(max=PSNR_CAP_DB).cpu().numpy()
        if with_ssim:
            v = structural_similarity_index_measure(a.float(), b.float(), data_range=1.0, reduction="none")
            # identical images: exactly 1, as SSIM is by definition (its variance clamp can leave 1 - ε)
            ssim[i:i + per] = torch.where(mse == 0, 1.0, v.reshape(-1).double()).cpu().numpy()
        del a, b
    return psnr, ssim
