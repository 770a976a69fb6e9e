"""Multi-scale residual VQ-VAE, state-dict compatible with the official VAR release.

Parameter names follow `vae_ch160v4096z32.pth` (encoder.*, decoder.*, quant_conv, post_quant_conv,
quantize.embedding, quantize.quant_resi.qresi_ls.*), so the released file loads strictly into
`VQVAE(**OFFICIAL_VQVAE)`. Smaller configurations (fewer levels, channels, scales) train our embedded default.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OFFICIAL_VQVAE = dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                      share_quant_resi=4, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, ch), num_channels=ch, eps=1e-6, affine=True)


def _silu(h: torch.Tensor) -> torch.Tensor:
    """SiLU in place where no gradient is taken (sampling, as the release does): a 256² decode then allocates no
    fresh full-size map per activation. Training keeps the out-of-place op autograd needs. Bitwise the same."""
    return F.silu(h, inplace=not h.requires_grad)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (qkv as one 1x1 conv, as in the release)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w = torch.softmax(torch.bmm(q.transpose(1, 2), k) * C ** -0.5, dim=2)  # B, HW(q), HW(k)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):  # a container so that keys read `down.{i}.block.{j}` like the release
    pass


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, in_channels=3, using_sa=True, using_mid_sa=True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(ch_mult):
            lvl, last = _Level(), i == len(ch_mult) - 1
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(cin, ch * m))
                cin = ch * m
                if last and using_sa:
                    lvl.attn.append(AttnBlock(cin))
            if not last:
                lvl.downsample = Downsample2x(cin)
            self.down.append(lvl)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(cin, cin)
        self.mid.attn_1 = AttnBlock(cin) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lvl in self.down:
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "downsample"):
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels, out_channels=3, using_sa=True, using_mid_sa=True):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = _Level()
        self.mid.block_1 = ResnetBlock(cin, cin)
        self.mid.attn_1 = AttnBlock(cin) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(cin, cin)
        levels = []
        for i in reversed(range(len(ch_mult))):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(cin, ch * ch_mult[i]))
                cin = ch * ch_mult[i]
                if i == len(ch_mult) - 1 and using_sa:
                    lvl.attn.append(AttnBlock(cin))
            if i != 0:
                lvl.upsample = Upsample2x(cin)
            levels.insert(0, lvl)  # stored fine-to-coarse, run coarse-to-fine (release order)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for lvl in reversed(self.up):
            for j, blk in enumerate(lvl.block):
                h = blk(h)
                if len(lvl.attn):
                    h = lvl.attn[j](h)
            if hasattr(lvl, "upsample"):
                h = lvl.upsample(h)
        return self.conv_out(_silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """Residual refinement after upsampling: Φ(h) = (1-r)·h + r·conv3x3(h)."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__(dim, dim, 3, 1, 1)
        self.ratio = ratio

    def forward(self, h):
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiPartiallyShared(nn.Module):
    """K Φ convs shared across scales; scale si of S uses the one whose tick is nearest si/(S-1)."""

    def __init__(self, K: int, dim: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(dim, ratio) for _ in range(K)])
        self.ticks = np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)

    def index_for(self, si: int, n_scales: int) -> int:
        return int(np.argmin(np.abs(self.ticks - si / (n_scales - 1))))

    def for_scale(self, si: int, n_scales: int) -> Phi:
        return self.qresi_ls[self.index_for(si, n_scales)]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size, Cvae, v_patch_nums, share_quant_resi=4, quant_resi=0.5, beta=0.25):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = vocab_size, Cvae, beta
        self.v_patch_nums = tuple(v_patch_nums)
        self.embedding = nn.Embedding(vocab_size, Cvae)
        self.quant_resi = PhiPartiallyShared(share_quant_resi, Cvae, quant_resi)
        # kept for strict loading of released files; it only records code usage during training
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.v_patch_nums), vocab_size))

    def phi(self, si: int) -> Phi:
        return self.quant_resi.for_scale(si, len(self.v_patch_nums))

    def _nearest(self, z_NC):
        w = self.embedding.weight
        d = z_NC.square().sum(1, keepdim=True) + w.square().sum(1)
        d.addmm_(z_NC, w.T, alpha=-2, beta=1)
        return d.argmin(1)

    def quantize(self, f: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], torch.Tensor]:
        """Residual multi-scale quantisation of f (B,C,H,W): returns f_hat (straight-through), idx per scale, vq loss."""
        B, C, H, W = f.shape
        S = len(self.v_patch_nums)
        assert self.v_patch_nums[-1] == H == W, f"last patch side {self.v_patch_nums[-1]} != latent side {H}"
        f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        idx_list, loss = [], 0.0
        for si, pn in enumerate(self.v_patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != S - 1 else f_rest
            idx = self._nearest(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, pn, pn)
            h = self.embedding(idx).permute(0, 3, 1, 2)
            # .contiguous() as released: the conv after it then sees the same memory layout (bitwise parity)
            h = F.interpolate(h, size=(H, W), mode="bicubic").contiguous() if si != S - 1 else h.contiguous()
            h = self.phi(si)(h)
            f_hat = f_hat + h
            f_rest = f_rest - h
            idx_list.append(idx.view(B, -1))
            loss = loss + F.mse_loss(f_hat.detach(), f).mul(self.beta) + F.mse_loss(f_hat, f.detach())
        f_hat = (f_hat.detach() - f.detach()) + f  # straight-through to the encoder
        return f_hat, idx_list, loss / S

    def idx_to_var_input(self, idx_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input for VAR: for scales 1..S-1 the area-downsampled running f_hat, (B, L-first, Cvae)."""
        B, S, H = idx_list[0].shape[0], len(self.v_patch_nums), self.v_patch_nums[-1]
        f_hat = idx_list[0].new_zeros(B, self.Cvae, H, H, dtype=torch.float32)
        out = []
        for si in range(S - 1):
            pn = self.v_patch_nums[si]
            h = self.embedding(idx_list[si]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat = f_hat + self.phi(si)(F.interpolate(h, size=(H, H), mode="bicubic"))
            nxt = self.v_patch_nums[si + 1]
            out.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").view(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(out, dim=1)

    def next_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor):
        """One sampling step: add scale si's embedding to f_hat (in place) and return the next scale's input map."""
        S, H = len(self.v_patch_nums), self.v_patch_nums[-1]
        if si != S - 1:
            f_hat.add_(self.phi(si)(F.interpolate(h_BChw, size=(H, H), mode="bicubic")))
            nxt = self.v_patch_nums[si + 1]
            return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")
        f_hat.add_(self.phi(si)(h_BChw))
        return f_hat, f_hat


class VQVAE(nn.Module):
    def __init__(self, vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                 share_quant_resi=4, v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), quant_resi=0.5, beta=0.25,
                 using_sa=True, using_mid_sa=True):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, ch_mult=tuple(ch_mult),
                           num_res_blocks=num_res_blocks, share_quant_resi=share_quant_resi,
                           v_patch_nums=tuple(v_patch_nums), quant_resi=quant_resi, beta=beta,
                           using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.vocab_size, self.Cvae = vocab_size, z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.v_patch_nums = tuple(v_patch_nums)
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, v_patch_nums, share_quant_resi, quant_resi, beta)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    @property
    def image_size(self) -> int:
        return self.v_patch_nums[-1] * self.downsample

    def forward(self, img):  # training: img in [-1, 1] -> reconstruction, vq loss, indices
        f_hat, idx, vq_loss = self.quantize.quantize(self.quant_conv(self.encoder(img)))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, idx

    @torch.no_grad()
    def img_to_idx(self, img) -> List[torch.Tensor]:
        return self.quantize.quantize(self.quant_conv(self.encoder(img)))[1]

    def fhat_to_img(self, f_hat) -> torch.Tensor:  # [-1, 1]
        return self.decoder(self.post_quant_conv(f_hat)).clamp_(-1, 1)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        sd = dict(state_dict)
        buf = "quantize.ema_vocab_hit_SV"  # usage statistics depend on the scale count of training; never needed
        if buf in sd and sd[buf].shape != self.quantize.ema_vocab_hit_SV.shape:
            sd[buf] = self.quantize.ema_vocab_hit_SV
        return super().load_state_dict(sd, strict=strict, assign=assign)
