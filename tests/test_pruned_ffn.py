"""Pruned-FFN (methods/pruned_ffn.py): fraction 0 == dense, sliced shapes and MACs, ranking by mean |activation|,
the FLOP-matching helper, bad inputs."""
import os

import pytest
import torch

from bench.analytic import dense_scale_macs
from bench.errors import BenchError
from bench.registry import create_method
from bench.sampling import generate
from methods import _moe
from methods.pruned_ffn import (PrunedFFN, macs_per_pruned_neuron, match_prune_fraction, neuron_importance,
                                pruned_macs_per_image)
from tests.conftest import run_cli


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def pruned(**kw):
    cfg = dict(weights="original", calib_images=4)
    cfg.update(kw)
    return create_method("pruned-ffn", **cfg)


def test_fraction_zero_equals_dense(tiny, cache):
    net = pruned(fraction=0.0).build(tiny)
    labels = torch.tensor([1, 5, 9])
    a, b = generate(tiny.var, tiny.vqvae, labels, 3, tiny.sampling), generate(net, tiny.vqvae, labels, 3, tiny.sampling)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    x = torch.randn(2, 36, 32)
    assert torch.equal(net.blocks[0].ffn(x, 5), tiny.var.blocks[0].ffn(x, 5))
    assert tiny.var.blocks[0].ffn.fc1.weight.shape == (128, 32)     # the loaded model is untouched


def test_fraction_slices_weights_and_macs(tiny, cache):
    m = pruned(fraction=0.25, scales=[5, 6])
    net = m.build(tiny)
    for blk, orig in zip(net.blocks, tiny.var.blocks):
        ffn = blk.ffn
        assert isinstance(ffn, PrunedFFN)
        assert ffn.fc1.weight.shape == (96, 32) and ffn.fc2.weight.shape == (32, 96)
        assert torch.equal(ffn.fc2.bias, orig.ffn.fc2.bias)
        assert torch.equal(ffn.fc1.weight, orig.ffn.fc1.weight[ffn.keep])
        x = torch.randn(2, 25, 32)
        assert torch.equal(ffn(x, 4), orig.ffn(x, 4))                  # not a pruned scale
        want = torch.nn.functional.gelu(x @ orig.ffn.fc1.weight[ffn.keep].t() + orig.ffn.fc1.bias[ffn.keep],
                                        approximate="tanh") @ orig.ffn.fc2.weight[:, ffn.keep].t() + orig.ffn.fc2.bias
        assert torch.allclose(ffn(x, 5), want, atol=1e-6)
    got = m.analytic_macs(net, tiny, 2)
    for si, sm in enumerate(dense_scale_macs(tiny.var.cfg, 2)):
        n = tiny.var.patch_nums[si] ** 2
        want = sm.total - (2 * 2 * 2 * n * 2 * 32 * 32 if si in (5, 6) else 0)   # 32 neurons x 2 blocks dropped
        assert got[si] == want
    assert m.row_metrics(net, tiny)["kept_neurons"] == 96


def test_fvcore_sees_the_sliced_matmuls(tiny, cache):
    from fvcore.nn import FlopCountAnalysis
    net = pruned(fraction=0.5).build(tiny)

    class At(torch.nn.Module):
        def __init__(self, ffn, si):
            super().__init__()
            self.ffn, self.si = ffn, si

        def forward(self, x):
            return self.ffn(x, self.si)
    x = torch.randn(2, 64, 32)
    assert FlopCountAnalysis(At(net.blocks[0].ffn, 6), (x,)).total() == 128 * 2 * 32 * 64
    assert FlopCountAnalysis(At(net.blocks[0].ffn, 3), (x,)).total() == 128 * 2 * 32 * 128


def test_lowest_mean_abs_activation_neurons_are_dropped(tiny, cache):
    toks, labels = _moe.token_data(tiny, 4)
    imp = neuron_importance(tiny.var, tiny.vqvae, toks, labels, [6], 0.0, 0)
    # by hand: mean |gelu(fc1 x)| of block 1 over the tokens of scale 6
    captured = []
    h = tiny.var.blocks[1].ffn.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    _, x_in, _ = _moe.teacher_forcing_input(tiny.vqvae, toks, labels, torch.arange(labels.shape[0]))
    with torch.no_grad():
        tiny.var(labels, x_in)
    h.remove()
    bg, ed = tiny.var.begin_ends[6]
    act = tiny.var.blocks[1].ffn.act(tiny.var.blocks[1].ffn.fc1(captured[0][:, bg:ed]))
    assert torch.allclose(imp[1], act.abs().mean((0, 1)), rtol=1e-4, atol=1e-7)
    net = pruned(fraction=0.75, scales=[6], calib_images=4).build(tiny)
    keep = net.blocks[1].ffn.keep
    dropped = torch.tensor(sorted(set(range(128)) - set(keep.tolist())))
    calib = pruned(fraction=0.75, scales=[6], calib_images=4).importance(tiny, tiny.var, None)[0][1]
    assert calib[keep].min() >= calib[dropped].max()
    assert os.path.isdir(cache / "artifacts")                                   # cached for the next trial


