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
    from bench.quality.reference import _load_reference_images, parse_reference
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


def test_folder_identity_follows_rewritten_images_and_classes_are_never_dropped(tmp_path, caplog):
    """The identity covers each image's modification time (an image rewritten at the same size is new data); a
    class folder without usable images is an error (dropping it would shift every later label); other files are
    named in a warning, not silently skipped."""
    import logging
    from bench.data import ImageFolderData
    root = make_image_folder(tmp_path / "imgs", per_class=(6, 6, 6, 6))
    before = ImageFolderData(root).data_id
    f = os.path.join(root, "b", "0000.png")
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))        # rewritten in place, same name and size
    assert ImageFolderData(root).data_id != before
    with open(os.path.join(root, "c", "notes.txt"), "w") as fh:
        fh.write("not an image")
    with caplog.at_level(logging.WARNING, logger="var_bench"):
        fd = ImageFolderData(root)
    assert fd.classes == ["a", "b", "c", "d"] and "c/notes.txt" not in fd.files["c"]
    assert "1 file(s) that are not" in caplog.text and "notes.txt" in caplog.text
    os.makedirs(os.path.join(root, "bb"))                             # between b and c: would shift c and d
    with pytest.raises(BenchError, match="class folder .*bb has no images") as e:
        ImageFolderData(root)
    assert "\n" not in str(e.value)
    with open(os.path.join(root, "bb", "x.tif"), "wb") as fh:
        fh.write(b"tiff")
    with pytest.raises(BenchError, match="has no images .*only e.g. bb/x.tif"):
        ImageFolderData(root)


def test_stratified_pick_spreads_a_small_class_shortfall_over_the_others():
    from bench.data import stratified_pick
    groups = ["a"] * 2 + ["b"] * 50 + ["c"] * 50
    for count, want in ((10, [2, 4, 4]), (31, [2, 15, 14]), (102, [2, 50, 50])):
        got = stratified_pick(groups, count, 0)
        per = [sum(groups[i] == g for i in got) for g in "abc"]
        assert sum(per) == count and per[0] == 2 and abs(per[1] - per[2]) <= 1 and sorted(per) == sorted(want)


def test_shapes_split_refuses_a_seed_it_would_ignore():
    from bench.data import load_split
    with pytest.raises(BenchError, match="fixed seeded stream"):
        load_split("shapes", "val", 4, 32, seed=7)


def test_reference_of_a_changed_folder_is_refused(tmp_path, tiny):
    """A registered folder model's held-out split is recomputed from the folder: once the folder changes, the
    split moves and may take in training images, so the reference is refused rather than silently rebuilt."""
    import copy
    from bench.quality import parse_reference
    root = make_image_folder(tmp_path / "imgs", classes=tuple("abcdefghij"), per_class=(6,) * 10)
    b = copy.copy(tiny)
    b.dataset = dict(name="folder", path=root, data_id="folder-registered", classes=list("abcdefghij"),
                     image_size=32, hflip=False)
    b.class_names, b.name = list("abcdefghij"), "mine"
    with pytest.raises(BenchError, match="changed since model mine was registered"):
        parse_reference(b)


def test_artifact_keys_name_mirroring_and_any_spelling_of_the_own_folder(tmp_path, tiny, monkeypatch):
    import copy
    from methods import _moe
    root = make_image_folder(tmp_path / "imgs")
    user = copy.copy(tiny)
    user.dataset = dict(name="folder", path=root, data_id="folder-registered", classes=list("abcd"), hflip=True)
    assert _moe.data_scope(user) == {"data": "folder-registered", "hflip": True}
    monkeypatch.chdir(tmp_path)
    assert _moe.data_scope(user, "imgs/") == _moe.data_scope(user)           # the same folder, spelled otherwise
    plain = copy.copy(user)
    plain.dataset = dict(user.dataset, hflip=False)
    assert _moe.data_scope(plain) == {"data": "folder-registered"}          # unmirrored keys as before


def _fake_trained(tmp_path, name, meta):
    """A weights file with the training metadata beside it (what `bench train` writes), for register's checks."""
    w = tmp_path / f"{name}.safetensors"
    w.write_bytes(b"weights of " + name.encode())
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    return str(w)


def test_register_refuses_mismatched_classes_changed_data_and_a_reference_inside_the_training_folder(
        tmp_path, monkeypatch):
    from bench.data import ImageFolderData
    from bench.usermodels import register_model
    monkeypatch.setenv("VARBENCH_HOME", str(tmp_path / "home"))
    root = make_image_folder(tmp_path / "imgs", per_class=(6, 6, 6, 6))
    fd = ImageFolderData(root)
    split = dict(data=fd.root, data_id=fd.data_id, split="train")
    vq = _fake_trained(tmp_path, "vq", dict(config=dict(v_patch_nums=[1, 2], ch_mult=[1, 2]), data_splits=[split]))
    var = _fake_trained(tmp_path, "var", dict(classes=list("abcd"), args=dict(data=root), data_splits=[split],
                                              config=dict(vocab_size=16), vqvae_sha256=None))
    clf = _fake_trained(tmp_path, "clf", dict(classes=list("abcd"), config={}))
    bad_clf = _fake_trained(tmp_path, "clf2", dict(classes=list("dcba"), config={}))
    old_vq = _fake_trained(tmp_path, "vq2", dict(config=dict(v_patch_nums=[1, 2], ch_mult=[1, 2]),
                                                 data_splits=[dict(split, data_id="folder-older")]))
    cases = ((dict(vqvae=vq, var=var, classifier=bad_clf), "was trained on classes d, c, b, a but the VAR on a, b"),
             (dict(vqvae=old_vq, var=var), "changed since the vqvae was trained on it"),
             (dict(vqvae=vq, var=var, reference=os.path.join(root, "a")), "lies inside the training folder"),
             (dict(vqvae=vq, var=var, reference=root), "is, holds or lies inside the training folder"))
    for kw, msg in cases:
        with pytest.raises(BenchError, match=msg) as e:
            register_model("mine", **kw)
        assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "home" / "models" / "mine")
    register_model("mine", vqvae=vq, var=var, classifier=clf)              # the consistent set registers
    assert os.path.isfile(tmp_path / "home" / "models" / "mine" / "manifest.json")
