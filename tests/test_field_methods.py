"""The field's training-free accelerators (issue 13): skip-scales, cfg-skip (methods/_steps.py), fastvar — their
rules asserted on outcomes on the tiny model, their MACs analytic == fvcore, their bad parameters (skipvar's:
tests/test_skipvar.py)."""
import os

import pytest
import torch

from bench.errors import BenchError
from bench.registry import create_method
from bench.sampling import generate
from tests.test_actvar import one_thread  # noqa: F401 (autouse fixture)
from tests.test_actvar import SAMPLING, reset

LABELS = torch.tensor([1, 4, 7])


@pytest.fixture
def tiny3():
    from bench.zoo import tiny_bundle
    return tiny_bundle(depth=3)


def block_rows(net, var):
    """Rows that block 0 processed at each scale (a list per scale: one entry per call)."""
    seen = {}
    var.blocks[0].register_forward_pre_hook(lambda mod, a: seen.setdefault(a[4], []).append(a[0].shape[0]))
    return seen


def macs_match(method, net, bundle, labels, seed=0):
    from bench.flops import count_generation
    reset(net)
    mc = count_generation(net, bundle.vqvae, labels, seed, SAMPLING)
    an = method.analytic_macs(net, bundle, len(labels))
    assert len(an) == len(mc.per_scale)
    for a, f in zip(an, mc.per_scale):
        assert a == pytest.approx(f, rel=1e-9, abs=0)
    return an


# ---------------------------------------------------------------------------------------------- skip-scales
def test_skipped_scales_run_no_block_and_decode_the_computed_scales(tiny):
    m = create_method("skip-scales", skip=2)
    net = m.build(tiny)
    seen = block_rows(net, tiny.var)
    gen = generate(net, tiny.vqvae, LABELS, 3, SAMPLING)
    assert sorted(seen) == [0, 1, 2, 3, 4]                          # scales 5 and 6: no block ran
    dense = generate(tiny.var, tiny.vqvae, LABELS, 3, SAMPLING)
    for si in range(5):                                             # same seed: the computed scales are dense's
        assert torch.equal(gen.tokens[si], dense.tokens[si])
    assert all(bool((gen.tokens[si] == -1).all()) for si in (5, 6))
    q, pns = tiny.vqvae.quantize, tiny.var.patch_nums                # f_hat = the upsampled sum of scales 0..4
    f_hat = torch.zeros(3, q.Cvae, pns[-1], pns[-1])
    for si in range(5):
        h = q.embedding(dense.tokens[si]).transpose(1, 2).reshape(3, q.Cvae, pns[si], pns[si])
        f_hat, _ = q.next_input(si, f_hat, h)
    expect = tiny.vqvae.fhat_to_img(f_hat).add(1).mul(0.5)
    assert torch.allclose(gen.images, expect, atol=1e-6)
    an = macs_match(m, net, tiny, LABELS)
    assert an[5] == an[6] == 0 and all(a > 0 for a in an[:5])
    row = m.row_metrics(net, tiny)
    assert row["skipped_scales"] == [5, 6] and row["step_run_share_per_scale"] == [1.0] * 5 + [0.0, 0.0]


@pytest.mark.parametrize("name,param", [("skip-scales", "skip"), ("cfg-skip", "last")])
def test_k_0_is_the_dense_model_bitwise(tiny, name, param):
    """skip=0 / last=0: every row runs every scale; images, tokens and MACs are dense's."""
    from bench.analytic import dense_kv_cache_bytes, dense_scale_macs
    m = create_method(name, **{param: 0})
    net = m.build(tiny)
    a = generate(net, tiny.vqvae, LABELS, 3, SAMPLING)
    b = generate(tiny.var, tiny.vqvae, LABELS, 3, SAMPLING)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    an = macs_match(m, net, tiny, LABELS)
    assert an == pytest.approx([s.total for s in dense_scale_macs(tiny.var.cfg, 3)], rel=1e-12)
    assert m.kv_cache_bytes(net, tiny) == dense_kv_cache_bytes(tiny.var.cfg)
    assert m.row_metrics(net, tiny)["macs_saved_fraction"] == 0.0


