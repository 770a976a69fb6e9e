"""CoDe (methods/code.py) and ScaleKV (methods/scalekv.py) on the tiny model, and the KV-cache bytes every row reports
(Method.kv_cache_bytes) against the bytes of the K/V tensors a real generation left in its caches."""
import pytest
import torch

from bench.errors import BenchError
from bench.registry import create_method
from bench.sampling import generate
from tests.test_actvar import one_thread  # noqa: F401 (autouse fixture)
from tests.test_actvar import SAMPLING, reset

LABELS = torch.tensor([1, 4, 7])


def macs_match(method, net, bundle, labels, seed=0):
    from bench.flops import count_generation
    reset(net)
    mc = count_generation(net, bundle.vqvae, labels, seed, SAMPLING, decoder=False)
    an = method.analytic_macs(net, bundle, len(labels))
    assert len(an) == len(mc.per_scale)
    for a, f in zip(an, mc.per_scale):
        assert a == pytest.approx(f, rel=1e-9, abs=0)
    return an


def cache_bytes_after(net, vqvae, labels, sampling, seed=0):
    """Generate, keeping the caches the sampler asked for; K/V bytes per image they hold after the last scale."""
    made = []
    orig = net.new_caches
    net.new_caches = lambda: made.append(orig()) or made[-1]
    try:
        generate(net, vqvae, labels, seed, sampling, decode=False)
    finally:
        del net.new_caches
    total = sum(t.numel() * t.element_size() for c in made[-1] for t in (c.k, c.v) if t is not None)
    return total / len(labels), made[-1]


@pytest.fixture
def partner(monkeypatch):
    """Serve named partner models from tiny bundles: 'tiny-d3' is a deeper model on the same VQ-VAE."""
    from bench.zoo import tiny_bundle
    import methods.code as code
    served = {"tiny-d3": tiny_bundle(depth=3), "tiny-s1": tiny_bundle(seed=1)}
    real = code.load_partner
    monkeypatch.setattr(code, "load_partner", lambda name, bundle: served[name] if name in served else real(name, bundle))
    return served


# ---------------------------------------------------------------------------------------------- code
def test_code_takeover_0_is_the_dense_model_bitwise(tiny):
    net = create_method("code", drafter="tiny", takeover=0).build(tiny)
    a = generate(net, tiny.vqvae, LABELS, 3, SAMPLING)
    b = generate(tiny.var, tiny.vqvae, LABELS, 3, SAMPLING)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_code_drafter_drafts_refiner_prefills_then_refines(tiny, partner):
    m = create_method("code", drafter="tiny-d3")                     # default takeover S-2 = 5
    net = m.build(tiny)
    assert net.takeover == 5 and net.drafter is partner["tiny-d3"].var and net.refiner is tiny.var
    seen = {}
    for who, var in (("drafter", net.drafter), ("refiner", net.refiner)):
        var.blocks[0].register_forward_pre_hook(lambda mod, a, who=who: seen.setdefault(who, []).append(a[0].shape[1]))
    gen = generate(net, tiny.vqvae, LABELS, 2, SAMPLING)
    assert seen["drafter"] == [1, 4, 9, 16, 25]                      # scales 0..4, one call each
    assert seen["refiner"] == [1 + 4 + 9 + 16 + 25 + 36, 64]         # the prefill over scales 0..5, then scale 6
    alone = generate(partner["tiny-d3"].var, tiny.vqvae, LABELS, 2, SAMPLING)
    assert all(torch.equal(gen.tokens[si], alone.tokens[si]) for si in range(5))   # the drafted scales are the drafter's
    an = macs_match(m, net, tiny, LABELS, seed=2)
    from bench.analytic import dense_scale_macs
    d3, d2 = dense_scale_macs(partner["tiny-d3"].var.cfg, 3), dense_scale_macs(tiny.var.cfg, 3)
    assert an[:5] == [s.total for s in d3[:5]] and an[6] == d2[6].total and an[5] > d2[5].total
    row = m.row_metrics(net, tiny)
    assert row["code_takeover"] == 5 and row["code_drafter_depth"] == 3 and row["code_refiner_depth"] == 2


