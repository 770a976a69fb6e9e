"""VAR transformer (Tian et al. 2024), state-dict compatible with the released `var_d{16,20,24,30}.pth`.

One file to hold in one's head:
  * `forward(label, x)`        teacher-forced pass over all scales with the block-causal mask (training).
  * `scale_forward(si, ...)`   one scale of generation with a KV cache (sampling; see bench/sampling.py).
Both run the same blocks. Efficiency methods swap `block.ffn` or wrap a block; every FFN receives the scale
index (None in the teacher-forced pass) so a replacement can act on chosen scales only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VARConfig:
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    vocab_size: int = 4096
    Cvae: int = 32
    num_classes: int = 1000
    patch_nums: Tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1

    @classmethod
    def official(cls, depth: int) -> "VARConfig":
        """The released builder: heads = depth, width = 64·depth."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        return d


class KVCache:
    """Keys/values of earlier scales for one block; `append` returns everything visible to the new queries."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    def append(self, k, v):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        return self.k, self.v


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = torch.log(torch.tensor(100.0, device="cpu")).item()  # float32 log, as released
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, attn_bias=None, cache: Optional[KVCache] = None):
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # B H L c
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act_name = act

    def act(self, h):
        return F.relu(h) if self.act_name == "relu" else F.gelu(h, approximate="tanh")

    def forward(self, x, si: Optional[int] = None):
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """Transformer block with adaptive LayerNorm conditioned on the class embedding."""

    def __init__(self, embed_dim, num_heads, mlp_ratio=4.0, norm_eps=1e-6, attn_l2_norm=True):
        super().__init__()
        self.C = embed_dim
        self.attn = SelfAttention(embed_dim, num_heads, attn_l2_norm)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 6 * embed_dim))

    def modulation(self, cond_BD):
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)  # g1, g2, s1, s2, sh1, sh2

    def forward(self, x, cond_BD, attn_bias=None, cache: Optional[KVCache] = None, si: Optional[int] = None):
        g1, g2, s1, s2, sh1, sh2 = self.modulation(cond_BD)
        x = x + self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(sh1), attn_bias, cache).mul_(g1)
        x = x + self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add_(sh2), si).mul(g2)
        return x


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C, norm_eps=1e-6):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        assert cfg.embed_dim % cfg.num_heads == 0, "embed_dim must be divisible by num_heads"
        self.cfg = cfg
        C, pns = cfg.embed_dim, tuple(cfg.patch_nums)
        self.C, self.V, self.Cvae, self.num_classes, self.patch_nums = C, cfg.vocab_size, cfg.Cvae, cfg.num_classes, pns
        self.L, self.first_l = sum(p * p for p in pns), pns[0] ** 2
        self.begin_ends, cur = [], 0
        for p in pns:
            self.begin_ends.append((cur, cur + p * p))
            cur += p * p

        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # the extra row is the unconditional label
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(pns), C)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, std=init_std)
        self.blocks = nn.ModuleList([AdaLNSelfAttn(C, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_l2_norm)
                                     for _ in range(cfg.depth)])
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pns)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", lvl.transpose(1, 2)[:, 0].contiguous())
        # token i sees token j iff level(i) >= level(j): causal across scales, bidirectional within one
        mask = torch.where(lvl >= lvl.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

    # ------------------------------------------------------------------ shared pieces
    def get_logits(self, h, cond_BD):
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def lvl_pos(self):
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def new_caches(self) -> List[KVCache]:
        return [KVCache() for _ in self.blocks]

    # ------------------------------------------------------------------ generation, one scale at a time
    def scale_forward(self, si: int, x_in: Optional[torch.Tensor], label_B: torch.Tensor, caches: List[KVCache]):
        """Logits (B, pn², V) of scale si. x_in: None at si=0, else the (B', pn², Cvae) map from the VQ-VAE,
        with B' = B, or B/2 under CFG (embedded once, then repeated, as released)."""
        cond_BD = self.class_emb(label_B)
        bg, ed = self.begin_ends[si]
        # level + position embedding of this scale's rows only (the whole L-row table was rebuilt at every scale)
        lvl_pos = self.lvl_embed.weight[si] + self.pos_1LC[:, bg:ed]
        if si == 0:
            B = label_B.shape[0]
            x = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1) \
                + lvl_pos
        else:
            x = self.word_embed(x_in) + lvl_pos
            if x.shape[0] != label_B.shape[0]:  # CFG: conditional and unconditional rows share the input map
                x = x.repeat(label_B.shape[0] // x.shape[0], 1, 1)
        for blk, cache in zip(self.blocks, caches):
            x = blk(x, cond_BD, None, cache, si)
        return self.get_logits(x, cond_BD)

    # ------------------------------------------------------------------ training
    def embed_teacher_forced(self, label_B, x_BLCv_wo_first_l):
        # Labels are dropped (cond_drop_rate) in training mode only. The release drops them in eval mode too, so its
        # teacher-forced loss on the same weights mixes in ~10% unconditional rows; every teacher-forced loss we
        # report (training val loss, fine-tune CE) is the purely conditional one.
        if self.training and self.cfg.cond_drop_rate > 0:  # classifier-free guidance needs unconditional rows
            drop = torch.rand(label_B.shape[0], device=label_B.device) < self.cfg.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        B = label_B.shape[0]
        cond_BD = self.class_emb(label_B)
        sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        x = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
        return x + (self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC), cond_BD

    def forward(self, label_B, x_BLCv_wo_first_l, return_hidden: bool = False):
        """Teacher-forced logits (B, L, V) for all scales at once."""
        x, cond_BD = self.embed_teacher_forced(label_B, x_BLCv_wo_first_l)
        hidden = []
        for blk in self.blocks:
            x = blk(x, cond_BD, self.attn_bias_for_masking, None, None)
            hidden.append(x)
        logits = self.get_logits(x, cond_BD)
        return (logits, hidden) if return_hidden else logits

    def forward_by_scale(self, label_B, x_BLCv_wo_first_l):
        """Teacher-forced logits computed scale by scale through the KV-cache path (the one methods change).

        Equal to `forward` for the dense model; methods that act on scales are trained through this path.
        """
        caches, out = self.new_caches(), []
        for si in range(len(self.patch_nums)):
            bg, ed = self.begin_ends[si]
            x_in = None if si == 0 else x_BLCv_wo_first_l[:, bg - self.first_l:ed - self.first_l]
            out.append(self.scale_forward(si, x_in, label_B, caches))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def init_weights(self, init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1.0):
        """The release's initialisation: truncated normal, head and adaLN gains scaled down."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for blk in self.blocks:
            blk.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
            blk.ffn.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
            blk.ada_lin[-1].weight[2 * self.C:].mul_(init_adaln)
            blk.ada_lin[-1].weight[:2 * self.C].mul_(init_adaln_gamma)
            blk.ada_lin[-1].bias.zero_()
        return self
