"""Fixed token pruning (methods/token_pruning.py): one subset per scale, chosen at block 0, reused by every block."""
import pytest
import torch

from bench.errors import BenchError
from bench.registry import create_method
from bench.sampling import generate
from tests.test_actvar import one_thread  # noqa: F401 (autouse fixture)
from tests.test_actvar import SAMPLING, TINY_STEPS, counted_generate, fresh, hand_count, reset, use_artifacts


@pytest.fixture
def tiny3():
    from bench.zoo import tiny_bundle
    return tiny_bundle(depth=3)


def gated(net):
    from methods._tokens import gated_blocks
    return sorted(gated_blocks(net), key=lambda b: b.index)


@pytest.mark.parametrize("criterion", ["norm", "random"])
def test_fixed_subset_reused_by_every_block(tiny3, criterion):
    m = create_method("fixed-tokens", token_rate=[0.5, 0.75], scales=[5, 6], criterion=criterion)
    net = m.build(tiny3)
    reset(net)
    generate(net, tiny3.vqvae, torch.tensor([1, 2, 3]), 0, SAMPLING, decode=False)
    blocks = gated(net)
    assert len(blocks) == 3
    for si, k in ((5, 18), (6, 48)):
        first = blocks[0].last_idx[si]
        assert first.shape == (6, k)                                 # CFG: 2 rows per image
        assert all(torch.equal(b.last_idx[si], first) for b in blocks[1:])
        assert len({tuple(r) for r in first.tolist()}) > 1 or criterion == "random"
    # ActVAR's learned gates, same kept counts, choose per block: not all blocks agree
    actvar = fresh(tiny3, "tokens", {5: 18, 6: 48}, {})
    reset(actvar)
    generate(actvar, tiny3.vqvae, torch.tensor([1, 2, 3]), 0, SAMPLING, decode=False)
    ab = gated(actvar)
    assert [b.last_idx[6].shape for b in ab] == [first.shape] * 3
    assert not all(torch.equal(b.last_idx[6], ab[0].last_idx[6]) for b in ab[1:])


def test_unselected_tokens_pass_through_all_blocks(tiny3):
    m = create_method("fixed-tokens", token_rate=0.5, criterion="norm")
    net = m.build(tiny3)
    seen = {}
    net.blocks[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("in", a[0]) if a[4] == 6 else None)
    net.blocks[-1].register_forward_hook(lambda mod, a, o: seen.__setitem__("out", o) if a[4] == 6 else None)
    reset(net)
    generate(net, tiny3.vqvae, torch.tensor([4, 8]), 0, SAMPLING, decode=False)
    idx = net.blocks[0].last_idx[6]
    kept = torch.zeros(4, 64, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(seen["out"][~kept], seen["in"][~kept])
    assert not torch.equal(seen["out"][kept], seen["in"][kept])


def test_fixed_flops_and_row(tiny3):
    m = create_method("fixed-tokens", token_rate=0.75, criterion="random", seed=3)
    net = m.build(tiny3)
    _, counted = counted_generate(net, tiny3.vqvae, torch.tensor([0, 9]))
    macs = m.analytic_macs(net, tiny3, 2)
    hand = hand_count(tiny3.var.cfg, 2, {5: 27, 6: 48}, {}, 16, selector=False)
    assert macs == pytest.approx(hand, rel=1e-12) and macs == pytest.approx(counted, rel=1e-12)
    row = m.row_metrics(net, tiny3)
    assert row["kept_tokens_per_scale"][5:] == [27, 48] and row["fixed_criterion"] == "random"
    assert row["token_coverage_per_scale"][6] == pytest.approx(0.75)   # same subset in every block
    assert 0 < row["macs_saved_fraction"] < 1


def test_selector_criterion_uses_actvar_selector(tiny, monkeypatch):
    """criterion=selector takes block 0's ActVAR selector: on the artifact's weights it keeps exactly what ActVAR's
    block 0 keeps at the first sparse scale (same inputs up to there), then reuses it in block 1."""
    use_artifacts(monkeypatch, "actvar-tokens")
    fixed = create_method("fixed-tokens", criterion="selector", weights="artifact", **TINY_STEPS)
    dyn = create_method("actvar-tokens", **TINY_STEPS)
    nets = [fixed.build(tiny), dyn.build(tiny)]
    for net in nets:
        reset(net)
        generate(net, tiny.vqvae, torch.tensor([2, 6]), 5, SAMPLING, decode=False)
    fb, db = gated(nets[0]), gated(nets[1])
    assert torch.equal(fb[0].last_idx[5], db[0].last_idx[5])
    assert torch.equal(fb[1].last_idx[5], fb[0].last_idx[5])
    assert fb[0].stats[5]["scored"] == 4 * 36 and fb[1].stats[5]["scored"] == 0   # one selector pass per scale


def test_bad_inputs(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    with pytest.raises(BenchError, match="valid: one of norm, random, selector"):
        create_method("fixed-tokens", criterion="attention")
    with pytest.raises(BenchError, match="out of range"):
        create_method("fixed-tokens", token_rate=0.0)
    with pytest.raises(BenchError, match="valid: 0..6"):
        create_method("fixed-tokens", scales=[3, 8]).check_model(tiny)
    with pytest.raises(BenchError, match=r"seed=18446744073709552 is out of range; valid: int in \[0, 1099511627776\]"):   # was an int64 overflow mid-run
        create_method("fixed-tokens", criterion="random", seed=18446744073709552)
    with pytest.raises(BenchError, match="run `python -m bench prepare actvar-tokens --model tiny"):
        create_method("fixed-tokens", criterion="selector").build(tiny)
    with pytest.raises(BenchError, match="run `python -m bench prepare actvar --model tiny"):
        create_method("fixed-tokens", criterion="selector", selector_from="actvar").check_model(tiny)