# ---------------------------------------------------------------------------------------------- cfg-skip
def test_cfg_skip_runs_single_rows_and_guides_with_conditional_logits(tiny):
    m = create_method("cfg-skip", last=2)
    net = m.build(tiny)
    seen = block_rows(net, tiny.var)
    logits = {}

    def capture(si, x, lab, caches):
        out = net.scale_forward(si, x, lab, caches)
        logits[si] = out.clone()
        return out
    gen = generate(net, tiny.vqvae, LABELS, 2, SAMPLING, scale_fn=capture)
    assert {si: r for si, r in seen.items()} == {**{si: [6] for si in range(5)}, 5: [3], 6: [3]}
    for si in (5, 6):                                               # uncond logits := cond logits
        assert torch.equal(logits[si][3:], logits[si][:3])
    assert not torch.equal(logits[4][3:], logits[4][:3])
    dense = generate(tiny.var, tiny.vqvae, LABELS, 2, SAMPLING)
    assert all(torch.equal(gen.tokens[si], dense.tokens[si]) for si in range(5))
    an = macs_match(m, net, tiny, LABELS)
    from bench.analytic import dense_scale_macs
    d = dense_scale_macs(tiny.var.cfg, 3)
    assert an[:5] == pytest.approx([s.total for s in d[:5]], rel=1e-12)
    for si in (5, 6):                                               # half the batch but the once-per-image embedding
        assert an[si] == pytest.approx((d[si].total - d[si].word_embed) / 2 + d[si].word_embed, rel=1e-12)


def test_cfg_skip_every_scale_is_the_conditional_model(tiny):
    net = create_method("cfg-skip", last=7).build(tiny)
    seen = block_rows(net, tiny.var)
    gen = generate(net, tiny.vqvae, LABELS, 1, SAMPLING)
    assert all(r == [3] for r in seen.values())
    nocfg = generate(tiny.var, tiny.vqvae, LABELS, 1, SAMPLING.__class__(**{**SAMPLING.to_dict(), "cfg": 0.0}))
    assert all(torch.equal(a, b) for a, b in zip(gen.tokens, nocfg.tokens))


# ---------------------------------------------------------------------------------------------- fastvar
def test_fastvar_keeps_top_frequency_tokens_and_restores_the_rest(tiny3):
    from methods.fastvar import frequency_score
    from methods._tokens import topk_positions
    m = create_method("fastvar")                                    # last two scales, ratios 0.4 / 0.5
    net = m.build(tiny3)
    io = {}
    for i, b in enumerate(net.blocks):
        b.register_forward_pre_hook(lambda mod, a, i=i: io.__setitem__(("in", i, a[4]), a[0].clone()))
        b.register_forward_hook(lambda mod, a, o, i=i: io.__setitem__(("out", i, a[4]), o.clone()))
    reset(net)
    generate(net, tiny3.vqvae, LABELS, 0, SAMPLING, decode=False)
    for i, b in enumerate(net.blocks):
        cached = b.gate.cached[b.index]
        assert cached["attn"].shape == (6, 25, 32)                  # cache scale: 5x5, the last one before pruning
        for si, k in ((5, 22), (6, 32)):                            # 36 - floor(36*0.4), 64 - 32
            x = io[("in", i, si)]
            idx = b.last_idx[si]
            assert idx.shape == (6, k)
            assert torch.equal(idx, topk_positions(frequency_score(x), k))   # exactly the top-scoring tokens
            pn = tiny3.var.patch_nums[si]
            pruned = torch.ones(6, pn * pn, dtype=torch.bool).scatter_(1, idx, False)
            pruned &= torch.ones_like(pruned).scatter_(1, b.last_idx_ffn[si], False)
            restored = x + b._restore(cached["attn"], pn) + b._restore(cached["ffn"], pn)   # area-upsampled
            assert pruned.any()
            assert torch.allclose(io[("out", i, si)][pruned], restored[pruned], atol=1e-6)
            assert not torch.allclose(io[("out", i, si)][~pruned], restored[~pruned], atol=1e-6)
    macs_match(m, net, tiny3, LABELS)
    row = m.row_metrics(net, tiny3)
    assert row["kept_tokens_per_scale"][5:] == [22, 32] and row["fastvar_cache_scale"] == 4
    assert 0 < row["macs_saved_fraction"] < 1


