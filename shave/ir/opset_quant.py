"""Quantized IR ops: int8 conv/linear with int32 accumulation, and the boundaries.

Activations are per-tensor asymmetric uint8 (`q = clamp(round(x / scale) + zp, 0, 255)`),
weights per-output-channel symmetric int8 (zero point 0). A quantized layer

    acc = sum((x_q - x_zp) * w_q) + bias_q                     exact int32
    y   = float32(acc) * mult[c]  [+ float32(r_q - r_zp) * r_mult]   float32, in this order
    out = clamp(round_half_even(y) + out_zp, lo, hi) as uint8   (out_dtype "uint8")
        = clamp(y, lo, hi)                                     (out_dtype "float32": dequantized)

`mult[c]` is x_scale * w_scale[c] / out_scale (or without the division for a float output),
`bias_q = round(bias / (x_scale * w_scale[c]))`, and lo/hi carry a fused relu/relu6 (in the
output's own units, None = no bound).

A fused activation that is not a clamp (`act`: any activation op with an `epilogue` trait and
no `clip` one, see `float_acts()`: hardswish, hardsigmoid, sigmoid, silu) needs real values:
then `mult[c]` is x_scale * w_scale[c] (and r_mult the residual's scale), the op's own kernel
runs on y, and a uint8 output is `clamp(round_half_even(act(y) * out_inv) + out_zp, 0, 255)`
with out_inv = 1 / out_scale. hardswish and hardsigmoid are written as the conv kernels compute
them (y * (clamp(y + 3, 0, 6) / 6)), so backends match the reference exactly; sigmoid and silu
use each backend's own exp, so an output code may differ by one. The reference kernels compute the accumulation in
float64, where every integer sum of these sizes is exact, so they are integer-exact; the
requantization is spelled out in float32 in the order above, which backends follow too.

`fake_quant` / `fake_quant_channel` are the simulation ops (quantize then dequantize in float,
with a straight-through gradient), used for accuracy evaluation and quantization-aware training.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import IRError
from . import channels as ch
from .ops import _REGISTRY, get_op, register_op


def _numel(t) -> int:
    return math.prod(t.shape)


def _round(y: torch.Tensor) -> torch.Tensor:
    return torch.round(y)  # half to even, like the backends' nearbyint


def float_acts() -> frozenset[str]:
    """The activations a quantized layer computes in float on real values (module docstring)."""
    return frozenset(n for n, op in _REGISTRY.items() if op.epilogue is not None and op.clip is None)


def requantize(y: torch.Tensor, out_zp: int, out_dtype: str, lo, hi, act=None, out_inv=1.0) -> torch.Tensor:
    """float32 y -> the layer's output (uint8 codes or float32), as the module docstring says."""
    if act is not None:
        y = get_op(act).kernel(y)
        if out_dtype == "uint8":
            y = y * torch.tensor(out_inv, dtype=torch.float32)
    if out_dtype == "uint8":
        q = _round(y) + out_zp
        return torch.clamp(q, 0 if lo is None else lo, 255 if hi is None else hi).to(torch.uint8)
    if lo is not None or hi is not None:
        y = torch.clamp(y, lo, hi)
    return y


def _check_q(ins, attrs, op):
    x, w = ins[0], ins[1]
    if x.dtype != "uint8":
        raise IRError(f"{op} wants a uint8 input, got {x}")
    if w.dtype != "int8":
        raise IRError(f"{op} wants an int8 weight, got {w}")
    if ins[2].dtype != "int32" or ins[2].shape != (w.shape[0],):
        raise IRError(f"{op} bias {ins[2]} must be int32[{w.shape[0]}]")
    if ins[3].dtype != "float32" or ins[3].shape != (w.shape[0],):
        raise IRError(f"{op} multiplier {ins[3]} must be float32[{w.shape[0]}]")
    if attrs["out_dtype"] not in ("uint8", "float32"):
        raise IRError(f"{op} out_dtype must be 'uint8' or 'float32', got {attrs['out_dtype']!r}")
    if attrs.get("act") is not None and attrs["act"] not in float_acts():
        raise IRError(f"{op} act must be one of {', '.join(sorted(float_acts()))} or None, got {attrs['act']!r}")


def _check_qconv(ins, attrs):
    _check_q(ins, attrs, "qconv2d")
    x, w = ins[0], ins[1]
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[1] * attrs["groups"]:
        raise IRError(f"qconv2d input {x} does not match weight {w} with groups={attrs['groups']}")
    if len(ins) > 4 and ins[4].dtype != "uint8":
        raise IRError(f"qconv2d residual {ins[4]} must be uint8")


def _qconv(x, w, b, m, r=None, *, stride, padding, dilation, groups, x_zp, out_zp, out_dtype, lo, hi,
           r_zp=0, r_mult=0.0, act=None, out_inv=1.0):
    acc = F.conv2d(x.double() - x_zp, w.double(), b.double(), stride, padding, dilation, groups)
    y = acc.float() * m.reshape(1, -1, 1, 1)
    if r is not None:
        y = y + (r.to(torch.int32) - r_zp).float() * torch.tensor(r_mult, dtype=torch.float32)
    return requantize(y, out_zp, out_dtype, lo, hi, act, out_inv)


