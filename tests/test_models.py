"""Foundation: the VAR/VQ-VAE match the release's state dicts, sampling is exact and deterministic."""
import os

import pytest
import torch

from bench.checkpoints import check_compatible, save_state_dict
from bench.errors import BenchError
from bench.models.var import VAR, VARConfig
from bench.models.vqvae import OFFICIAL_VQVAE, VQVAE
from bench.sampling import SamplingConfig, generate, tokens_to_image
from bench.zoo import load_official


def official_var_state_dict(depth: int, L: int = 680, V: int = 4096, Cvae: int = 32, classes: int = 1000):
    """Random tensors under the release's key names and shapes (../shared/METHODS.md §1), built independently
    of our module so that a renamed or reshaped parameter in our code fails here."""
    C, H = 64 * depth, depth
    sd = {"pos_start": (1, 1, C), "pos_1LC": (1, L, C), "word_embed.weight": (C, Cvae), "word_embed.bias": (C,),
          "class_emb.weight": (classes + 1, C), "lvl_embed.weight": (10, C),
          "head_nm.ada_lin.1.weight": (2 * C, C), "head_nm.ada_lin.1.bias": (2 * C,),
          "head.weight": (V, C), "head.bias": (V,)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "attn.scale_mul_1H11": (1, H, 1, 1), b + "attn.q_bias": (C,), b + "attn.v_bias": (C,),
                   b + "attn.zero_k_bias": (C,), b + "attn.mat_qkv.weight": (3 * C, C),
                   b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
                   b + "ffn.fc1.weight": (4 * C, C), b + "ffn.fc1.bias": (4 * C,),
                   b + "ffn.fc2.weight": (C, 4 * C), b + "ffn.fc2.bias": (C,),
                   b + "ada_lin.1.weight": (6 * C, C), b + "ada_lin.1.bias": (6 * C,)})
    g = torch.Generator().manual_seed(0)
    out = {k: torch.randn(s, generator=g) * 0.02 for k, s in sd.items()}
    lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate((1, 2, 3, 4, 5, 6, 8, 10, 13, 16))])
    out["lvl_1L"] = lvl.view(1, L)
    out["attn_bias_for_masking"] = torch.where(lvl.view(L, 1) >= lvl.view(1, L), 0.0, -torch.inf).view(1, 1, L, L)
    return out


def test_official_var_keys_load_strictly_and_wrong_ones_fail_clearly():
    sd = official_var_state_dict(depth=2)
    model = VAR(VARConfig.official(2))
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.blocks[1].ffn.fc1.weight, sd["blocks.1.ffn.fc1.weight"])
    bad = dict(sd)
    bad.pop("blocks.0.attn.q_bias")
    bad["blocks.0.attn.extra"] = torch.zeros(1)
    bad["head.weight"] = torch.zeros(10, 128)
    with pytest.raises(BenchError) as e:
        check_compatible(model, bad, "VAR checkpoint x.pth", "VAR(depth=2)")
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing keys: blocks.0.attn.q_bias" in msg
    assert "unexpected keys: blocks.0.attn.extra" in msg
    assert "head.weight (10, 128) vs (4096, 128)" in msg


def test_official_parameter_counts_match_the_release():
    """VAR d16/d20/d24/d30 and the VQ-VAE have the released parameter counts (meta tensors: no memory)."""
    expected = {16: 310.28, 20: 600.92, 24: 1033.40, 30: 2010.02}
    for depth, millions in expected.items():
        with torch.device("meta"):
            m = VAR(VARConfig.official(depth))
        assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - millions) < 0.01
    with torch.device("meta"):
        vq = VQVAE(**OFFICIAL_VQVAE)
    assert abs(sum(p.numel() for p in vq.parameters()) / 1e6 - 108.95) < 0.01
    shapes = {k: tuple(v.shape) for k, v in vq.state_dict().items()}
    assert shapes["quantize.embedding.weight"] == (4096, 32)
    assert shapes["quantize.quant_resi.qresi_ls.3.weight"] == (32, 32, 3, 3)
    assert shapes["quantize.ema_vocab_hit_SV"] == (10, 4096)
    assert shapes["quant_conv.weight"] == shapes["post_quant_conv.weight"] == (32, 32, 3, 3)


def test_load_official_paths_report_problems_in_one_line(tmp_path):
    sd = official_var_state_dict(depth=1)
    good = str(tmp_path / "var_d1.pth")
    torch.save(sd, good)
    with pytest.raises(BenchError, match="VQ-VAE checkpoint not found"):
        load_official(good, str(tmp_path / "missing.pth"))
    with pytest.raises(BenchError, match="VAR checkpoint not found"):
        load_official(str(tmp_path / "nope.pth"), good)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(BenchError, match="cannot read VAR checkpoint"):
        load_official(str(corrupt), good)
    with pytest.raises(BenchError, match=r"does not match VAR\(depth=2\)"):
        load_official(good, good, depth=2)
    with pytest.raises(BenchError, match="give 680 tokens|tokens but the VAR checkpoint has 680"):
        load_official(good, good, patch_nums=(1, 2, 3))


