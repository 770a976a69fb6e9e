"""Images kept on disk (bench/stored_images.py): a measurement reads its images and dense's back a chunk at a time
and holds features, not images; every number it computes from them is what it computed from tensors in memory."""
import hashlib

import pytest
import torch

from bench import stored_images as SI
from bench.dense_cache import load_dense_outputs, store_dense_outputs
from bench.errors import BenchError
from bench.generation import generate_all, sample_labels
from bench.resume import BatchStore


def _images(n, side=8, seed=0):
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _stored(t):
    return SI.StoredImages(lambda s, e: t[s:e].clone(), len(t), t.shape[1:])


def test_slices_splits_and_indices_read_what_the_tensor_holds():
    t = _images(23)
    s = _stored(t)
    assert len(s) == 23 and s.shape == t.shape and s.dim() == 4 and s.dtype == torch.uint8
    assert torch.equal(s[5:17], t[5:17]) and torch.equal(s[-1], t[-1]) and torch.equal(s[0], t[0])
    assert torch.equal(torch.cat(list(s.split(5))), t) and [len(c) for c in s.split(10)] == [10, 10, 3]
    assert torch.equal(s.materialize(), t) and s[7:7].shape == (0, 3, 8, 8)
    with pytest.raises(IndexError):
        s[23]
    with pytest.raises(TypeError):
        s[::2]


def test_a_reader_returning_other_rows_is_one_clear_error():
    t = _images(4)
    bad = SI.StoredImages(lambda s, e: t[s:e + 1], 4, t.shape[1:])
    with pytest.raises(BenchError, match="changed during the run"):
        bad[0:2]


def test_digest_and_equality_are_those_of_the_whole_buffer():
    t = _images(600)   # more than one CHUNK_ROWS chunk
    assert SI.images_digest(_stored(t)) == hashlib.sha256(t.numpy()).hexdigest() == SI.images_digest(t)
    u = t.clone()
    u[599, 2, 7, 7] ^= 1
    assert SI.images_equal(_stored(t), t) and not SI.images_equal(_stored(u), t)
    assert not SI.images_equal(_stored(t)[0:10], t[0:11])


def test_streamed_safetensors_entry_reads_back_lazily_and_whole(tmp_path):
    """A dense-cache entry written from StoredImages (a chunk at a time) is the entry save_file writes, read back
    eagerly (load_file) or lazily (row ranges)."""
    n = 300
    tokens = [torch.randint(0, 50, (n, k * k)) for k in (1, 2, 3)]
    t = _images(n, side=6)
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    store_dense_outputs(a, {"k": 1}, tokens, t)
    store_dense_outputs(b, {"k": 1}, tokens, _stored(t))
    for path in (a, b):
        eager_tokens, eager_images = load_dense_outputs(path)
        lazy_tokens, lazy_images = load_dense_outputs(path, lazy_images=True)
        assert isinstance(lazy_images, SI.StoredImages) and len(lazy_images) == n
        assert torch.equal(eager_images, t) and torch.equal(lazy_images[17:290], t[17:290])
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(tokens, eager_tokens, lazy_tokens))


def test_a_damaged_entry_is_not_read_lazily(tmp_path):
    path = tmp_path / "d.safetensors"
    store_dense_outputs(str(path), {"k": 1}, [torch.zeros(4, 1, dtype=torch.long)], _images(4))
    path.write_bytes(path.read_bytes()[:-10])
    assert load_dense_outputs(str(path), lazy_images=True) is None


def test_generation_without_held_images_reads_back_the_same_images(tiny, tmp_path):
    labels = sample_labels(7, tiny.num_classes)
    tokens, images = generate_all(tiny.var, tiny, labels, 0, tiny.sampling, 3)[:2]
    store = BatchStore(str(tmp_path / "batches"), {"k": "v"})
    lazy_tokens, lazy = generate_all(tiny.var, tiny, labels, 0, tiny.sampling, 3, store=store, keep_images=False)[:2]
    assert isinstance(lazy, SI.StoredImages) and torch.equal(lazy.materialize(), images)
    assert torch.equal(lazy[2:5], images[2:5]) and all(torch.equal(a, b) for a, b in zip(tokens, lazy_tokens))
    store.clear()
    with pytest.raises(BenchError, match="gone or damaged"):
        lazy[0:1]


def test_measure_rows_equal_those_of_images_held_in_memory(tiny, classifier, tmp_path, monkeypatch):
    """The same point measured with images on disk (the default) and held in memory: every quality and fidelity
    column is equal (dense reference generated in the first run, reused from the cache in the second)."""
    from bench import generation as G
    from bench import measure as M
    from bench.registry import create_method
    cols = ("fid", "fid_delta", "fid_delta_ci_low", "fid_delta_ci_high", "precision_delta", "recall_delta",
            "class_accuracy_delta", "fidelity_token_agreement", "fidelity_psnr_db", "ssim_to_dense",
            "psnr_to_dense_ci_low", "ssim_to_dense_ci_high")
    kw = dict(samples=12, batch_size=4, timing_rounds=0, flop_images=0, bootstrap=20, classifier=classifier,
              reference_count=40, cache_dir=str(tmp_path / "cache"))
    method = create_method("skip-scales", skip=1)   # images unlike dense's: every paired column is non-trivial
    on_disk = M.measure(tiny, method, results_dir=str(tmp_path / "r1"), **kw)
    eager_generate = G.generate_all

    def held(*a, **k):
        k["keep_images"] = True
        return eager_generate(*a, **k)
    monkeypatch.setattr(M, "generate_all", held)
    monkeypatch.setattr(M, "load_dense_outputs", lambda path, lazy_images=False: load_dense_outputs(path))
    in_memory = M.measure(tiny, method, results_dir=str(tmp_path / "r2"), **kw)
    assert on_disk["dense_cache"] == "generated" and in_memory["dense_cache"] == "reused"
    for c in cols:
        assert on_disk[c] == in_memory[c], c
