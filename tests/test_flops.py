"""fvcore MAC counts of the real generation vs the analytic formula (METHODS.md §2), per scale and in total."""
import pytest
import torch

from bench.analytic import dense_scale_macs
from bench.flops import ScaleFlopCounter, count_call, count_decoder, count_generation
from bench.sampling import generate

TOL = 0.02


def _close(a, b):
    return abs(a - b) <= TOL * abs(b)


def test_tiny_counts_match_analytic_per_scale_and_generation_is_unchanged(tiny):
    labels = torch.tensor([0, 3, 7])
    calls = []
    real_scale_forward = tiny.var.scale_forward

    def spy(si, x_in, label_B, caches):
        calls.append(si)
        return real_scale_forward(si, x_in, label_B, caches)

    tiny.var.scale_forward = spy
    try:
        m = count_generation(tiny.var, tiny.vqvae, labels, 11, tiny.sampling)
    finally:
        del tiny.var.scale_forward
    S = len(tiny.var.patch_nums)
    assert calls == list(range(S))  # every scale ran exactly once, inside the trace
    analytic = [s.total for s in dense_scale_macs(tiny.var.cfg, len(labels))]
    assert len(m.per_scale) == S
    for si, (got, want) in enumerate(zip(m.per_scale, analytic)):
        assert got > 0 and _close(got, want), (si, got, want)
    assert _close(m.transformer, sum(analytic))
    one = count_decoder(tiny.vqvae, torch.zeros(1, tiny.vqvae.Cvae, 8, 8))[1].macs
    assert m.decoder > 0 and _close(m.decoder, len(labels) * one)  # the decoder, counted apart from the scales
    # the traced call returned the real logits and advanced the KV caches once: same tokens and images as a
    # plain generation with the same seed (a doubled cache entry would change every later scale)
    plain = generate(tiny.var, tiny.vqvae, labels, 11, tiny.sampling)
    for a, b in zip(m.generation.tokens, plain.tokens):
        assert torch.equal(a, b)
    assert torch.allclose(m.generation.images, plain.images, atol=1e-6)
    # elementwise ops are listed, not counted; the class/label lookups are dynamic ops counted as zero
    assert m.uncounted["aten::layer_norm"] > 0 and m.uncounted["aten::gelu"] > 0
    assert m.dynamic["aten::embedding"] >= S


def test_decoder_is_counted_separately_and_matches_torch_flop_counter(tiny):
    """count_generation's scales exclude the decoder (test above: they equal the transformer formula); the
    decoder's own count is checked against torch's dispatch-level FlopCounterMode on the same call."""
    from bench.flops import torch_flop_counter
    f_hat = torch.randn(2, tiny.vqvae.Cvae, 8, 8)
    with torch.no_grad():
        imgs, c = count_decoder(tiny.vqvae, f_hat)
        with torch_flop_counter() as fc:
            ref = tiny.vqvae.fhat_to_img(f_hat).add(1).mul(0.5)
    assert torch.allclose(imgs, ref)
    assert c.macs > 0 and _close(c.macs, fc.get_total_flops() / 2)  # torch counts 2 FLOPs per MAC
    assert "aten::group_norm" in c.uncounted and "aten::upsample_nearest2d" in c.uncounted


def test_d16_shapes_match_analytic_per_scale():
    """VAR-d16 (310M parameters), batch 1 with CFG, traced scale by scale through the KV caches on the meta
    device: fvcore counts from shapes, so the trace is the real one without 300 GMACs of CPU work."""
    from bench.models.var import VAR, VARConfig
    cfg = VARConfig.official(16)
    with torch.device("meta"):
        net = VAR(cfg).eval()
    counter = ScaleFlopCounter(net)
    caches = net.new_caches()
    label_2B = torch.tensor([3, cfg.num_classes], device="meta")
    with torch.no_grad():
        for si, pn in enumerate(cfg.patch_nums):
            x_in = None if si == 0 else torch.empty(1, pn * pn, cfg.Cvae, device="meta")
            logits = counter(si, x_in, label_2B, caches)
            assert logits.shape == (2, pn * pn, cfg.vocab_size)
            assert caches[0].k.shape[2] == sum(p * p for p in cfg.patch_nums[:si + 1])  # appended once
    analytic = [s.total for s in dense_scale_macs(cfg, 1)]
    got = counter.scale_list(len(cfg.patch_nums))
    for si, (a, b) in enumerate(zip(got, analytic)):
        assert _close(a, b), (si, a, b)
    assert _close(sum(got), sum(analytic))
    assert abs(sum(got) / 1e9 - 300.36) < 0.5  # METHODS.md §2: 300.38 GMACs for d16 with CFG


def test_attention_and_dynamic_op_handlers():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    w = torch.randn(4, 6)

    def fn(q, k, v, w):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)          # 2·3·5·7·(8+4)
        top = out.flatten(0, 2).topk(2, dim=-1).indices
        picked = torch.gather(out.flatten(0, 2), 1, top)
        srt = picked.sort(dim=0).values
        return out @ w + srt.sum()                                                # 2·3·5·4·6

    out, c = count_call(fn, None, (q, k, v, w))
    assert torch.allclose(out, fn(q, k, v, w))
    assert c.macs == 2 * 3 * 5 * 7 * (8 + 4) + 2 * 3 * 5 * 4 * 6
    assert c.dynamic["aten::topk"] == 1 and c.dynamic["aten::gather"] == 1 and c.dynamic["aten::sort"] == 1


def test_default_model_counts_match_analytic():
    from bench.zoo import list_models, load_model
    assert "default" in list_models(), "the embedded default is missing from bench/assets/manifest.json"
    b = load_model("default")
    m = count_generation(b.var, b.vqvae, torch.tensor([0]), 0, b.sampling, decoder=False)
    analytic = [s.total for s in dense_scale_macs(b.var.cfg, 1)]
    for si, (a, want) in enumerate(zip(m.per_scale, analytic)):
        assert _close(a, want), (si, a, want)
    assert _close(m.transformer, sum(analytic))


def test_torch_flop_counter_counts_cpu_attention():
    """The cross-check counter gives SDPA its formula on every torch release (2.14 counts CPU SDPA as 0 alone)."""
    from bench.flops import torch_flop_counter
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 4)
    mask = torch.ones(5, 7, dtype=torch.bool).tril()
    with torch_flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert fc.get_total_flops() == 2 * 2 * (2 * 3 * 5 * 7 * (8 + 4))