def test_fastvar_start_layer_and_ratio_zero(tiny3):
    m = create_method("fastvar", scales=[6], ratio=0.5, start_layer=2)
    net = m.build(tiny3)
    reset(net)
    generate(net, tiny3.vqvae, LABELS, 0, SAMPLING, decode=False)
    assert [6 in b.last_idx for b in net.blocks] == [False, False, True]   # blocks before start_layer run dense
    macs_match(m, net, tiny3, LABELS)
    zero = create_method("fastvar", ratio=0.0)                      # nothing pruned: the dense model
    a = generate(zero.build(tiny3), tiny3.vqvae, LABELS, 5, SAMPLING)
    b = generate(tiny3.var, tiny3.vqvae, LABELS, 5, SAMPLING)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_fastvar_composes_with_a_weight_method_macs_counted_once(tiny3):
    m = create_method("compose", weight="pruned-ffn", token="fastvar", **{"weight.weights": "original",
                      "weight.fraction": 0.25, "weight.calib_images": 4})
    net = m.build(tiny3)
    an = macs_match(m, net, tiny3, LABELS)
    alone = create_method("fastvar")
    an_alone = macs_match(alone, alone.build(tiny3), tiny3, LABELS)
    assert sum(an) < sum(an_alone)


def test_fastvar_release_preset_prunes_two_scales_and_drops_the_last_two(tiny3):
    """preset=release on 7 scales: 4x4 at 0.4 and 5x5 at 0.5 restored from 3x3, 6x6 and 8x8 not run — the same
    tokens as that pruning with explicit scales for the scales it runs, -1 after; f_hat the sum of scales 0..4."""
    from tests.test_code_scalekv import cache_bytes_after
    m = create_method("fastvar", preset="release")
    net = m.build(tiny3)
    assert m.kept_tokens(tiny3) == {3: 10, 4: 13} and m.setting(tiny3)[1:] == ([5, 6], range(0, 3))
    seen = block_rows(net, net.var)
    gen = generate(net, tiny3.vqvae, LABELS, 2, SAMPLING)
    assert sorted(seen) == [0, 1, 2, 3, 4]                          # scales 5 and 6: no block ran
    assert all(bool((gen.tokens[si] == -1).all()) for si in (5, 6))
    explicit = create_method("fastvar", scales=[3, 4], ratio=[0.4, 0.5])
    ref = generate(explicit.build(tiny3), tiny3.vqvae, LABELS, 2, SAMPLING)
    assert all(torch.equal(gen.tokens[si], ref.tokens[si]) for si in range(5))
    q, pns = tiny3.vqvae.quantize, tiny3.var.patch_nums
    f_hat = torch.zeros(3, q.Cvae, pns[-1], pns[-1])
    for si in range(5):
        h = q.embedding(ref.tokens[si]).transpose(1, 2).reshape(3, q.Cvae, pns[si], pns[si])
        f_hat, _ = q.next_input(si, f_hat, h)
    assert torch.allclose(gen.images, tiny3.vqvae.fhat_to_img(f_hat).add(1).mul(0.5), atol=1e-6)
    an = macs_match(m, net, tiny3, LABELS)
    assert an[5] == an[6] == 0
    from methods.fastvar import predicted_macs
    assert [a / 3 for a in an] == pytest.approx(predicted_macs(tiny3.var.cfg, {3: 10, 4: 13}, range(3), [5, 6]),
                                                rel=1e-12)
    row = m.row_metrics(net, tiny3)
    assert row["fastvar_dropped_scales"] == [5, 6] and row["fastvar_cache_scale"] == 2
    assert row["kept_tokens_per_scale"][3:5] == [10, 13] and row["fastvar_preset"] == "release"
    reset(net)
    got, _ = cache_bytes_after(net, tiny3.vqvae, LABELS, SAMPLING)  # caches after scale 4, pruned keys missing
    assert got == m.kv_cache_bytes(net, tiny3) == 3 * 2 * (1 + 4 + 9 + 10 + 13) * 32 * 4 * 2


