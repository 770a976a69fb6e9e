"""Labelled image grids (rows of samples with a class label on the left)."""
from __future__ import annotations

from bench.atomic import atomic_path


def save_grid(images, rows: int, row_labels, path: str, title: str = "", cell: int = 96):
    """images: (N,3,H,W) in [0,1], N = rows * cols, row-major. Written atomically."""
    from PIL import Image, ImageDraw, ImageFont
    n = images.shape[0]
    cols = n // rows
    arr = (images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy())
    font = ImageFont.load_default()
    label_w, top = 120, 22 if title else 4
    canvas = Image.new("RGB", (label_w + cols * (cell + 2), top + rows * (cell + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    for r in range(rows):
        draw.text((4, top + r * (cell + 2) + cell // 2 - 6), str(row_labels[r])[:18], fill=(0, 0, 0), font=font)
        for c in range(cols):
            im = Image.fromarray(arr[r * cols + c]).resize((cell, cell), Image.NEAREST)
            canvas.paste(im, (label_w + c * (cell + 2), top + r * (cell + 2)))
    with atomic_path(path) as tmp:
        canvas.save(tmp)
