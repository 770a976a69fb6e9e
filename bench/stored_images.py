"""A measurement's images kept on disk and read a row range at a time, so that it holds features, not images.

    images = StoredImages(reader, count=n, image_shape=(3, 32, 32))   # reader(start, stop) -> uint8 rows
    for chunk in images.split(250): ...      # what the feature extractor and same-seed fidelity read
    images[10:20], len(images), images.shape, images.to("cuda")

Generation writes every batch to its checkpoints (bench.resume.BatchStore) and the dense reference lives in the dense
cache (one safetensors entry): both are read back here on demand. At 256² a 50k-image run would otherwise hold
9.8 GB of uint8 images per arm; its features (Inception pool + logits) are 12 KB an image.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import struct
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch

from bench.errors import BenchError

Reader = Callable[[int, int], torch.Tensor]
CHUNK_ROWS = 256        # rows per read where a caller takes the whole set (equality, digest, materialise)


class StoredImages:
    """uint8 (N, 3, H, W) images behind `reader(start, stop)`; slices, split, len, shape and to() as a tensor's."""

    dtype = torch.uint8

    def __init__(self, reader: Reader, count: int, image_shape: Sequence[int], device="cpu"):
        self.reader, self.count, self.image_shape = reader, int(count), tuple(int(x) for x in image_shape)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.count, *self.image_shape))

    def dim(self) -> int:
        return 1 + len(self.image_shape)

    def to(self, device) -> "StoredImages":
        return StoredImages(self.reader, self.count, self.image_shape, device)

    def cpu(self) -> "StoredImages":
        return self.to("cpu")

    def __getitem__(self, index: Union[int, slice]) -> torch.Tensor:
        if isinstance(index, int):
            i = index + self.count if index < 0 else index
            if not 0 <= i < self.count:
                raise IndexError(f"image {index} of {self.count}")
            return self[i:i + 1][0]
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("StoredImages takes an integer or a contiguous slice")
        start, stop, _ = index.indices(self.count)
        if stop <= start:
            return torch.empty((0, *self.image_shape), dtype=torch.uint8, device=self.device)
        rows = self.reader(start, stop)
        if rows.dtype != torch.uint8 or tuple(rows.shape) != (stop - start, *self.image_shape):
            raise BenchError(f"stored images {start}..{stop} read back as {rows.dtype} {tuple(rows.shape)}; the "
                             f"files behind them changed during the run")
        return rows.to(self.device)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        for s in range(0, self.count, size):
            yield self[s:s + size]

    def materialize(self) -> torch.Tensor:
        """All images as one tensor (small sets only: this is what the class exists to avoid)."""
        return torch.cat(list(self.split(CHUNK_ROWS))) if self.count else self[0:0]


Images = Union[torch.Tensor, StoredImages]


def is_images(x) -> bool:
    return torch.is_tensor(x) or isinstance(x, StoredImages)


def images_equal(a: Images, b: Images) -> bool:
    """torch.equal, a chunk at a time (neither set is held whole)."""
    if a is b:
        return True
    if tuple(a.shape) != tuple(b.shape):
        return False
    return all(torch.equal(a[s:s + CHUNK_ROWS].cpu(), b[s:s + CHUNK_ROWS].cpu()) for s in range(0, len(a), CHUNK_ROWS))


def images_digest(images: Images) -> str:
    """sha256 of the images' bytes in row order, a chunk at a time (the digest of the whole buffer)."""
    h = hashlib.sha256()
    for chunk in images.split(CHUNK_ROWS):
        h.update(chunk.cpu().contiguous().numpy())
    return h.hexdigest()


def batch_reader(load_batch: Callable[[int, int], torch.Tensor], ranges: Sequence[Tuple[int, int]]) -> Reader:
    """A reader over images stored one batch per file: load_batch(b, size) gives batch b's images (or raises)."""
    starts = [s for s, _ in ranges]

    def read(start: int, stop: int) -> torch.Tensor:
        parts, b = [], bisect.bisect_right(starts, start) - 1
        while start < stop:
            s, e = ranges[b]
            parts.append(load_batch(b, e - s)[start - s:min(stop, e) - s])
            start, b = min(stop, e), b + 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return read


# -------------------------------------------------------------------------- safetensors, written a chunk at a time
_DTYPES = {torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64", torch.float32: "F32"}


def save_safetensors_streaming(path: str, tensors: Dict[str, Union[torch.Tensor, StoredImages]],
                               metadata: Optional[Dict[str, str]] = None) -> None:
    """safetensors' save_file for tensors that may be StoredImages (written a chunk at a time: safetensors has no
    streaming writer). The layout is the format's own (a little-endian u64 header length, the JSON header padded
    with spaces to 8 bytes, then the tensors' bytes back to back in header order); safe_open reads it."""
    header: Dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise BenchError(f"cannot store {name}: dtype {t.dtype}")
        size = int(torch.Size(t.shape).numel()) * torch.empty((), dtype=t.dtype).element_size()
        header[name] = dict(dtype=_DTYPES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + size])
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for t in tensors.values():
            for chunk in (t.split(CHUNK_ROWS) if isinstance(t, StoredImages) else (t,)):
                f.write(chunk.cpu().contiguous().numpy().tobytes())