def test_fastvar_hart_preset_prunes_the_last_two_in_every_layer(tiny):
    m = create_method("fastvar", preset="hart")
    net = m.build(tiny)
    assert m.kept_tokens(tiny) == {5: 18, 6: 16} and m.setting(tiny)[1:] == ([], range(0, 2))
    same = create_method("fastvar", ratio=[0.5, 0.75], start_layer=0, end_layer=2)
    a = generate(net, tiny.vqvae, LABELS, 4, SAMPLING)
    b = generate(same.build(tiny), tiny.vqvae, LABELS, 4, SAMPLING)
    assert torch.equal(a.images, b.images)
    macs_match(m, net, tiny, LABELS)
    assert create_method("fastvar", preset="hart", ratio=[0.5, 0.75]).kept_tokens(tiny) == {5: 18, 6: 16}


def test_fastvar_settings_on_the_embedded_default_and_the_release_layer_rule():
    """The saved shares the docstring states, by formula on the embedded default's layout (depth 4, 7 scales), and
    the release's dense ends (3 first, 4 last of 32 layers) rounded half up: depth 4 keeps block 3 dense."""
    from types import SimpleNamespace
    from bench.analytic import dense_scale_macs
    from bench.models.var import VARConfig
    from methods.fastvar import predicted_macs, release_layers
    from bench.shipped import read_manifest
    entry = read_manifest()
    vc = entry["models"][entry["aliases"]["default"]]["var_config"]
    cfg = VARConfig(**{**vc, "patch_nums": tuple(vc["patch_nums"])})
    bundle = SimpleNamespace(var=SimpleNamespace(patch_nums=cfg.patch_nums, cfg=cfg))
    dense = sum(s.total for s in dense_scale_macs(cfg, 1))
    saved = {}
    for preset in (None, "hart", "release"):
        m = create_method("fastvar", preset=preset)
        _, dropped, layers = m.setting(bundle)
        saved[preset] = 1 - sum(predicted_macs(cfg, m.kept_tokens(bundle), layers, dropped)) / dense
    assert saved[None] == pytest.approx(0.2208, abs=1e-4)
    assert saved["hart"] == pytest.approx(0.4153, abs=1e-4)
    assert saved["release"] == pytest.approx(0.7373, abs=1e-4)
    assert {d: release_layers(d) for d in (2, 4, 6, 16, 20, 24, 30, 32)} == {
        2: range(0, 2), 4: range(0, 3), 6: range(1, 5), 16: range(2, 14), 20: range(2, 17), 24: range(2, 21),
        30: range(3, 26), 32: range(3, 28)}
    assert create_method("fastvar").layers(4) == range(0, 3)


def test_fastvar_preset_conflicts_are_one_line(tiny, tmp_path):
    with pytest.raises(BenchError, match=r"ratio=0.3 conflicts with preset=release, which fixes ratio 0.4,0.5; "
                                         r"valid: the preset alone, or ratio without a preset"):
        create_method("fastvar", preset="release", ratio=0.3)
    with pytest.raises(BenchError, match=r"match_saved=0.2 conflicts with preset=hart"):
        create_method("fastvar", preset="hart", match_saved=0.2)
    with pytest.raises(BenchError, match=r"scales=5,6 conflicts with preset=release, which fixes scales 3,4 of this "
                                         r"model"):
        create_method("fastvar", preset="release", scales=[5, 6]).check_model(tiny)
    with pytest.raises(BenchError, match=r"start_layer=1 conflicts with preset=hart, which fixes start_layer 0"):
        create_method("fastvar", preset="hart", start_layer=1).check_model(tiny)
    with pytest.raises(BenchError, match=r"preset=release drops scales, which a composition"):
        create_method("compose", weight="pruned-ffn", token="fastvar", **{"token.preset": "release",
                      "weight.weights": "original", "weight.calib_images": 2}).build(tiny)
    from tests.conftest import run_cli
    res = tmp_path / "results"
    r = run_cli("run", "--model", "tiny", "--method", "fastvar", "--set", "preset=hart", "--set", "ratio=0.2",
                "--samples", "4", "--results", res, "--cache-dir", tmp_path / "cache")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "ratio=0.2 conflicts with preset=hart" in lines[0], r.stderr
    assert not res.exists()


