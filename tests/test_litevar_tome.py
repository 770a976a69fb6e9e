"""LiteVAR (methods/litevar.py) and ToMe (methods/tome.py): identities bitwise dense on the default model, analytic
MACs == fvcore at non-identity settings, the attention window / CFG sharing / precision and the merged-token counts
checked directly on tiny inputs, bad parameters refused in one line."""
import pytest
import torch

from bench.errors import BenchError
from bench.models.var import KVCache
from bench.registry import create_method
from bench.sampling import generate
from tests.test_actvar import one_thread  # noqa: F401 (autouse fixture)
from tests.test_actvar import SAMPLING, reset

LABELS = torch.tensor([1, 4, 7])


@pytest.fixture(scope="module")
def default():
    from bench.zoo import load_model
    return load_model("default")


def same_generation(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens)) and torch.equal(a.images, b.images)


def macs_match(method, net, bundle, labels=LABELS):
    from bench.flops import count_generation
    reset(net)
    mc = count_generation(net, bundle.vqvae, labels, 0, SAMPLING, decoder=False)
    an = method.analytic_macs(net, bundle, len(labels))
    assert len(an) == len(mc.per_scale)
    for a, f in zip(an, mc.per_scale):
        assert a == pytest.approx(f, rel=1e-9, abs=0)
    return an


# ---------------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("name,identity,other", [
    ("litevar", dict(window=None, share="none", precision="fp32"), {}),
    ("tome", dict(ratio=0.0), {}),
])
def test_identity_is_bitwise_dense_on_the_default_model(default, name, identity, other):
    labels = torch.tensor([0, 3])
    dense = generate(default.var, default.vqvae, labels, 11, default.sampling)
    same = generate(create_method(name, **identity).build(default), default.vqvae, labels, 11, default.sampling)
    assert same_generation(same, dense)
    changed = generate(create_method(name, **other).build(default), default.vqvae, labels, 11, default.sampling)
    assert not same_generation(changed, dense)          # the defaults do act (so the identity is not vacuous)
    from bench.precision import generation_dtype
    with generation_dtype("bf16"):                      # under --dtype bf16 the identity is dense's bf16 run
        dense = generate(default.var, default.vqvae, labels, 11, default.sampling)
        same = generate(create_method(name, **identity).build(default), default.vqvae, labels, 11, default.sampling)
    assert same_generation(same, dense)


def test_litevar_window_covering_every_scale_is_the_identity_whatever_keep_first(default):
    labels = torch.tensor([2])
    dense = generate(default.var, default.vqvae, labels, 5, default.sampling)
    for window in (6, 9):                                # 6 earlier scales = all of 7
        m = create_method("litevar", window=window, keep_first=0, share="output", share_last=0, precision="fp32")
        assert same_generation(generate(m.build(default), default.vqvae, labels, 5, default.sampling), dense)


# ---------------------------------------------------------------------------------------------- contract (MACs)
@pytest.mark.parametrize("params", [
    {},                                                                     # the translated paper setting
    dict(share="map", window=0, keep_first=2, precision="fp32"),
    dict(share="output", share_last=7, window=None, precision="all-linear"),
])
def test_litevar_analytic_macs_equal_fvcore(tiny, params):
    from bench.analytic import dense_scale_macs
    m = create_method("litevar", **params)
    net = m.build(tiny)
    an = macs_match(m, net, tiny)
    dense = sum(s.total for s in dense_scale_macs(tiny.var.cfg, len(LABELS)))
    assert sum(an) < dense and 0 < m.row_metrics(net, tiny)["macs_saved_fraction"] < 1


@pytest.mark.parametrize("params", [
    {},
    dict(ratio=0.7, scales=[3, 4, 5, 6], merge="attn+ffn"),
    dict(ratio=0.3, merge="ffn"),
    dict(metric="keys", scales=[1, 6]),
])
def test_tome_analytic_macs_equal_fvcore(tiny, params):
    m = create_method("tome", **params)
    net = m.build(tiny)
    macs_match(m, net, tiny)
    assert 0 < m.row_metrics(net, tiny)["macs_saved_fraction"] < 1


