"""The built-in IR ops.

FLOPs count multiplies and adds separately (a multiply-accumulate is 2).
Shapes are static; attributes are plain Python values (ints, floats, tuples).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import IRError
from . import channels as ch
from .ops import register_op
from .types import TensorType


def _numel(t: TensorType) -> int:
    return math.prod(t.shape)


def _elementwise(per_element: int = 1):
    def flops(in_types, out, attrs):
        return per_element * _numel(out)

    return flops


# ------------------------------------------------------------------ conv-like
def _check_conv(ins, attrs):
    x, w = ins[0], ins[1]
    if x.ndim != 4 or w.ndim != 4:
        raise IRError(f"conv2d wants a 4-d input and weight, got {x} and {w}")
    g = attrs["groups"]
    if x.shape[1] != w.shape[1] * g:
        raise IRError(f"conv2d input has {x.shape[1]} channels but the weight {w} with groups={g} expects {w.shape[1] * g}")
    if w.shape[0] % g:
        raise IRError(f"conv2d has {w.shape[0]} filters, not divisible by groups={g}")
    if len(ins) > 2 and ins[2].shape != (w.shape[0],):
        raise IRError(f"conv2d bias {ins[2]} does not match {w.shape[0]} filters")


def _conv_flops(ins, out, attrs):
    w = ins[1]
    macs = _numel(out) * w.shape[1] * w.shape[2] * w.shape[3]
    return 2 * macs + (_numel(out) if len(ins) > 2 else 0)


register_op(
    "conv2d",
    lambda x, w, b=None, *, stride, padding, dilation, groups: F.conv2d(x, w, b, stride, padding, dilation, groups),
    flops=_conv_flops, check=_check_conv, num_inputs=(2, 3), attrs=("stride", "padding", "dilation", "groups"),
    channels=ch.conv2d, role="layer", weight=1, bias=2, out_axis=0, int8="qconv2d",
)


def _check_conv_t(ins, attrs):
    x, w = ins[0], ins[1]
    if x.ndim != 4 or w.ndim != 4 or x.shape[1] != w.shape[0]:
        raise IRError(f"conv_transpose2d input {x} does not match weight {w} (weight is in, out/groups, kh, kw)")


def _conv_t_flops(ins, out, attrs):
    x, w = ins[0], ins[1]
    macs = _numel(x) * w.shape[1] * w.shape[2] * w.shape[3]
    return 2 * macs + (_numel(out) if len(ins) > 2 else 0)


register_op(
    "conv_transpose2d",
    lambda x, w, b=None, *, stride, padding, output_padding, groups, dilation: F.conv_transpose2d(
        x, w, b, stride, padding, output_padding, groups, dilation
    ),
    flops=_conv_t_flops, check=_check_conv_t, num_inputs=(2, 3), channels=ch.conv_transpose2d,
    attrs=("stride", "padding", "output_padding", "groups", "dilation"), role="layer", weight=1, bias=2, out_axis=1,
)


def _check_linear(ins, attrs):
    x, w = ins[0], ins[1]
    if w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise IRError(f"linear input {x} does not match weight {w} (out_features, in_features)")
    if len(ins) > 2 and ins[2].shape != (w.shape[0],):
        raise IRError(f"linear bias {ins[2]} does not match {w.shape[0]} outputs")


register_op(
    "linear",
    lambda x, w, b=None: F.linear(x, w, b),
    flops=lambda ins, out, a: 2 * _numel(out) * ins[1].shape[1] + (_numel(out) if len(ins) > 2 else 0),
    check=_check_linear, num_inputs=(2, 3), channels=ch.linear, role="layer", weight=1, bias=2, out_axis=0,
    int8="qlinear",
)


# -------------------------------------------------------------- normalisation
def _check_bn(ins, attrs):
    x = ins[0]
    for role, t in zip(("mean", "var", "weight", "bias"), ins[1:]):
        if x.ndim < 2 or t.shape != (x.shape[1],):
            raise IRError(f"batch_norm {role} {t} does not match the {x.shape[1] if x.ndim > 1 else '?'} channels of {x}")


register_op(
    "batch_norm",  # inference form: (x - mean) / sqrt(var + eps) * weight + bias over axis 1
    lambda x, mean, var, w, b, *, eps: F.batch_norm(x, mean, var, w, b, False, 0.0, eps),
    flops=_elementwise(2), check=_check_bn, num_inputs=(5, 5), attrs=("eps",), channels=ch.batch_norm,
    role="norm", buffers=(1, 2),
)
register_op(
    "layer_norm",
    lambda x, w, b, *, normalized_shape, eps: F.layer_norm(x, normalized_shape, w, b, eps),
    flops=_elementwise(5), num_inputs=(3, 3), attrs=("normalized_shape", "eps"),
    channels=ch.layer_norm, role="norm",
)

# ---------------------------------------------------------------- activations
def _act(name, kernel, flops, epilogue=None, clip=None, attrs=()):
    register_op(name, kernel, flops=_elementwise(flops), attrs=attrs, channels=ch.elementwise, role="activation",
                epilogue=epilogue, clip=clip)


_act("relu", F.relu, 1, epilogue=lambda a: "relu", clip=lambda a: (0.0, None))
_act("relu6", F.relu6, 2, epilogue=lambda a: "clip:0.0:6.0", clip=lambda a: (0.0, 6.0))
_act("clamp", lambda x, *, min, max: torch.clamp(x, min, max), 2, attrs=("min", "max"),
     epilogue=lambda a: f"clip:{a['min']}:{a['max']}", clip=lambda a: (a["min"], a["max"]))
_act("sigmoid", torch.sigmoid, 4, epilogue=lambda a: "sigmoid")
# written as the conv kernels compute them (within an ulp of F.hardsigmoid / F.hardswish), so an
# int8 layer that fuses them matches its reference exactly
_act("hardsigmoid", lambda x: torch.clamp(x + 3.0, 0.0, 6.0) / 6.0, 3, epilogue=lambda a: "hardsigmoid")
_act("hardswish", lambda x: x * (torch.clamp(x + 3.0, 0.0, 6.0) / 6.0), 4, epilogue=lambda a: "hardswish")
_act("silu", F.silu, 5, epilogue=lambda a: "silu")
_act("tanh", torch.tanh, 4)
_act("gelu", lambda x, *, approximate="none": F.gelu(x, approximate=approximate), 8, attrs=("approximate",))
_act("leaky_relu", lambda x, *, negative_slope: F.leaky_relu(x, negative_slope), 2, attrs=("negative_slope",))
register_op("softmax", lambda x, *, axis: torch.softmax(x, axis), flops=_elementwise(5), attrs=("axis",),
            channels=ch.softmax, role="reduction")



def _check_attention(ins, attrs):
    q, k, v = ins
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] \
            or q.shape[3] != k.shape[3]:
        raise IRError(f"attention wants q, k, v as [batch, heads, length, dim] with matching sizes, got {q}, {k}, {v}")


def _attention_rule(in_types, out, attrs):
    """Heads and head dims are not pruned through attention: every axis frozen."""
    r = ch.ChannelRule()
    r.frozen += [(slot, axis) for slot, t in enumerate(in_types) for axis in range(t.ndim)]
    r.frozen += [(ch.OUT, axis) for axis in range(out.ndim)]
    return r


register_op(  # softmax(q k^T * scale) v over the last two axes (scaled dot-product attention, no mask)
    "attention", lambda q, k, v, *, scale: F.scaled_dot_product_attention(q, k, v, scale=scale),
    flops=lambda ins, out, a: 4 * math.prod(ins[0].shape) * ins[1].shape[2] + 5 * math.prod(ins[0].shape[:3]) * ins[1].shape[2],
    check=_check_attention, num_inputs=(3, 3), attrs=("scale",), channels=_attention_rule, role="reduction",
)

# ------------------------------------------------------- binary (broadcasting)
register_op("add", torch.add, flops=_elementwise(1), num_inputs=(2, 2), channels=ch.elementwise,
            role="elementwise")
register_op("sub", torch.sub, flops=_elementwise(1), num_inputs=(2, 2), channels=ch.elementwise,
            role="elementwise")
register_op("mul", torch.mul, flops=_elementwise(1), num_inputs=(2, 2), channels=ch.elementwise,
            role="elementwise")
register_op("div", torch.div, flops=_elementwise(1), num_inputs=(2, 2), channels=ch.elementwise,
            role="elementwise")

# -------------------------------------------------------------------- pooling
def _pool_flops(ins, out, attrs):
    k = attrs["kernel"]
    return _numel(out) * k[0] * k[1]


register_op(
    "max_pool2d",
    lambda x, *, kernel, stride, padding, dilation, ceil_mode: F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode),
    flops=_pool_flops, attrs=("kernel", "stride", "padding", "dilation", "ceil_mode"), channels=ch.leading(2),
    role="pool",
)
register_op(
    "avg_pool2d",
    lambda x, *, kernel, stride, padding, ceil_mode, count_include_pad: F.avg_pool2d(
        x, kernel, stride, padding, ceil_mode, count_include_pad
    ),
    flops=_pool_flops, attrs=("kernel", "stride", "padding", "ceil_mode", "count_include_pad"),
    channels=ch.leading(2), role="pool",
)
register_op(
    "adaptive_avg_pool2d",
    lambda x, *, output_size: F.adaptive_avg_pool2d(x, output_size),
    flops=lambda ins, out, a: _numel(ins[0]), attrs=("output_size",), channels=ch.leading(2), role="pool",
)
register_op(
    "adaptive_max_pool2d",
    lambda x, *, output_size: F.adaptive_max_pool2d(x, output_size),
    flops=lambda ins, out, a: _numel(ins[0]), attrs=("output_size",), channels=ch.leading(2), role="pool",
)
register_op(
    "mean",
    lambda x, *, axes, keepdim: torch.mean(x, axes, keepdim),
    flops=lambda ins, out, a: _numel(ins[0]), attrs=("axes", "keepdim"), channels=ch.mean, role="reduction",
)

# ------------------------------------------------------------- data movement
register_op("concat", lambda *xs, axis: torch.cat(xs, axis), num_inputs=(1, -1), attrs=("axis",),
            channels=ch.concat, role="movement")
register_op(
    "slice",
    lambda x, *, axis, start, end, step: x[(slice(None),) * axis + (slice(start, end, step),)],
    attrs=("axis", "start", "end", "step"), channels=ch.slice_, role="movement",
)
register_op("reshape", lambda x, *, shape: torch.reshape(x, shape), attrs=("shape",), channels=ch.reshape,
            role="movement")
register_op("repeat", lambda x, *, repeats: x.repeat(*repeats), attrs=("repeats",), channels=ch.repeat,
            role="movement")  # torch's repeat (numpy's tile): len(repeats) >= x.ndim
register_op("permute", lambda x, *, dims: torch.permute(x, dims), attrs=("dims",), channels=ch.permute,
            role="movement")
def _check_channel_permute(ins, a):
    x = ins[0]
    bad = [i for i in a["indices"] if not 0 <= int(i) < (x.shape[1] if x.ndim > 1 else 0)]
    if bad:
        raise IRError(f"channel_permute indices {bad[:4]} are outside the {x.shape[1] if x.ndim > 1 else 0} channels of {x}")


register_op(  # out[:, j] = x[:, indices[j]]: channel shuffle, and any channel reordering
    "channel_permute", lambda x, *, indices: x[:, list(indices)], attrs=("indices",), channels=ch.channel_permute,
    role="movement", check=_check_channel_permute,
)

from . import opset_rewrites  # noqa: E402,F401  (shift, channel_shuffle)

from . import opset_quant  # noqa: E402,F401  (int8 and fake-quant ops)

from . import opset_spatial  # noqa: E402,F401  (resize, pad, pixel_shuffle, amax, amin)