def _qconv_flops(ins, out, attrs):
    w = ins[1]
    return 2 * _numel(out) * w.shape[1] * w.shape[2] * w.shape[3] + 3 * _numel(out)


def _qconv_channels(ins, out, attrs):
    r = ch.conv2d(ins[:3], out, attrs)
    r.same((3, 0), (ch.OUT, 1), ins[1].shape[0])
    if len(ins) > 4:
        r.same((4, 1), (ch.OUT, 1), ins[1].shape[0])
    return r


register_op(
    "qconv2d", _qconv, flops=_qconv_flops, check=_check_qconv, num_inputs=(4, 5), channels=_qconv_channels,
    attrs=("stride", "padding", "dilation", "groups", "x_zp", "out_zp", "out_dtype", "lo", "hi"), role="quant",
    buffers=(3,),  # the per-channel requantisation multipliers
)


def _check_qlinear(ins, attrs):
    _check_q(ins, attrs, "qlinear")
    if ins[1].ndim != 2 or ins[0].shape[-1] != ins[1].shape[1]:
        raise IRError(f"qlinear input {ins[0]} does not match weight {ins[1]}")


def _qlinear(x, w, b, m, *, x_zp, out_zp, out_dtype, lo, hi, act=None, out_inv=1.0):
    acc = F.linear(x.double() - x_zp, w.double(), b.double())
    return requantize(acc.float() * m, out_zp, out_dtype, lo, hi, act, out_inv)


def _qlinear_channels(ins, out, attrs):
    r = ch.linear(ins[:3], out, attrs)
    r.same((3, 0), (ch.OUT, out.ndim - 1), ins[1].shape[0])
    return r


register_op(
    "qlinear", _qlinear, check=_check_qlinear, num_inputs=(4, 4), channels=_qlinear_channels,
    flops=lambda ins, out, a: 2 * _numel(out) * ins[1].shape[1] + 3 * _numel(out),
    attrs=("x_zp", "out_zp", "out_dtype", "lo", "hi"), role="quant", buffers=(3,),
)


# ---------------------------------------------------------------- boundaries
def _check_float(ins, attrs):
    if ins[0].dtype != "float32":
        raise IRError(f"quantize wants a float32 input, got {ins[0]}")


def _quantize(x, *, scale, zero_point):
    q = _round(x / torch.tensor(scale, dtype=torch.float32)) + zero_point
    return torch.clamp(q, 0, 255).to(torch.uint8)


def _dequantize(q, *, scale, zero_point):
    return (q.to(torch.int32) - zero_point).float() * torch.tensor(scale, dtype=torch.float32)


def _check_u8(ins, attrs):
    if ins[0].dtype != "uint8":
        raise IRError(f"dequantize wants a uint8 input, got {ins[0]}")


register_op("quantize", _quantize, flops=lambda ins, out, a: 3 * _numel(out), check=_check_float,
            attrs=("scale", "zero_point"), channels=ch.elementwise, role="quant")
register_op("dequantize", _dequantize, flops=lambda ins, out, a: 2 * _numel(out), check=_check_u8,
            attrs=("scale", "zero_point"), channels=ch.elementwise, role="quant")


# ---------------------------------------------------------------- simulation
def _ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q in the forward pass, identity gradient in the backward pass (straight-through estimator)."""
    return x + (q - x).detach()


def _fake_quant(x, *, scale, zero_point, qmin, qmax):
    s = torch.tensor(scale, dtype=x.dtype)
    q = (torch.clamp(_round(x / s) + zero_point, qmin, qmax) - zero_point) * s
    return _ste(x, q)


def _fake_quant_channel(w, scales, *, qmax):
    s = scales.detach().reshape(-1, *([1] * (w.ndim - 1)))
    q = torch.clamp(_round(w / s), -qmax, qmax) * s
    return _ste(w, q)


def _check_fq_channel(ins, attrs):
    if ins[1].shape != (ins[0].shape[0],):
        raise IRError(f"fake_quant_channel scales {ins[1]} do not match the {ins[0].shape[0]} channels of {ins[0]}")


def _fq_channel_channels(ins, out, attrs):
    r = ch.elementwise(ins[:1], out, attrs)
    r.same((1, 0), (ch.OUT, 0), ins[0].shape[0])
    return r


register_op("fake_quant", _fake_quant, flops=lambda ins, out, a: 4 * _numel(out),
            attrs=("scale", "zero_point", "qmin", "qmax"), channels=ch.elementwise,
            role="quant")
register_op("fake_quant_channel", _fake_quant_channel, flops=lambda ins, out, a: 3 * _numel(out),
            check=_check_fq_channel, num_inputs=(2, 2), attrs=("qmax",), channels=_fq_channel_channels,
            role="quant")