# ---------------------------------------------------------------------------------------------- litevar, directly
def _plan_block(tiny, **kw):
    from methods.litevar import LiteVARBlock, Plan
    cfg = dict(window=1, keep_first=1, share="none", shared_scales=[], precision="fp32")
    cfg.update(kw)
    plan = Plan(tiny.var.begin_ends, **cfg)
    return LiteVARBlock(tiny.var.blocks[0], 0, plan), plan


def _filled_cache(tiny, rows, si, gen):
    """A KV cache holding random keys/values of scales 0..si-1 (as a generation leaves it before scale si)."""
    a = tiny.var.blocks[0].attn
    L = tiny.var.begin_ends[si][0]
    cache = KVCache()
    cache.append(torch.randn(rows, a.num_heads, L, a.head_dim, generator=gen),
                 torch.randn(rows, a.num_heads, L, a.head_dim, generator=gen))
    return cache


def test_litevar_attends_to_the_window_and_the_first_scale_only(tiny):
    from methods.litevar import kept_scales
    assert kept_scales(6, 1, 1) == [0, 5, 6] and kept_scales(3, 0, 2) == [0, 1, 3]
    assert kept_scales(2, 1, 1) == [0, 1, 2] and kept_scales(6, None, 1) == list(range(7))
    g = torch.Generator().manual_seed(0)
    blk, _ = _plan_block(tiny)
    u = torch.randn(2, 16, 32, generator=g)             # scale 3 (4x4): the first scale the window cuts
    c1 = _filled_cache(tiny, 2, 3, g)
    c2, c3 = KVCache(), KVCache()
    c2.k, c2.v = c1.k.clone(), c1.v.clone()
    c3.k, c3.v = c1.k.clone(), c1.v.clone()
    got = blk._attention(u, c1, 3)
    # reference: the dense attention with the keys of scale 1 masked out
    mask = torch.zeros(1, 1, 16, tiny.var.begin_ends[3][1])
    mask[..., tiny.var.begin_ends[1][0]:tiny.var.begin_ends[1][1]] = -torch.inf
    ref = tiny.var.blocks[0].attn(u, mask, c2)
    assert torch.allclose(got, ref, atol=1e-6)
    assert not torch.allclose(got, tiny.var.blocks[0].attn(u, None, c3), atol=1e-4)   # the full attention differs
    assert c1.k.shape[2] == 1 + 9 + 16                  # the cache keeps the window only (scale 1 never read again)
    assert torch.equal(c1.k[:, :, :1], c2.k[:, :, :1]) and torch.equal(c1.k[:, :, 1:], c2.k[:, :, 5:])


def test_litevar_cache_keeps_the_window_and_its_bytes_say_so(tiny):
    from bench.analytic import kv_bytes
    m = create_method("litevar", share="none", precision="fp32")      # window 1 + the first scale
    net = m.build(tiny)
    caches = []
    orig = net.new_caches
    net.new_caches = lambda: caches.append(orig()) or caches[-1]
    generate(net, tiny.vqvae, LABELS, 0, SAMPLING, decode=False)
    assert all(c.k.shape[2] == c.v.shape[2] == 1 + 36 + 64 for c in caches[0])   # scales 0, 5, 6 after the cut
    # the peak: scale 6 appended to the window of scale 5 (scales 0, 4, 5), before the cut
    assert m.kv_cache_bytes(net, tiny) == kv_bytes([1 + 25 + 36 + 64] * 2, 32, 2, 4)
    full = create_method("litevar", window=None)
    assert full.kv_cache_bytes(net, tiny) == create_method("dense").kv_cache_bytes(tiny.var, tiny)
    from bench.precision import generation_dtype
    low = create_method("litevar").build(tiny)                           # bf16 linears: K/V cast back under fp32,
    orig_low = low.new_caches
    low.new_caches = lambda: caches.append(orig_low()) or caches[-1]
    for dtype, elem in (("fp32", torch.float32), ("bf16", torch.bfloat16)):   # --dtype's element size otherwise
        caches.clear()
        with generation_dtype(dtype):
            generate(low, tiny.vqvae, LABELS, 0, SAMPLING, decode=False)
        assert all(c.k.dtype == c.v.dtype == elem for c in caches[0])