def test_code_prefill_rebuilds_the_cache_the_dense_model_would_hold(tiny):
    """Drafter = refiner = the bundle: the refiner's masked pass over the drafted maps gives the dense cache and logits
    (up to float summation order)."""
    net = create_method("code", drafter="tiny", takeover=3).build(tiny)
    logits = {}

    def capture(fn):
        def f(si, x, lab, caches):
            out = fn(si, x, lab, caches)
            logits[si] = out.clone()
            return out
        return f
    a = generate(net, tiny.vqvae, LABELS, 5, SAMPLING, scale_fn=capture(net.scale_forward))
    mine = dict(logits)
    b = generate(tiny.var, tiny.vqvae, LABELS, 5, SAMPLING, scale_fn=capture(tiny.var.scale_forward))
    for si in range(7):
        assert torch.allclose(mine[si], logits[si], atol=1e-5), si
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


def test_code_refuses_partners_on_another_vqvae_or_scale(tiny, partner):
    with pytest.raises(BenchError, match=r"the drafter tiny and the model tiny use different VQ-VAE weights; valid"):
        create_method("code", drafter="tiny-s1").check_model(tiny)
    with pytest.raises(BenchError, match=r"takeover=7 is out of range for a model with 7 scales; valid: 0..6"):
        create_method("code", drafter="tiny", takeover=7).build(tiny)
    with pytest.raises(BenchError, match=r"unknown model 'nope'; valid: "):
        create_method("code", drafter="nope").check_model(tiny)
    with pytest.raises(BenchError, match=r"checkpoint '/no/var_d30.pth' does not exist"):
        create_method("code", drafter="/no/var_d30.pth").check_model(tiny)


# ---------------------------------------------------------------------------------------------- scalekv
@pytest.fixture
def tiny3():
    from bench.zoo import tiny_bundle
    return tiny_bundle(depth=3)


def test_scalekv_budget_1_is_the_dense_model_bitwise(tiny3):
    for refiners in ("auto", [0, 1, 2]):
        net = create_method("scalekv", budget=1.0, refiners=refiners, calib_images=2).build(tiny3)
        a = generate(net, tiny3.vqvae, LABELS, 4, SAMPLING)
        b = generate(tiny3.var, tiny3.vqvae, LABELS, 4, SAMPLING)
        assert torch.equal(a.images, b.images)


def test_scalekv_refiner_layers_keep_the_budget_of_top_attended_keys(tiny3):
    m = create_method("scalekv", budget=0.2, refiners=[0, 2])
    net = m.build(tiny3)
    plan = net.blocks[0].plan
    assert plan.refiners == {0, 2}
    # L after each scale: 1, 5, 14, 30, 55, 91; kept = round(0.2 L), cut where fewer than the keys seen
    assert plan.cut == {1: 1, 2: 3, 3: 6, 4: 11, 5: 18} and plan.keys_seen == [1, 5, 10, 19, 31, 47, 82]
    cuts = []
    blk = net.blocks[2]
    orig = blk._attend

    def spy(x, cache, keep):
        out = orig(x, cache, keep)
        if keep is not None:
            cuts.append((keep, tuple(cache.k.shape)))
        return out
    blk._attend = spy
    _, caches = cache_bytes_after(net, tiny3.vqvae, LABELS, SAMPLING)
    assert [k for k, _ in cuts] == [1, 3, 6, 11, 18] and all(s[2] == k for k, s in cuts)
    assert [int(c.k.shape[2]) for c in caches] == [82, 155, 82]       # refiners: 18 kept + the 64 of the last scale
    macs_match(m, net, tiny3, LABELS)
    dense = generate(tiny3.var, tiny3.vqvae, LABELS, 0, SAMPLING)
    got = generate(net, tiny3.vqvae, LABELS, 0, SAMPLING)
    assert all(torch.equal(got.tokens[si], dense.tokens[si]) for si in range(2))   # no cut has been read yet
    row = m.row_metrics(net, tiny3)
    assert row["scalekv_kv_keys_last"] == [82, 155, 82] and 0 < row["macs_saved_fraction"] < 1


