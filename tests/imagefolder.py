"""A small class-per-subfolder image folder for the user-data route: every class is left-right asymmetric (a bar
on the left, a dot at a class-dependent height on the right), and every image is distinct (its index is written
into the pixels), so mirroring, class balance and split overlap are all visible in the images themselves."""
import os

import numpy as np


def make_image_folder(root, classes=("a", "b", "c", "d"), per_class=(20, 20, 20, 20), size=32, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for ci, (c, n) in enumerate(zip(classes, per_class)):
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            img = np.full((size, size, 3), 30, np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
            img[4:size - 4, 3:8] = (230, 200, 40)                                   # the bar: always on the left
            y = 4 + ci * (size - 10) // max(1, len(classes) - 1)
            img[y:y + 5, size - 10:size - 5] = (40, 120 + 30 * ci % 120, 230)       # the dot: class height
            img[0, :16] = [[(i >> b & 1) * 255] * 3 for b in range(16)]   # the index, as bits
            Image.fromarray(img).save(os.path.join(root, c, f"{i:04d}.png"))
    return str(root)