def test_litevar_cfg_sharing_gives_the_unconditional_rows_the_conditional_attention(tiny):
    g = torch.Generator().manual_seed(1)
    u = torch.randn(4, 64, 32, generator=g)              # rows [cond 2; uncond 2]
    blk, plan = _plan_block(tiny, window=None, share="output", shared_scales=[6])
    plan.cfg_rows = True
    out = blk._attention(u, _filled_cache(tiny, 4, 6, g), 6)
    assert torch.equal(out[:2], out[2:])
    blk, plan = _plan_block(tiny, window=None, share="map", shared_scales=[6])
    plan.cfg_rows = True
    cache = _filled_cache(tiny, 4, 6, g)
    k0, v0 = cache.k.clone(), cache.v.clone()
    out = blk._attention(u, cache, 6)
    # reference: the conditional rows' softmax(q k^T) applied to each row's own values
    a = tiny.var.blocks[0].attn
    bias = torch.cat((a.q_bias, a.zero_k_bias, a.v_bias))
    q, k, v = torch.nn.functional.linear(u, a.mat_qkv.weight, bias).view(4, 64, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q = torch.nn.functional.normalize(q, dim=-1).mul(a.scale_mul_1H11.clamp_max(a.max_scale_mul).exp())
    k = torch.nn.functional.normalize(k, dim=-1)
    K, V = torch.cat((k0, k), dim=2), torch.cat((v0, v), dim=2)
    p = (q[:2] @ K[:2].transpose(-1, -2)).softmax(-1)
    ref = a.proj(torch.cat((p @ V[:2], p @ V[2:])).transpose(1, 2).reshape(4, 64, 32))
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out[2:], a.proj((p @ V[:2]).transpose(1, 2).reshape(2, 64, 32)), atol=1e-3)


def test_litevar_shares_only_with_cfg_rows_and_only_on_the_last_scales(tiny):
    m = create_method("litevar", window=None, share="output", share_last=2, precision="fp32")
    net = m.build(tiny)
    seen = {}
    for b in net.var.blocks:
        b.register_forward_hook(lambda mod, a, o: seen.update({a[4]: mod.plan.sharing(a[4])}))
    generate(net, tiny.vqvae, LABELS, 0, SAMPLING, decode=False)
    assert seen == {0: None, 1: None, 2: None, 3: None, 4: None, 5: "output", 6: "output"}
    net.scale_forward(0, None, torch.tensor([1, 2]), net.new_caches())   # plain labels: not a CFG batch
    assert net.plan.cfg_rows is False


def test_litevar_precision_puts_linear_layers_in_bf16_except_fc2(tiny):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 32, generator=g), torch.randn(16, 32, generator=g)
    blk, _ = _plan_block(tiny, precision="linear-but-fc2")
    for part in ("qkv", "proj", "fc1"):
        y = blk._linear(part, x, w, None)
        assert y.dtype == torch.float32 and torch.equal(y, y.bfloat16().float())     # computed in bf16
    y = blk._linear("fc2", x, w, None)
    assert torch.equal(y, torch.nn.functional.linear(x, w)) and not torch.equal(y, y.bfloat16().float())
    blk, _ = _plan_block(tiny, precision="all-linear")
    y = blk._linear("fc2", x, w, None)
    assert torch.equal(y, y.bfloat16().float())


# ---------------------------------------------------------------------------------------------- tome, directly
def test_tome_merges_r_tokens_and_copies_outputs_back():
    from methods.tome import Matching, dst_positions, merged_count
    assert dst_positions(4) == [0, 2, 8, 10] and merged_count(0.5, 4) == 8
    assert merged_count(0.9, 4) == 12 and merged_count(0.5, 8) == 32 and merged_count(0.5, 1) == 0
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 4, 8, generator=g)                 # 4 distinct directions, one per dst
    x = torch.zeros(1, 16, 8)
    for cell, (r0, c0) in enumerate(((0, 0), (0, 2), (2, 0), (2, 2))):
        for dr in (0, 1):
            for dc in (0, 1):
                x[0, (r0 + dr) * 4 + c0 + dc] = base[0, cell] * (1 + 0.1 * (2 * dr + dc))   # same direction
    x[0, 5] = -base[0, 0] + 0.01 * base[0, 1]                 # token 5 resembles no dst: the one left unmerged
    m = Matching(x, 4, 11)                                     # 11 of the 12 src tokens merge
    y = m.merge(x)
    assert y.shape == (1, 5, 8)                                # n - r
    assert int(m.unm_idx.shape[1]) == 1 and int(m.src[m.unm_idx[0, 0]]) == 5
    cell0 = x[0, [0, 1, 4]].mean(0)                            # dst 0 with its merged srcs 1 and 4 (5 stays)
    assert torch.allclose(y[0, 1], cell0)
    assert torch.allclose(y[0, 2], x[0, [2, 3, 6, 7]].mean(0))
    back = m.unmerge(y)
    assert back.shape == x.shape
    for i in (0, 1, 4):
        assert torch.equal(back[0, i], y[0, 1])                # copies of their merged token
    assert torch.equal(back[0, 5], y[0, 0])