# ---------------------------------------------------------------------------------------------- bad parameters
def test_bad_parameters(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path))
    with pytest.raises(BenchError, match=r"ratio=1.0 is out of range; valid: float in \[0.0, 1.0\)"):
        create_method("fastvar", ratio=1.0)
    with pytest.raises(BenchError, match=r"scale index 7 out of range; valid: 0..6"):
        create_method("fastvar", scales=[5, 7]).check_model(tiny)
    with pytest.raises(BenchError, match=r"ratio has 3 values but scales has 2"):
        create_method("fastvar", scales=[5, 6], ratio=[0.1, 0.2, 0.3])
    with pytest.raises(BenchError, match=r"scales=0 is out of range"):
        create_method("fastvar", scales=[0, 6], ratio=0.5)
    with pytest.raises(BenchError, match=r"do not fit a model with 2 blocks"):
        create_method("fastvar", start_layer=3).check_model(tiny)
    with pytest.raises(BenchError, match=r"skip=7 is out of range for a model with 7 scales \(skipping every scale "
                                         r"leaves no image\); valid: 0..6"):
        create_method("skip-scales", skip=7).check_model(tiny)
    with pytest.raises(BenchError, match=r"skip=-1 is out of range"):
        create_method("skip-scales", skip=-1)
    with pytest.raises(BenchError, match=r"last=8 is out of range for a model with 7 scales; valid: 0..7"):
        create_method("cfg-skip", last=8).build(tiny)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("method,setting,needle", [
    ("skip-scales", "skip=7", "skipping every scale leaves no image"),
    ("fastvar", "ratio=1.5", "ratio=1.5 is out of range"),
    ("fastvar", "scales=9", "scale index 9 out of range; valid: 0..6"),
    ("cfg-skip", "last=-1", "last=-1 is out of range"),
    ("fastvar", "preset=fast", "preset='fast' is not allowed; valid: one of release, hart"),
])
def test_cli_bad_parameter_is_one_line_exit_2(method, setting, needle, tmp_path):
    from tests.conftest import run_cli
    res = tmp_path / "results"
    r = run_cli("run", "--model", "tiny", "--method", method, "--set", setting, "--samples", "4", "--results", res,
                "--cache-dir", tmp_path / "cache")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not res.exists()


# skipvar: tests/test_skipvar.py


# the field report's ranking (±1 point of each budget): tests/test_report_field.py


# ---------------------------------------------------------------------------------------------- budgets
def test_match_saved_derives_each_setting_from_a_macs_budget(tiny3):
    from bench.analytic import dense_scale_macs
    from methods import _steps
    from methods.fastvar import predicted_macs
    dense = sum(s.total for s in dense_scale_macs(tiny3.var.cfg, len(LABELS)))
    m = create_method("fastvar", match_saved=0.3)
    net = m.build(tiny3)
    an = macs_match(m, net, tiny3, LABELS)                          # what ran == fvcore
    pred = predicted_macs(tiny3.var.cfg, m.kept_tokens(tiny3), m.layers(3))
    assert [a / len(LABELS) for a in an] == pytest.approx(pred, rel=1e-12)   # the formula it matched with
    assert 1 - sum(an) / dense == pytest.approx(0.3, abs=0.01)
    S, cfg = 7, tiny3.var.cfg
    skips = {k: _steps.saved_fraction(cfg, S - k, S) for k in range(1, S)}
    for target in (0.1, 0.5, 0.9):
        k = create_method("skip-scales", match_saved=target).skip(tiny3)
        assert abs(skips[k] - target) == min(abs(v - target) for v in skips.values())
    last = create_method("cfg-skip", match_saved=0.3).last(tiny3)
    sk = create_method("cfg-skip", last=last)
    skn = sk.build(tiny3)
    got = 1 - sum(macs_match(sk, skn, tiny3, LABELS)) / dense
    assert got == pytest.approx(_steps.saved_fraction(cfg, S, S - last), abs=1e-12)
