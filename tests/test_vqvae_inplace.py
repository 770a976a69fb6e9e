"""The VQ-VAE's SiLU runs in place where no gradient is taken (sampling), out of place in training: the decoded
images and encoded tokens are bitwise the same either way."""
import torch

from bench.models.vqvae import VQVAE


def test_in_place_silu_changes_no_bit_and_training_still_has_gradients():
    torch.manual_seed(0)
    vq = VQVAE(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=(1, 2, 4))
    f_hat, img = torch.randn(2, 8, 4, 4), torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        sampled, tokens = vq.fhat_to_img(f_hat), vq.img_to_idx(img)
    trained = vq.fhat_to_img(f_hat)       # grad enabled: parameters require grad, the out-of-place path
    assert trained.requires_grad and torch.equal(trained.detach(), sampled)
    with torch.enable_grad():
        _, _, idx = vq(img)
    assert all(torch.equal(a, b) for a, b in zip(idx, tokens))
    trained.sum().backward()
    assert all(p.grad is not None for p in vq.decoder.parameters())