def test_tome_blocks_run_the_merged_count_and_cache_it(tiny):
    m = create_method("tome", merge="attn+ffn")                # last two scales, ratio 0.5
    net = m.build(tiny)
    attn_in, ffn_in = {}, {}
    for i, b in enumerate(net.blocks):
        b.block.attn.register_forward_pre_hook(lambda mod, a, i=i: attn_in.update({(i, a[0].shape[1]): 0}))
        b.block.ffn.register_forward_pre_hook(lambda mod, a, i=i: ffn_in.update({(i, a[1]): a[0].shape[1]}))
    caches = []
    orig = net.new_caches
    net.new_caches = lambda: caches.append(orig()) or caches[-1]
    generate(net, tiny.vqvae, LABELS, 0, SAMPLING, decode=False)
    assert {n for (_, n) in attn_in} == {1, 4, 9, 16, 25, 18, 32}   # 36 - 18, 64 - 32 at scales 5, 6
    assert ffn_in[(0, 5)] == 18 and ffn_in[(1, 6)] == 32 and ffn_in[(0, 4)] == 25
    assert all(c.k.shape[2] == 1 + 4 + 9 + 16 + 25 + 18 + 32 for c in caches[0])
    assert m.row_metrics(net, tiny)["tome_tokens_per_scale"] == [1, 4, 9, 16, 25, 18, 32]
    held = sum(c.k.numel() + c.v.numel() for c in caches[0]) * 4 / len(LABELS)   # float32 bytes per image
    assert m.kv_cache_bytes(net, tiny) == held
    assert create_method("tome", merge="ffn").kv_cache_bytes(net, tiny) == \
        create_method("dense").kv_cache_bytes(tiny.var, tiny)                     # attention unmerged: every key


# ---------------------------------------------------------------------------------------------- bad parameters
def test_bad_parameters(tiny):
    cases = [
        (lambda: create_method("litevar", window=-1), r"window=-1 is out of range; valid: int in \[0, inf\]"),
        (lambda: create_method("litevar", share="kv"), r"share='kv' is not allowed; valid: one of none, output, map"),
        (lambda: create_method("litevar", precision="int8"), r"precision='int8' is not allowed; valid: one of fp32"),
        (lambda: create_method("litevar", share_last=8).build(tiny), r"share_last=8 is out of range for a model with "
                                                                    r"7 scales; valid: 0..7"),
        (lambda: create_method("litevar", keep_first=9).build(tiny), r"keep_first=9 is out of range .*valid: 0..7"),
        (lambda: create_method("tome", ratio=1.0), r"ratio=1.0 is out of range; valid: float in \[0.0, 1.0\)"),
        (lambda: create_method("tome", merge="mlp"), r"merge='mlp' is not allowed; valid: one of attn, ffn, attn\+ffn"),
        (lambda: create_method("tome", scales=[5, 7]).build(tiny), r"scale index 7 out of range; valid: 0..6"),
        (lambda: create_method("tome", scales=[5, 5]), r"scales lists a scale twice"),
        (lambda: create_method("tome", metric="queries"), r"metric='queries' is not allowed; valid: one of hidden, "
                                                          r"keys"),
    ]
    for make, needle in cases:
        with pytest.raises(BenchError, match=needle) as e:
            make()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("method,setting,needle", [
    ("litevar", "share=kv", "share='kv' is not allowed; valid: one of none, output, map"),
    ("tome", "scales=9", "scale index 9 out of range; valid: 0..6"),
])
def test_cli_bad_parameter_is_one_line_exit_2(method, setting, needle, tmp_path):
    from tests.conftest import run_cli
    res = tmp_path / "results"
    r = run_cli("run", "--model", "tiny", "--method", method, "--set", setting, "--samples", "4", "--results", res,
                "--cache-dir", tmp_path / "cache")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr
    assert not res.exists()
