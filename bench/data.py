"""Data: the procedural `shapes` dataset of the embedded default, and an ImageFolder loader for users' own data.

`shapes` is class-conditional and deterministic: image i of a split depends only on (split seed, i). The class
is the silhouette; fill (solid or textured) and background (flat, gradient, smooth noise, stripes, checker)
vary independently, so some tokens are easy (flat background) and some hard (edges, textures) — the
property the efficiency methods exploit.
"""
from __future__ import annotations

import math
import os
from typing import Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.errors import BenchError

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


def image_folder(root: str, size: int):
    """A user's class-per-subfolder image folder, resized and centre-cropped, in [-1, 1]."""
    if not os.path.isdir(root):
        raise BenchError(f"image folder not found: {root}")
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])
    try:
        return datasets.ImageFolder(root, transform=tf)
    except (FileNotFoundError, RuntimeError) as e:
        raise BenchError(f"cannot read image folder {root}: {e}") from None
