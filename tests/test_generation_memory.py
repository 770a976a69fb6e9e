"""Freed batch memory goes back to the OS every TRIM_EVERY batches of a generation pass, not after every batch
(each return makes the next batch fault its pages in again: 15% of generation time when done per batch)."""
from bench import generation as G
from bench.measure import sample_labels


def test_freed_memory_is_returned_every_trim_every_batches(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(G, "TRIM_EVERY", 3)
    monkeypatch.setattr(G, "release_freed_memory", lambda: calls.append(1) or True)
    labels = sample_labels(14, tiny.num_classes)
    tokens, images, *_ = G.generate_all(tiny.var, tiny, labels, 0, tiny.sampling, 2)   # 7 batches
    assert len(images) == 14 and len(calls) == 2                                         # after batches 3 and 6
