"""The procedural dataset is deterministic, class-balanced and varied."""
import numpy as np
import pytest

from bench.data import SHAPES_CLASSES, shapes_images
from bench.errors import BenchError


def test_same_split_and_index_give_identical_images():
    a, la = shapes_images("train", 30)
    b, lb = shapes_images("train", 30)
    assert np.array_equal(a, b) and np.array_equal(la, lb)


def test_image_depends_only_on_its_index_not_on_the_batch():
    full, _ = shapes_images("val", 25)
    part, labels = shapes_images("val", 5, start=20)
    assert np.array_equal(full[20:], part)
    assert list(labels) == [0, 1, 2, 3, 4]


def test_splits_are_disjoint_streams():
    a, _ = shapes_images("train", 10)
    b, _ = shapes_images("val", 10)
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


def test_classes_are_balanced_and_images_vary():
    imgs, labels = shapes_images("train", 200)
    assert np.bincount(labels).tolist() == [20] * len(SHAPES_CLASSES)
    assert imgs.shape == (200, 32, 32, 3) and imgs.dtype == np.uint8
    # backgrounds of varied complexity: some images are nearly flat outside the object, some are busy
    edge_energy = np.abs(np.diff(imgs.astype(float), axis=2)).mean(axis=(1, 2, 3))
    assert edge_energy.max() > 3 * edge_energy.min()


def test_unknown_split_is_a_clear_error():
    with pytest.raises(BenchError, match="valid: train, val, test"):
        shapes_images("holdout", 1)
