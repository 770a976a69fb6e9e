"""Multiply-accumulates (MACs) of a real generation, counted by fvcore, scale by scale, decoder separately.

    counter = ScaleFlopCounter(net)
    gen = generate(net, vqvae, labels, seed, sampling, scale_fn=counter, decode=False)
    images, decoder = count_decoder(vqvae, gen.images)          # gen.images is f_hat when decode=False
    counter.per_scale      # MACs per scale, summed over the batch (CFG rows included)

Each scale runs once, inside the jit tracer that fvcore analyses: the traced call IS the generation step (it
returns the real logits and appends to the KV caches exactly once), so a method's data-dependent path (which
experts, which tokens) is what gets counted. Only MACs are counted: matmul-like ops (linear, matmul, bmm,
convolutions, einsum, scaled-dot-product attention as QKᵀ + AV). Elementwise work (norms, activations, softmax,
upsampling) is not a MAC; those ops are listed in `uncounted` with how often they ran. Dynamic data-movement ops
(gather, index, sort, scatter, topk, embedding ...) are counted as 0 MACs and listed in `dynamic` — so nothing a
method does is silently dropped. These are the MACs of bench/analytic.py (METHODS.md §2).
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from math import prod
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from bench.sampling import Generation, generate

# data-movement ops whose cost is not multiply-accumulates; counted as 0 but recorded (how often they ran)
DYNAMIC_OPS = tuple(f"aten::{n}" for n in (
    "gather", "index", "index_select", "index_add", "index_add_", "index_put", "index_put_", "index_copy",
    "index_copy_", "index_fill", "index_fill_", "scatter", "scatter_", "scatter_add", "scatter_add_",
    "scatter_reduce", "scatter_reduce_", "sort", "argsort", "topk", "nonzero", "masked_select", "masked_scatter",
    "masked_scatter_", "take_along_dim", "embedding", "repeat_interleave", "bincount", "_unique2", "unique_dim",
    "searchsorted", "argmax", "argmin", "multinomial", "kthvalue"))


def _shape(v) -> Optional[List[int]]:
    return v.type().sizes() if v.isCompleteTensor() else None


def _out_numel(outputs) -> int:
    s = _shape(outputs[0])
    if s is None:
        raise ValueError("fvcore trace without the output shape of a matmul-like op")
    return prod(s)


def _matmul_macs(inputs, outputs) -> int:
    """matmul/mm/bmm: every output element is one dot product over the contracted dimension."""
    a = _shape(inputs[0])
    return _out_numel(outputs) * a[-1]


def _addmm_macs(inputs, outputs) -> int:
    """addmm/baddbmm(bias, a, b): the bias add is elementwise, the product is a matmul."""
    return _out_numel(outputs) * _shape(inputs[1])[-1]


def _linear_macs(inputs, outputs) -> int:
    return _out_numel(outputs) * _shape(inputs[1])[-1]  # weight (out, in)


def _conv_macs(inputs, outputs) -> int:
    """conv{1,2,3}d: each output element sums Cin/groups · prod(kernel) products (weight (Cout, Cin/g, k...))."""
    w = _shape(inputs[1])
    return _out_numel(outputs) * w[1] * prod(w[2:])


def _conv_transpose_macs(inputs, outputs) -> int:
    """conv_transpose: each input element is spread over Cout/groups · prod(kernel) outputs
    (weight (Cin, Cout/g, k...))."""
    w = _shape(inputs[1])
    return prod(_shape(inputs[0])) * w[1] * prod(w[2:])


def _convolution_macs(inputs, outputs) -> int:
    """convolution/_convolution(input, weight, bias, stride, padding, dilation, transposed, ...)."""
    transposed = bool(inputs[6].toIValue())
    return (_conv_transpose_macs if transposed else _conv_macs)(inputs, outputs)


def _sdpa_macs(inputs, outputs) -> int:
    """scaled_dot_product_attention(q (..,Lq,E), k (..,Lk,E), v (..,Lk,Ev)): QKᵀ is Lq·Lk·E, AV is Lq·Lk·Ev."""
    q, k, v = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2])
    rows = prod(torch.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2]), tuple(v[:-2])))
    return rows * q[-2] * k[-2] * (q[-1] + v[-1])


# CPU SDPA kernels that torch's FlopCounterMode has no formula for in some releases (2.14 counts them as 0)
_TORCH_SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math",
                   "_scaled_dot_product_fused_attention_overrideable")


def _torch_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per MAC) of one SDPA call from its shapes, as `_sdpa_macs` counts them."""
    rows = prod(torch.broadcast_shapes(tuple(query[:-2]), tuple(key[:-2]), tuple(value[:-2])))
    return 2 * rows * query[-2] * key[-2] * (query[-1] + value[-1])


