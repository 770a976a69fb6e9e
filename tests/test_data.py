"""Data: the procedural dataset is deterministic, class-balanced and varied; image folders split without bias."""
import json

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


# ---------------------------------------------------------------------------------------------- image folders
import os  # noqa: E402

import torch  # noqa: E402

from tests.imagefolder import make_image_folder  # noqa: E402


def _keys(images):
    """One hashable key per image (its pixels)."""
    return [bytes(x.mul(127.5).add(127.5).round().to(torch.uint8).numpy().tobytes()) for x in images]


def test_folder_splits_are_class_stratified_and_held_out_never_trained_on(tmp_path):
    from bench.data import FOLDER_SPLIT, folder_data, load_split
    root = make_image_folder(tmp_path / "imgs", per_class=(20, 20, 20, 13))
    fd = folder_data(root)
    parts = {s: fd.split_files(s) for s in ("train", "val", "test")}
    for ci, c in enumerate(fd.classes):
        sets = [set(parts[s][ci]) for s in parts]
        assert sum(map(len, sets)) == len(set().union(*sets)) == len(fd.files[c])      # a partition
        n = len(fd.files[c])
        assert len(parts["val"][ci]) == max(1, round(FOLDER_SPLIT["val"] * n))
        assert len(parts["test"][ci]) == max(1, round(FOLDER_SPLIT["test"] * n))
    train_keys = set(_keys(load_split(root, "train", None, 32)[0]))
    for split, count in (("train", 12), ("train", 40), ("val", 12), ("val", None), ("test", 8)):
        imgs, labels, classes, rec = load_split(root, split, count, 32, seed=3)
        per = torch.bincount(labels, minlength=4).tolist()
        assert per == rec.per_class and rec.split == split and rec.seed == 3 and rec.data_id == fd.data_id
        assert max(per) - min(per) <= 1 or split == "val" and count is None, (split, per)  # balanced
        assert classes == ["a", "b", "c", "d"] and len(imgs) == rec.count == sum(per)
        assert torch.bincount(labels[:4], minlength=4).tolist() == [1, 1, 1, 1]           # classes interleaved
        if split != "train":
            assert not train_keys & set(_keys(imgs)), f"{split} images were in the training split"
    a = load_split(root, "train", 12, 32, seed=3)
    b = load_split(root, "train", 12, 32, seed=4)
    assert torch.equal(a[0], load_split(root, "train", 12, 32, seed=3)[0])                 # seeded
    assert not torch.equal(a[0], b[0])


def test_one_class_folder_is_one_clear_error(tmp_path):
    import pytest
    from bench.data import folder_data
    root = make_image_folder(tmp_path / "one", classes=("only",), per_class=(10,))
    with pytest.raises(BenchError, match="has one class \\(only\\); a class-conditional model needs >= 2 classes"):
        folder_data(root)


def test_trainers_record_splits_and_do_not_mirror_user_data(tmp_path):
    import json
    from bench.train import default_hflip, train_vqvae
    root = make_image_folder(tmp_path / "imgs")
    assert default_hflip(root, None) is False and default_hflip("shapes", None) is True
    cfg = dict(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1)
    train_vqvae(str(tmp_path / "vq"), steps=2, batch=4, data=root, config=cfg)
    meta = json.load(open(tmp_path / "vq" / "vqvae.json"))
    assert meta["hflip"] is False and meta["args"]["hflip"] is False
    tr, val = meta["data_splits"]
    assert (tr["split"], val["split"]) == ("train", "val") and tr["data_id"] == val["data_id"]
    assert tr["per_class"] == [14, 14, 14, 14] and val["per_class"] == [4, 4, 4, 4]


def test_calibration_tokens_and_reference_of_a_folder_model(tmp_path, tiny):
    import copy
    from methods import _moe
    from bench.data import folder_data, load_split, recording_splits
    from bench.quality import _load_reference_images, parse_reference
    root = make_image_folder(tmp_path / "imgs", classes=tuple("abcdefghij"), per_class=(10,) * 10)
    b = copy.copy(tiny)
    b.dataset = dict(name="folder", path=root, classes=list("abcdefghij"), image_size=32, hflip=False)
    b.class_names, b.model_id = list("abcdefghij"), "tiny-folder-test"
    with recording_splits() as recs:
        toks, labels = _moe.token_data(b, 20, "train")
    assert labels.tolist() == list(range(10)) * 2                     # stratified, no mirrored copies
    assert recs[0]["split"] == "train" and recs[0]["per_class"] == [2] * 10
    ref = parse_reference(b)
    assert ref.kind == "split" and ref.count == 20 and ref.info["record"]["per_class"] == [2] * 10
    ref_imgs = _load_reference_images(ref)
    train = load_split(root, "train", None, 32)[0].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    tk = {bytes(x.numpy().tobytes()) for x in train}
    assert len(ref_imgs) == 20 and not tk & {bytes(x.numpy().tobytes()) for x in ref_imgs}
    assert folder_data(root).data_id.startswith("folder-")


def test_artifact_keys_carry_the_data_identity_except_for_the_shipped_default(tmp_path, tiny):
    """pruned-ffn's calibration key ignored the data: `prepare pruned-ffn --data shapes` reused one made from a
    user's folder. Keys now name the data unless it is shapes on a shapes model (the shipped keys stay as they were)."""
    import copy
    from bench.registry import create_method
    from methods import _moe
    root = make_image_folder(tmp_path / "imgs")
    user = copy.copy(tiny)
    user.dataset = dict(name="folder", path=root, data_id="folder-registered", classes=list("abcd"), hflip=False)
    assert _moe.data_scope(tiny) == {} and _moe.data_scope(tiny, "shapes") == {}
    assert _moe.data_scope(user) == {"data": "folder-registered"}
    assert _moe.data_scope(user, "shapes") == {"data": "shapes"}
    assert _moe.data_scope(tiny, root)["data"].startswith("folder-")
    m = create_method("pruned-ffn", fraction=0.25)
    keys = [m.calib_key(tiny), m.calib_key(tiny, root), m.calib_key(user), m.calib_key(user, "shapes")]
    assert len({json.dumps(k, sort_keys=True) for k in keys}) == 4 and "data" not in keys[0]
    assert create_method("dmoe").experts_key(user)["finetune"]["data"] == "folder-registered"
    assert create_method("actvar").artifact_key(user)["data"] == "folder-registered"
    with pytest.raises(BenchError, match="changed since model .* was registered"):
        _moe.token_data(user, 4)
