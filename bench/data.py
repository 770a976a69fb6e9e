"""Data: the procedural `shapes` dataset of the embedded default, and users' own image folders, split without bias.

Every set of real images the harness uses (training, calibration, held-out evaluation, quality reference) comes
from `load_split(data, split, count, size, seed)`: a class-stratified sample of one split, with a record of what
was drawn (`SplitRecord`: data identity, split, seeds, per-class counts) for manifests and rows. `shapes` splits
are independent seeded streams with labels i mod C. An image folder (`DIR/<class>/*.png`) is partitioned once per
class by a seeded shuffle into train / val / test (`FOLDER_SPLIT`): held-out images never enter training, and a
sample of any split takes equally many images of every class (as far as the class has them), classes interleaved.

`shapes` is class-conditional and deterministic: image i of a split depends only on (split seed, i). The class
is the silhouette; fill (solid or textured) and background (flat, gradient, smooth noise, stripes, checker)
vary independently, so some tokens are easy (flat background) and some hard (edges, textures) — the
property the efficiency methods exploit.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.errors import BenchError
from bench.log import get_logger

logger = get_logger(__name__)

SHAPES_CLASSES = ("circle", "square", "triangle", "plus", "ring", "star", "diamond", "crescent", "x-cross", "frame")
SPLIT_SEEDS = {"train": 1_000, "val": 2_000, "test": 3_000}  # distinct streams: held-out images never seen in training
SUPERSAMPLE = 2  # render at 2x and box-filter down: anti-aliased edges


def _polygon_mask(x, y, verts):
    """Inside test for a convex or star polygon given as (K,2) vertices (even-odd rule)."""
    inside = np.zeros_like(x, dtype=bool)
    K = len(verts)
    for i in range(K):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % K]
        cond = (y1 > y) != (y2 > y)
        xint = (x2 - x1) * (y - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= cond & (x < xint)
    return inside


def shape_mask(cls: int, x, y, r: float, rot: float) -> np.ndarray:
    """Boolean mask of class `cls` centred at 0 with radius r, rotated by rot (radians); x, y are grids."""
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * x + s * y, -s * x + c * y
    name = SHAPES_CLASSES[cls]
    if name == "circle":
        return u ** 2 + v ** 2 <= r ** 2
    if name == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if name == "triangle":
        a = [(-math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
        return _polygon_mask(u, v, [(1.1 * r * math.cos(t), 1.1 * r * math.sin(t)) for t in a])
    if name == "plus":
        w = 0.33 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if name == "ring":
        d = u ** 2 + v ** 2
        return (d <= r ** 2) & (d >= (0.55 * r) ** 2)
    if name == "star":
        verts = []
        for k in range(10):
            t = -math.pi / 2 + k * math.pi / 5
            rr = 1.15 * r if k % 2 == 0 else 0.48 * r
            verts.append((rr * math.cos(t), rr * math.sin(t)))
        return _polygon_mask(u, v, verts)
    if name == "diamond":
        return np.abs(u) + np.abs(v) <= 1.05 * r
    if name == "crescent":
        return (u ** 2 + v ** 2 <= r ** 2) & ((u - 0.45 * r) ** 2 + v ** 2 > (0.8 * r) ** 2)
    if name == "x-cross":
        w = 0.3 * r
        a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return ((np.abs(a) <= w) & (np.abs(b) <= 1.05 * r)) | ((np.abs(b) <= w) & (np.abs(a) <= 1.05 * r))
    if name == "frame":
        m = np.maximum(np.abs(u), np.abs(v))
        return (m <= 0.85 * r) & (m >= 0.5 * r)
    raise ValueError(cls)


def _smooth_noise(rng, n, cells):
    g = rng.random((cells + 1, cells + 1))
    t = torch.from_numpy(g)[None, None].float()
    return torch.nn.functional.interpolate(t, size=(n, n), mode="bicubic", align_corners=True)[0, 0].numpy()


def _texture(rng, kind, x, y, n):
    """A [0,1] pattern used to mix two colours (backgrounds and fills)."""
    if kind == "flat":
        return np.zeros_like(x)
    if kind == "gradient":
        t = rng.uniform(0, 2 * math.pi)
        g = math.cos(t) * x + math.sin(t) * y
        return (g - g.min()) / (g.max() - g.min() + 1e-9)
    if kind == "noise":
        return _smooth_noise(rng, n, int(rng.integers(3, 7)))
    if kind == "stripes":
        t, period = rng.uniform(0, math.pi), rng.uniform(0.18, 0.35) * n
        return (np.sin((math.cos(t) * x + math.sin(t) * y) * 2 * math.pi / period) > 0).astype(np.float64)
    if kind == "checker":
        p = rng.uniform(0.15, 0.3) * n
        return ((np.floor(x / p) + np.floor(y / p)) % 2).astype(np.float64)
    if kind == "dots":
        p = rng.uniform(0.12, 0.2) * n
        return ((np.mod(x, p) - p / 2) ** 2 + (np.mod(y, p) - p / 2) ** 2 < (0.3 * p) ** 2).astype(np.float64)
    raise ValueError(kind)


def _hsv(h, s, v):
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


BACKGROUNDS = ("flat", "flat", "gradient", "noise", "stripes", "checker")
FILLS = ("flat", "flat", "stripes", "dots", "checker")


def render_shape(cls: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One image (size, size, 3) uint8 of class `cls`, all randomness drawn from rng."""
    n = size * SUPERSAMPLE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    # background: dull two-colour pattern of varied complexity
    bh = rng.random()
    b1 = _hsv(bh, rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.55))
    b2 = _hsv((bh + rng.uniform(-0.15, 0.15)) % 1, rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.55))
    bt = _texture(rng, BACKGROUNDS[rng.integers(len(BACKGROUNDS))], xx, yy, n)[..., None]
    img = b1 * (1 - bt) + b2 * bt
    # object: saturated and bright, so it stands out from any background
    oh = rng.random()
    o1 = _hsv(oh, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    o2 = _hsv((oh + rng.uniform(0.25, 0.5)) % 1, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    ot = _texture(rng, FILLS[rng.integers(len(FILLS))], xx, yy, n)[..., None]
    r = rng.uniform(0.26, 0.38) * n
    cx, cy = n / 2 + rng.uniform(-0.09, 0.09) * n, n / 2 + rng.uniform(-0.09, 0.09) * n
    rot = rng.uniform(-0.3, 0.3)
    mask = shape_mask(cls, xx - cx, yy - cy, r, rot)[..., None]
    img = np.where(mask, o1 * (1 - ot) + o2 * ot, img)
    img = img.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def shapes_images(split: str, count: int, size: int = 32, start: int = 0, num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Images [start, start+count) of a split: (N,H,W,3) uint8 and labels (N,) with label = i mod num_classes."""
    if split not in SPLIT_SEEDS:
        raise BenchError(f"unknown split {split!r}; valid: {', '.join(SPLIT_SEEDS)}")
    if not 1 <= num_classes <= len(SHAPES_CLASSES):
        raise BenchError(f"shapes has at most {len(SHAPES_CLASSES)} classes, got {num_classes}")
    imgs = np.empty((count, size, size, 3), np.uint8)
    labels = np.arange(start, start + count) % num_classes
    for j, i in enumerate(range(start, start + count)):
        imgs[j] = render_shape(int(labels[j]), np.random.default_rng([SPLIT_SEEDS[split], i]), size)
    return imgs, labels


def to_model_range(imgs_uint8: np.ndarray) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float in [-1, 1]."""
    return torch.from_numpy(imgs_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1)


class ShapesDataset(Dataset):
    """Tensors in [-1, 1] with labels; rendered once into memory (about 0.1 ms per image)."""

    def __init__(self, split: str = "train", count: int = 20_000, size: int = 32, num_classes: int = 10):
        imgs, labels = shapes_images(split, count, size, num_classes=num_classes)
        self.images, self.labels = to_model_range(imgs), torch.from_numpy(labels).long()
        self.classes = list(SHAPES_CLASSES[:num_classes])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


# ---------------------------------------------------------------------------------------------- image folders
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# shares of every class held out of training (val: the quality reference and trainers' validation; test: the
# real-vs-real floor of `evaluate`), and the seed of the per-class shuffle that assigns images to splits
FOLDER_SPLIT = dict(val=0.2, test=0.1, seed=0)
SPLITS = ("train", "val", "test")


@dataclass
class SplitRecord:
    """What one set of real images was: recorded in artifact manifests, trainer metadata and rows."""
    data: str                      # 'shapes' or the folder's real path
    data_id: str                   # 'shapes' or 'folder-<hash of the file listing>'
    split: str
    count: int
    seed: int                      # the sample's seed (shapes: the split's stream seed)
    per_class: List[int] = field(default_factory=list)
    partition: Optional[dict] = None   # folders: the train/val/test shares and the shuffle seed

    def to_dict(self) -> dict:
        return asdict(self)


_RECORDERS: List[list] = []


@contextlib.contextmanager
def recording_splits():
    """Collect the SplitRecord of every load_split inside the block (for an artifact's metadata)."""
    got: list = []
    _RECORDERS.append(got)
    try:
        yield got
    finally:
        _RECORDERS.remove(got)


def note_split(rec: SplitRecord) -> SplitRecord:
    """Report a set of images as used (to every open recording_splits block)."""
    for r in _RECORDERS:
        if rec.to_dict() not in r:
            r.append(rec.to_dict())
    return rec


class ImageFolderData:
    """A class-per-subfolder image folder: its classes, files and identity, and its seeded per-class partition."""

    def __init__(self, root: str, partition: Optional[dict] = None):
        if not os.path.isdir(root):
            raise BenchError(f"image folder not found: {root}")
        self.root = os.path.realpath(root)
        self.partition = dict(FOLDER_SPLIT, **(partition or {}))
        classes = folder_classes(self.root)
        self.files: Dict[str, List[str]] = {}
        skipped: List[str] = []
        for c in classes:
            fs, other = [], []
            for dp, _, names in os.walk(os.path.join(self.root, c)):
                for f in names:
                    rel = os.path.relpath(os.path.join(dp, f), self.root)
                    (fs if f.lower().endswith(IMAGE_EXTS) else other).append(rel)
            if not fs:   # dropping it would shift every later class's label
                raise BenchError(f"class folder {os.path.join(root, c)} has no images ({', '.join(IMAGE_EXTS)})"
                                 + (f", only e.g. {sorted(other)[0]}" if other else "") + "; remove it or add images")
            self.files[c] = sorted(fs)
            skipped += [f for f in other if not os.path.basename(f).startswith(".")]
        if skipped:
            logger.warning(f"image folder {root}: {len(skipped)} file(s) that are not {', '.join(IMAGE_EXTS)} images "
                           f"are not used (e.g. {sorted(skipped)[0]})")
        self.classes = list(self.files)
        if len(self.classes) < 2:
            found = f"one class ({self.classes[0]})" if self.classes else "no class subfolder with images"
            raise BenchError(f"image folder {root} has {found}; a class-conditional model needs >= 2 classes, "
                             f"one subfolder of images each ({', '.join(IMAGE_EXTS)}): DIR/<class>/*.png")
        h = hashlib.sha256()   # names, sizes and modification times: an image rewritten in place is new data
        for c in self.classes:
            for f in self.files[c]:
                st = os.stat(os.path.join(self.root, f))
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        self.data_id = f"folder-{h.hexdigest()[:12]}"
        self._parts = self._partition()

    def _partition(self) -> Dict[str, List[List[str]]]:
        p = self.partition
        parts = {s: [] for s in SPLITS}
        for ci, c in enumerate(self.classes):
            fs = self.files[c]
            order = np.random.default_rng([int(p["seed"]), ci]).permutation(len(fs))
            n_test = int(round(p["test"] * len(fs))) if p["test"] > 0 else 0
            n_val = int(round(p["val"] * len(fs))) if p["val"] > 0 else 0
            n_test, n_val = max(n_test, 1 if p["test"] > 0 else 0), max(n_val, 1 if p["val"] > 0 else 0)
            if len(fs) - n_test - n_val < 1:
                raise BenchError(f"class {c!r} of {self.root} has {len(fs)} images: too few to hold out "
                                 f"{p['val']:g} (val) and {p['test']:g} (test) of it and still train on some")
            picked = [fs[i] for i in order]
            parts["test"].append(sorted(picked[:n_test]))
            parts["val"].append(sorted(picked[n_test:n_test + n_val]))
            parts["train"].append(sorted(picked[n_test + n_val:]))
        return parts

    def split_files(self, split: str) -> List[List[str]]:
        """Files of a split, one list per class (relative to the root)."""
        if split not in SPLITS:
            raise BenchError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return self._parts[split]

    def sample(self, split: str, count: Optional[int], seed: int = 0) -> Tuple[List[str], List[int], SplitRecord]:
        """A class-stratified sample of a split: count // C images of every class (the remainder to classes in a
        seeded order), fewer only where a class has fewer; classes interleaved so that any prefix is balanced too.
        count None: the whole split."""
        per = self.split_files(split)
        C = len(per)
        rng = np.random.default_rng([int(seed), SPLITS.index(split), 7])
        if count is None:
            quota = [len(f) for f in per]
        else:
            quota = [count // C] * C
            for ci in rng.permutation(C)[:count % C]:
                quota[ci] += 1
        chosen = []
        for ci, fs in enumerate(per):
            order = np.random.default_rng([int(seed), SPLITS.index(split), ci]).permutation(len(fs))
            chosen.append([fs[i] for i in order[:min(quota[ci], len(fs))]])
        files, labels = [], []
        for j in range(max((len(c) for c in chosen), default=0)):
            for ci, c in enumerate(chosen):
                if j < len(c):
                    files.append(c[j])
                    labels.append(ci)
        rec = SplitRecord(self.root, self.data_id, split, len(files), int(seed), [len(c) for c in chosen],
                          dict(self.partition))
        return files, labels, rec

    def read(self, files: List[str], size: int) -> torch.Tensor:
        """(N,3,H,W) in [-1, 1]: resized (shorter side) and centre-cropped to size."""
        from PIL import Image
        from torchvision.transforms import functional as TF
        out = torch.empty(len(files), 3, size, size)
        for i, f in enumerate(files):
            try:
                with Image.open(os.path.join(self.root, f)) as im:
                    im = TF.center_crop(TF.resize(im.convert("RGB"), size), size)
                    out[i] = TF.to_tensor(im)
            except OSError as e:
                raise BenchError(f"cannot read image {os.path.join(self.root, f)}: {str(e).splitlines()[0][:160]}") \
                    from None
        return out.mul_(2).sub_(1)


def stratified_pick(groups: List[str], count: int, seed: int = 0) -> List[int]:
    """Indices of a class-stratified seeded sample of `count` items labelled by `groups` (sorted)."""
    names = sorted(set(groups))
    by = {g: [i for i, x in enumerate(groups) if x == g] for g in names}
    rng = np.random.default_rng([int(seed), 11])
    quota = {g: count // len(names) for g in names}
    for gi in rng.permutation(len(names))[:count % len(names)]:
        quota[names[gi]] += 1
    short = sum(max(0, quota[g] - len(by[g])) for g in names)   # classes too small: the rest go to the others,
    while short and any(quota[g] < len(by[g]) for g in names):   # one at a time in turn (not all to the first)
        for g in names:
            if short and quota[g] < len(by[g]):
                quota[g] += 1
                short -= 1
    pick = []
    for gi, g in enumerate(names):
        order = np.random.default_rng([int(seed), 13, gi]).permutation(len(by[g]))
        pick += [by[g][i] for i in order[:min(quota[g], len(by[g]))]]
    return sorted(pick)


_FOLDERS: Dict[tuple, ImageFolderData] = {}


def folder_classes(root: str) -> List[str]:
    """The class names of a class-per-subfolder image folder: its subfolders, sorted (hidden ones left out)."""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def check_held_out_folder(reference: str, training: str, flag: str = "--reference") -> None:
    """Refuse a reference folder that is, holds or lies inside the training folder: FID against the images the
    model was trained on (register, run and evaluate alike)."""
    ref_real, root = os.path.realpath(reference), os.path.realpath(training)
    if os.path.commonpath([ref_real, root]) in (ref_real, root):
        raise BenchError(f"{flag} {reference} is, holds or lies inside the training folder {training}; give "
                         f"a held-out folder, or none to use the folder's own held-out split")


def folder_data(root: str, partition: Optional[dict] = None) -> ImageFolderData:
    key = (os.path.realpath(root), tuple(sorted((partition or {}).items())))
    if key not in _FOLDERS:  # one listing per process; the identity hash covers names and sizes
        _FOLDERS[key] = ImageFolderData(root, partition)
    return _FOLDERS[key]


def default_hflip_for(data: str) -> bool:
    """Mirroring is on by default only for `shapes` (what the shipped default was trained with)."""
    return data == "shapes"


def data_identity(data: Optional[str], partition: Optional[dict] = None) -> Optional[str]:
    """'shapes', 'folder-<hash>' or None: what prepared artifacts made from this data are keyed by."""
    if data is None or data == "shapes":
        return data
    return folder_data(data, partition).data_id


def load_split(data: str, split: str, count: Optional[int], size: int, seed: int = 0,
               partition: Optional[dict] = None):
    """(images (N,3,H,W) in [-1,1], labels (N,), class names, SplitRecord) of a class-stratified sample."""
    if data == "shapes":
        if split not in SPLIT_SEEDS:
            raise BenchError(f"unknown split {split!r}; valid: {', '.join(SPLIT_SEEDS)}")
        if seed != 0:   # each shapes split is one fixed seeded stream (SPLIT_SEEDS); a seed would be ignored
            raise BenchError(f"a shapes split is one fixed seeded stream ({split}: seed {SPLIT_SEEDS[split]}); a "
                             f"sample seed ({seed}) applies to image folders only")
        n = 20_000 if count is None else count
        ds = ShapesDataset(split, n, size)
        per = np.bincount(ds.labels.numpy(), minlength=len(ds.classes)).tolist()
        rec = SplitRecord("shapes", "shapes", split, n, SPLIT_SEEDS[split], per)
        return ds.images, ds.labels, ds.classes, note_split(rec)
    fd = folder_data(data, partition)
    files, labels, rec = fd.sample(split, count, seed)
    return fd.read(files, size), torch.tensor(labels, dtype=torch.long), list(fd.classes), note_split(rec)