def test_flop_matching_helper(tiny):
    cfg = tiny.var.cfg
    dense = sum(s.total for s in dense_scale_macs(cfg, 1))
    step = macs_per_pruned_neuron(cfg, [4, 5, 6])
    assert step == 2 * 2 * (25 + 36 + 64) * 2 * 32
    for share in (0.97, 0.9, 0.81, 0.7):
        f = match_prune_fraction(tiny, share * dense, [4, 5, 6])
        assert abs(pruned_macs_per_image(cfg, [4, 5, 6], f) - share * dense) <= step / 2
        assert pruned(match_fraction=share).effective_fraction(tiny) == f
        assert pruned(match_macs=share * dense).effective_fraction(tiny) == f
    assert match_prune_fraction(tiny, dense) == 0.0
    with pytest.raises(BenchError, match="out of reach"):
        match_prune_fraction(tiny, 1.01 * dense)
    assert match_prune_fraction(tiny, 0.1 * dense, clamp=True) == 127 / 128
    # a DMoE row's analytic MACs: the twin lands within half a neuron step
    target = dense - 12345.0 * 7
    f = match_prune_fraction(cfg, target)
    assert abs(pruned_macs_per_image(cfg, [4, 5, 6], f) - target) <= step / 2


def test_match_clamp_gives_the_unpruned_twin_and_records_the_gap(tiny, cache):
    """A dynamic point that costs more than dense (its router) has no static twin at equal FLOPs: with
    match_clamp the twin is the unpruned model and the row says how far it is from the target."""
    dense = sum(s.total for s in dense_scale_macs(tiny.var.cfg, 1))
    with pytest.raises(BenchError, match="out of reach"):
        pruned(match_macs=1.05 * dense).effective_fraction(tiny)
    m = pruned(match_macs=1.05 * dense, match_clamp=True, weights="original")
    net = m.build(tiny)
    row = m.row_metrics(net, tiny)
    assert row["prune_fraction_effective"] == 0 and row["match_clamped"]
    assert row["match_gap_macs"] == pytest.approx(-0.05 * dense)
    m = pruned(match_macs=0.9 * dense, match_clamp=True, weights="original")
    row = m.row_metrics(m.build(tiny), tiny)
    assert not row["match_clamped"] and abs(row["match_gap_macs"]) <= macs_per_pruned_neuron(tiny.var.cfg, [4, 5, 6]) / 2


def test_bad_inputs(tiny, cache):
    for kw, msg in [(dict(fraction=1.0), "fraction=1.0 is out of range"), (dict(fraction=-0.1), "out of range"),
                    (dict(match_macs=1e6, match_fraction=0.8), "not both"), (dict(scales=[6, 6]), "twice"),
                    (dict(weights="relu"), "valid: one of finetuned, original")]:
        with pytest.raises(BenchError, match=msg):
            pruned(**kw)
    for kw, msg in [(dict(scales=[7]), "scales index 7 out of range; valid: 0..6"),
                    (dict(match_fraction=0.01), "out of reach"),
                    (dict(fraction=0.999), r"fraction=0.999 keeps no FFN neuron of 128; valid: \[0, 0.996094\)"),
                    (dict(weights="finetuned"), "run `python -m bench prepare dmoe --model tiny")]:
        with pytest.raises(BenchError, match=msg):
            pruned(**kw).check_model(tiny)
    assert not cache.exists()


def test_prepare_cli(tmp_path, monkeypatch, capsys):
    from bench.cli import main
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:
        main(["prepare", "pruned-ffn", "--model", "tiny", "--scales", "9", "--weights", "original"])
    assert e.value.code == 2 and "scales index 9 out of range" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    r = run_cli("prepare", "pruned-ffn", "--model", "tiny", "--weights", "original", "--calib-images", "2",
                env={"VARBENCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    d = r.stdout.splitlines()[0]
    assert os.path.isfile(os.path.join(d, "DONE")) and os.path.isfile(os.path.join(d, "importance.safetensors"))


def test_calibration_of_a_model_without_data_is_not_reused_for_other_data(tiny, tmp_path, monkeypatch):
    """An official-like model (no dataset of its own) keys its calibration without the data; prepare with other
    --data must refuse the one made from the first (it used to return it silently), and --force redoes it."""
    import dataclasses
    from bench.artifacts import read_meta
    from methods.pruned_ffn import PrunedFFNMethod, RECIPE
    from tests.imagefolder import make_image_folder
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    off = dataclasses.replace(tiny, dataset=None, model_id="tiny-no-data")
    folder = make_image_folder(str(tmp_path / "imgs"), size=tiny.image_size)
    v = RECIPE.values(weights="original", calib_images=4)
    d1 = PrunedFFNMethod.prepare(off, v, None, data="shapes")
    assert PrunedFFNMethod.prepare(off, v, None, data="shapes") == d1          # the same data: reused
    with pytest.raises(BenchError, match=r"was made with \{'data': 'shapes'\}, not \{'data': '.*imgs'\}; pass --force"):
        PrunedFFNMethod.prepare(off, v, None, data=folder)
    d2 = PrunedFFNMethod.prepare(off, v, None, data=folder, force=True)
    assert read_meta(d2)["data"] == folder