class Evil:  # a pickled object that weights_only loading must refuse to execute
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, p)
    with pytest.raises(BenchError, match="cannot read"):
        load_official(str(p), str(p))


def _teacher_forced_inputs(net, vq, gen):
    x = vq.quantize.idx_to_var_input(gen.tokens)
    return torch.cat((x, x)), torch.cat((gen.labels, torch.full_like(gen.labels, net.num_classes)))


def test_cached_sampling_logits_equal_teacher_forced_forward(tiny):
    """Every scale's logits from the KV-cache sampler equal the masked teacher-forced pass on the same tokens."""
    var, vq = tiny.var, tiny.vqvae
    captured = []

    def capture(si, x_in, label_2B, caches):
        out = var.scale_forward(si, x_in, label_2B, caches)
        captured.append(out.clone())
        return out

    gen = generate(var, vq, torch.tensor([1, 4, 7]), 3, SamplingConfig(cfg=2.0, top_k=0, top_p=0.0), scale_fn=capture)
    x, labels = _teacher_forced_inputs(var, vq, gen)
    with torch.no_grad():
        full = var(labels, x)
        by_scale = var.forward_by_scale(labels, x)
    for si, (bg, ed) in enumerate(var.begin_ends):
        assert (captured[si] - full[:, bg:ed]).abs().max() <= 1e-4, f"scale {si}"
    assert (full - by_scale).abs().max() <= 1e-4


def test_same_seed_same_tokens_and_images(tiny):
    s = SamplingConfig(cfg=1.5, top_k=20, top_p=0.9)
    labels = torch.tensor([0, 3, 9, 9])
    a = generate(tiny.var, tiny.vqvae, labels, 7, s)
    b = generate(tiny.var, tiny.vqvae, labels, 7, s)
    c = generate(tiny.var, tiny.vqvae, labels, 8, s)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert torch.equal(a.images, b.images)
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))
    assert [t.shape[1] for t in a.tokens] == [p * p for p in tiny.var.patch_nums]
    assert a.images.shape == (4, 3, 32, 32) and 0 <= a.images.min() and a.images.max() <= 1
    # decoding the returned tokens reproduces the returned images
    assert torch.allclose(tokens_to_image(tiny.vqvae, a.tokens), a.images, atol=1e-5)


def test_top_k_top_p_restrict_the_support(tiny):
    """With top_k=1 sampling is greedy: the tokens are the argmax of the guided logits at every scale."""
    var, vq = tiny.var, tiny.vqvae
    guided = []

    def capture(si, x_in, label_2B, caches):
        out = var.scale_forward(si, x_in, label_2B, caches)
        B = label_2B.shape[0] // 2
        t = 1.0 * si / (len(var.patch_nums) - 1)
        guided.append(((1 + t) * out[:B] - t * out[B:]).argmax(-1))
        return out

    gen = generate(var, vq, torch.tensor([2, 5]), 0, SamplingConfig(cfg=1.0, top_k=1, top_p=0.0), scale_fn=capture)
    assert all(torch.equal(a, b) for a, b in zip(gen.tokens, guided))


def test_vqvae_round_trip_and_teacher_forcing_shapes(tiny):
    vq = tiny.vqvae
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    idx = vq.img_to_idx(img)
    assert [t.shape for t in idx] == [(2, p * p) for p in vq.v_patch_nums]
    x = vq.quantize.idx_to_var_input(idx)
    assert x.shape == (2, tiny.var.L - 1, vq.Cvae)


def test_shipped_weights_are_safetensors_and_small():
    from bench.zoo import ASSETS, read_manifest
    m = read_manifest()
    total = 0
    for root, _, files in os.walk(ASSETS):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
            assert not f.endswith((".pt", ".pth", ".pkl")), f"pickled weights shipped: {f}"
    assert total <= 30 * 2 ** 20, f"shipped assets are {total / 2 ** 20:.1f} MB (> 30 MB)"
    for entry in m.get("models", {}).values():
        for kind, fname in entry["files"].items():
            assert fname.endswith(".safetensors")
    for name, entry in m.get("models", {}).items():       # the manifest's hashes are those of the files
        from bench.checkpoints import file_sha256
        for kind, fname in entry["files"].items():
            assert file_sha256(os.path.join(ASSETS, fname)) == entry["sha256"][kind], (name, kind)


def test_shipped_default_draws_its_conditioning_class():
    """The embedded default with its own sampling: the shipped classifier recognises the conditioning class of
    most of 40 samples (the README reports 1000), and an untrained VAR of the same shape stays near chance."""
    from bench import quality
    from bench.zoo import load_model
    b = load_model("default")
    labels = torch.arange(40) % b.num_classes
    gen = generate(b.var, b.vqvae, labels, 0, b.sampling)
    acc = (quality.classifier_logits(gen.images, b).argmax(1) == labels).float().mean().item()
    assert acc >= 0.8, acc
    torch.manual_seed(0)
    untrained = VAR(b.var.cfg).init_weights().eval()
    gen = generate(untrained, b.vqvae, labels, 0, b.sampling)
    assert (quality.classifier_logits(gen.images, b).argmax(1) == labels).float().mean().item() <= 0.4