def torch_flop_counter():
    """torch's dispatch-level FlopCounterMode with every SDPA kernel given the attention formula, so that it is an
    independent cross-check of fvcore and the analytic count on every torch release (FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {getattr(torch.ops.aten, n): _torch_sdpa_flops for n in _TORCH_SDPA_OPS if hasattr(torch.ops.aten, n)}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _fvcore():
    with warnings.catch_warnings():  # fvcore's import calls the deprecated torch.jit.script
        warnings.simplefilter("ignore")
        import fvcore.nn
        import fvcore.nn.jit_handles
    return fvcore.nn


def mac_handles() -> Dict[str, object]:
    einsum_flop_jit = _fvcore().jit_handles.einsum_flop_jit
    h = {f"aten::{n}": _matmul_macs for n in ("matmul", "mm", "bmm")}
    h.update({f"aten::{n}": _addmm_macs for n in ("addmm", "baddbmm", "addbmm")})
    h["aten::linear"] = _linear_macs
    h.update({f"aten::{n}": _conv_macs for n in ("conv1d", "conv2d", "conv3d")})
    h.update({f"aten::{n}": _conv_transpose_macs for n in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")})
    h.update({f"aten::{n}": _convolution_macs for n in ("_convolution", "convolution")})
    h["aten::einsum"] = einsum_flop_jit
    h["aten::scaled_dot_product_attention"] = _sdpa_macs
    return h


class _Call(nn.Module):
    """Wraps one call so that fvcore traces it; keeps the real output (the tracer runs forward exactly once)."""

    def __init__(self, fn, owner):
        super().__init__()
        if isinstance(owner, nn.Module):
            self.owner = owner  # registered: fvcore's module scopes cover the net's submodules
        self.fn, self.out, self.calls = fn, None, 0

    def forward(self, *tensors):
        self.calls += 1
        self.out = self.fn(*tensors)
        return self.out


@dataclass
class MacCount:
    macs: float
    by_operator: Dict[str, float]
    uncounted: Counter = field(default_factory=Counter)   # op -> occurrences (no MAC handler)
    dynamic: Counter = field(default_factory=Counter)     # op -> occurrences (data movement, 0 MACs)


def count_call(fn, owner, tensors) -> tuple:
    """Run fn(*tensors) once under fvcore's tracer; returns (real output, MacCount)."""
    FlopCountAnalysis = _fvcore().FlopCountAnalysis
    call = _Call(fn, owner)
    dynamic: Counter = Counter()

    def zero(kind):
        def handle(inputs, outputs):
            dynamic[kind] += 1
            return 0
        return handle

    fca = FlopCountAnalysis(call, tuple(tensors)).clear_op_handles()
    fca.set_op_handle(**mac_handles(), **{k: zero(k) for k in DYNAMIC_OPS})
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total = fca.total()
    if call.calls != 1:  # the contract of this module: the counted call is the generation step, run once
        raise RuntimeError(f"fvcore ran the traced call {call.calls} times; expected exactly once")
    by_op = {k: float(v) for k, v in fca.by_operator().items()}
    return call.out, MacCount(float(total), by_op, Counter(fca.unsupported_ops()), dynamic)


class ScaleFlopCounter:
    """A `scale_fn` for bench.sampling.generate that counts each scale's MACs while computing it."""

    def __init__(self, net):
        self.net = net
        self.per_scale: Dict[int, float] = {}
        self.by_operator: Dict[int, Dict[str, float]] = {}
        self.uncounted: Counter = Counter()
        self.dynamic: Counter = Counter()

    def __call__(self, si, x_in, label_B, caches):
        if x_in is None:
            fn, tensors = (lambda lab: self.net.scale_forward(si, None, lab, caches)), (label_B,)
        else:
            fn, tensors = (lambda x, lab: self.net.scale_forward(si, x, lab, caches)), (x_in, label_B)
        logits, c = count_call(fn, self.net, tensors)
        self.per_scale[si] = self.per_scale.get(si, 0.0) + c.macs
        ops = self.by_operator.setdefault(si, {})
        for k, v in c.by_operator.items():
            ops[k] = ops.get(k, 0.0) + v
        self.uncounted.update(c.uncounted)
        self.dynamic.update(c.dynamic)
        return logits

    def scale_list(self, num_scales: int) -> List[float]:
        return [self.per_scale.get(si, 0.0) for si in range(num_scales)]


def count_decoder(vqvae, f_hat: torch.Tensor):
    """Decode f_hat to images in [0, 1] (as generate does) while counting the decoder's MACs."""
    imgs, c = count_call(lambda f: vqvae.fhat_to_img(f), vqvae, (f_hat,))
    return imgs.add(1).mul_(0.5), c


@dataclass
class GenerationMacs:
    """MACs of one counted generation of `images` images (totals; divide by `images` for per image)."""
    images: int
    per_scale: List[float]
    decoder: float
    uncounted: Counter
    dynamic: Counter
    by_operator: Dict[int, Dict[str, float]]
    generation: object = None  # the bench.sampling.Generation produced while counting

    @property
    def transformer(self) -> float:
        return float(sum(self.per_scale))


@torch.no_grad()
def count_generation(net, vqvae, labels, seed, sampling, decoder: bool = True) -> GenerationMacs:
    """Generate one batch with every scale (and the decoder) counted by fvcore."""
    counter = ScaleFlopCounter(net)
    gen = generate(net, vqvae, labels, seed, sampling, scale_fn=counter, decode=False)
    dec, uncounted = 0.0, Counter(counter.uncounted)
    images = None
    if decoder:
        images, c = count_decoder(vqvae, gen.images)
        dec = c.macs
        uncounted.update({f"decoder:{k}": v for k, v in c.uncounted.items()})
    return GenerationMacs(images=int(gen.labels.shape[0]), per_scale=counter.scale_list(len(net.patch_nums)),
                          decoder=dec, uncounted=uncounted, dynamic=counter.dynamic,
                          by_operator=counter.by_operator,
                          generation=Generation(images=images, tokens=gen.tokens, labels=gen.labels))