def test_scalekv_selection_keeps_the_keys_the_current_queries_attend_to_most(tiny3):
    from bench.models.var import KVCache
    net = create_method("scalekv", budget=0.5, refiners=[1]).build(tiny3)
    blk = net.blocks[1]
    torch.manual_seed(0)
    x = torch.randn(2, 9, tiny3.var.C)
    cache = KVCache()
    cache.k, cache.v = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    ref = KVCache()
    ref.k, ref.v = cache.k.clone(), cache.v.clone()
    blk._attend(x, cache, 7)
    at = blk.block.attn                              # the weights, recomputed the plain way
    q, k, v = torch.nn.functional.linear(x, at.mat_qkv.weight, torch.cat((at.q_bias, at.zero_k_bias, at.v_bias))) \
        .view(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.nn.functional.normalize(q, dim=-1).mul(at.scale_mul_1H11.clamp_max(at.max_scale_mul).exp())
    K = torch.cat((ref.k, torch.nn.functional.normalize(k, dim=-1)), 2)
    mass = (q @ K.transpose(-2, -1)).softmax(-1).sum(2)              # (2, 2, 14)
    want = mass.topk(7, dim=-1).indices.sort(-1).values
    assert torch.equal(cache.k, K.gather(2, want.unsqueeze(-1).expand(-1, -1, -1, 16)))


def test_scalekv_auto_refiners_are_the_layers_most_on_the_current_scale(tiny3):
    m = create_method("scalekv", calib_images=3)
    shares = m.shares(tiny3)
    assert len(shares) == 3 and all(0 < s < 1 for s in shares)
    assert m.refiners(tiny3) == [max(range(3), key=lambda i: shares[i])]    # ⌊3/2⌋ = 1 layer
    assert create_method("scalekv", refiners="none").refiners(tiny3) == []


def test_scalekv_bad_parameters(tiny3):
    with pytest.raises(BenchError, match=r"refiner layer 3 out of range; valid: 0..2"):
        create_method("scalekv", refiners=[0, 3]).build(tiny3)
    with pytest.raises(BenchError, match=r"refiners='x' is not valid; valid: auto, none, or a list"):
        create_method("scalekv", refiners="x")
    with pytest.raises(BenchError, match=r"budget=0.0 is out of range; valid: float in \(0.0, 1.0\]"):
        create_method("scalekv", budget=0.0)
    with pytest.raises(BenchError, match=r"refiners lists a layer twice"):
        create_method("scalekv", refiners="1,1")


# ---------------------------------------------------------------------------------------------- KV-cache bytes
def test_kv_cache_bytes_match_the_tensors_held_at_the_last_scale():
    """The default model: dense, scalekv (10%, auto roles) and code (takeover at scale 3, refiner = the bundle) — the
    analytic bytes per image equal the K/V tensors a generation left in its caches."""
    from bench.zoo import load_model
    b = load_model("default")
    labels = torch.tensor([0, 3])
    dense = create_method("dense")
    got, _ = cache_bytes_after(b.var, b.vqvae, labels, b.sampling)
    cfg = b.var.cfg
    assert got == dense.kv_cache_bytes(b.var, b) == cfg.depth * 2 * 155 * cfg.embed_dim * 4 * 2
    for m in (create_method("scalekv", calib_images=2), create_method("code", drafter="default", takeover=3)):
        net = m.build(b)
        got, _ = cache_bytes_after(net, b.vqvae, labels, b.sampling)
        assert got == m.kv_cache_bytes(net, b), m.name
    assert m.kv_cache_bytes(net, b, 2) == dense.kv_cache_bytes(b.var, b, 2)   # bf16/fp16: 2 bytes an element


@pytest.mark.parametrize("name,params", [("skip-scales", dict(skip=2)), ("cfg-skip", dict(last=2)),
                                         ("fixed-tokens", dict(token_rate=0.5, criterion="norm")),
                                         ("fastvar", dict(start_layer=1, end_layer=2))])
def test_kv_cache_bytes_of_methods_whose_caches_shrink(tiny, name, params):
    """Skipped scales append nothing, CFG-free scales drop the unconditional rows, pruned tokens append no keys."""
    from bench.analytic import dense_kv_cache_bytes
    m = create_method(name, **params)
    net = m.build(tiny)
    reset(net)
    got, _ = cache_bytes_after(net, tiny.vqvae, LABELS, SAMPLING)
    assert got == m.kv_cache_bytes(net, tiny) < dense_kv_cache_bytes(tiny.var.cfg)


def test_kv_element_bytes_are_what_the_caches_store_under_the_dtype(tiny):
    """The element size is probed, not assumed (autocast's rules differ by device); here it equals the bytes a
    bf16 generation's caches hold, and 4 in fp32."""
    from bench.measure import kv_element_bytes
    from bench.precision import generation_dtype, supported_dtypes
    assert kv_element_bytes(tiny) == 4
    if "bf16" not in supported_dtypes("cpu"):
        pytest.skip("no bf16 autocast on this CPU")
    m = create_method("scalekv", budget=0.3, refiners=[1])
    net = m.build(tiny)
    with generation_dtype("bf16"):
        elem = kv_element_bytes(tiny)
        got, caches = cache_bytes_after(net, tiny.vqvae, LABELS, SAMPLING)
    assert elem == caches[0].k.element_size() == 2 and got == m.kv_cache_bytes(net, tiny, elem)
