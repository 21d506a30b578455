"""Converters from aten ops (as torch.export and make_fx emit them) to IR ops.

Each converter gets the conversion context and the fx node, and returns the
IR value name the node's result maps to (a list of names for ops with several
results, such as split). Reshape-like ops take their static output shape from
the traced tensor metadata, which resolves -1 and symbolic sizes.
"""
from __future__ import annotations

import math

import operator

import numpy as np
import torch

aten = torch.ops.aten
CONVERTERS = {}


def converts(*targets):
    def deco(fn):
        for t in targets:
            CONVERTERS[t] = fn
        return fn

    return deco


def _pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(x) for x in (v * 2 if len(v) == 1 else v))


def _arg(node, i, name, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _axis(axis, ndim):
    return int(axis) % ndim if ndim else 0


# ------------------------------------------------------------------ identity
@converts(aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
          aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
          aten.lift_fresh_copy.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout)
def _identity(cx, n):
    src = n.args[0]
    if n.target in (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout):
        if n.meta["val"].dtype != src.meta["val"].dtype:
            cx.unsupported(n, "dtype conversion")
    if n.target in (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default):
        if _arg(n, 2, "train", False):
            cx.unsupported(n, "dropout in training mode")
    return cx.val(src)


@converts(operator.getitem)
def _getitem(cx, n):
    seq, idx = n.args
    return cx.values[seq][idx]


# --------------------------------------------------------------------- convs
def _conv(cx, n, x, w, b, stride, padding, dilation, groups, transposed=False, output_padding=(0, 0)):
    if len(n.args[0].meta["val"].shape) != 4:
        cx.unsupported(n, "only 2-d convolution (4-d input) is supported")
    ins = [cx.val(x), cx.val(w)] + ([cx.val(b)] if b is not None else [])
    if isinstance(padding, str):
        k = w.meta["val"].shape[2:]
        dil = _pair(dilation)
        total = [dil[i] * (k[i] - 1) for i in range(2)]
        if padding == "valid":
            padding = (0, 0)
        elif all(t % 2 == 0 for t in total):
            padding = (total[0] // 2, total[1] // 2)
        else:
            cx.unsupported(n, "padding='same' that needs asymmetric padding")
    if transposed:
        attrs = dict(stride=_pair(stride), padding=_pair(padding), output_padding=_pair(output_padding),
                     groups=int(groups), dilation=_pair(dilation))
        return cx.emit("conv_transpose2d", ins, attrs, n)
    attrs = dict(stride=_pair(stride), padding=_pair(padding), dilation=_pair(dilation), groups=int(groups))
    return cx.emit("conv2d", ins, attrs, n)


@converts(aten.conv2d.default, aten.conv2d.padding)
def _conv2d(cx, n):
    a = lambda i, k, d: _arg(n, i, k, d)  # noqa: E731
    return _conv(cx, n, n.args[0], n.args[1], a(2, "bias", None), a(3, "stride", 1), a(4, "padding", 0),
                 a(5, "dilation", 1), a(6, "groups", 1))


@converts(aten.conv_transpose2d.input)
def _conv_transpose2d(cx, n):
    a = lambda i, k, d: _arg(n, i, k, d)  # noqa: E731
    return _conv(cx, n, n.args[0], n.args[1], a(2, "bias", None), a(3, "stride", 1), a(4, "padding", 0),
                 a(7, "dilation", 1), a(6, "groups", 1), transposed=True, output_padding=a(5, "output_padding", 0))


@converts(aten.convolution.default)
def _convolution(cx, n):
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = n.args[:9]
    return _conv(cx, n, x, w, b, stride, padding, dilation, groups, transposed, output_padding)


@converts(aten.linear.default)
def _linear(cx, n):
    b = _arg(n, 2, "bias", None)
    return cx.emit("linear", [cx.val(n.args[0]), cx.val(n.args[1])] + ([cx.val(b)] if b is not None else []), {}, n)


# ------------------------------------------------------------- normalisation
def _bn(cx, n, x, w, b, mean, var, eps):
    c = x.meta["val"].shape[1]
    if mean is None or var is None:
        cx.unsupported(n, "batch_norm without running statistics (track_running_stats=False)")
    w = cx.val(w) if w is not None else cx.const(np.ones(c, np.float32), "bn_weight")
    b = cx.val(b) if b is not None else cx.const(np.zeros(c, np.float32), "bn_bias")
    return cx.emit("batch_norm", [cx.val(x), cx.val(mean), cx.val(var), w, b], {"eps": float(eps)}, n)


@converts(aten.batch_norm.default)
def _batch_norm(cx, n):
    x, w, b, mean, var, training, _momentum, eps = n.args[:8]
    if training:
        cx.unsupported(n, "batch_norm in training mode (call model.eval() first)")
    return _bn(cx, n, x, w, b, mean, var, eps)


@converts(aten._native_batch_norm_legit_no_training.default)
def _batch_norm_no_training(cx, n):
    x, w, b, mean, var, _momentum, eps = n.args[:7]
    return [_bn(cx, n, x, w, b, mean, var, eps), None, None]


def _ln(cx, n, x, shape, w, b, eps):
    shape = tuple(int(s) for s in shape)
    w = cx.val(w) if w is not None else cx.const(np.ones(shape, np.float32), "ln_weight")
    b = cx.val(b) if b is not None else cx.const(np.zeros(shape, np.float32), "ln_bias")
    return cx.emit("layer_norm", [cx.val(x), w, b], {"normalized_shape": shape, "eps": float(eps)}, n)


@converts(aten.layer_norm.default)
def _layer_norm(cx, n):
    return _ln(cx, n, n.args[0], n.args[1], _arg(n, 2, "weight"), _arg(n, 3, "bias"), _arg(n, 4, "eps", 1e-5))


@converts(aten.native_layer_norm.default)
def _native_layer_norm(cx, n):
    return [_ln(cx, n, *n.args[:5]), None, None]


# --------------------------------------------------------------- activations
def _unary(op):
    return lambda cx, n: cx.emit(op, [cx.val(n.args[0])], {}, n)


for _t, _op in [(aten.relu.default, "relu"), (aten.relu6.default, "relu6"),
                (aten.sigmoid.default, "sigmoid"), (aten.tanh.default, "tanh"),
                (aten.hardsigmoid.default, "hardsigmoid"), (aten.hardswish.default, "hardswish"),
                (aten.silu.default, "silu")]:
    CONVERTERS[_t] = _unary(_op)


@converts(aten.gelu.default)
def _gelu(cx, n):
    return cx.emit("gelu", [cx.val(n.args[0])], {"approximate": n.kwargs.get("approximate", "none")}, n)


@converts(aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
          aten.clamp_max.default)
def _clamp(cx, n):
    if n.target == aten.hardtanh.default:
        lo, hi = _arg(n, 1, "min_val", -1.0), _arg(n, 2, "max_val", 1.0)
    elif n.target == aten.clamp_min.default:
        lo, hi = n.args[1], None
    elif n.target == aten.clamp_max.default:
        lo, hi = None, n.args[1]
    else:
        lo, hi = _arg(n, 1, "min"), _arg(n, 2, "max")
    if lo == 0 and hi == 6:
        return cx.emit("relu6", [cx.val(n.args[0])], {}, n)
    if lo == 0 and hi is None:
        return cx.emit("relu", [cx.val(n.args[0])], {}, n)
    lo = -float("inf") if lo is None else float(lo)
    hi = float("inf") if hi is None else float(hi)
    return cx.emit("clamp", [cx.val(n.args[0])], {"min": lo, "max": hi}, n)


@converts(aten.leaky_relu.default)
def _leaky_relu(cx, n):
    return cx.emit("leaky_relu", [cx.val(n.args[0])], {"negative_slope": float(_arg(n, 1, "negative_slope", 0.01))}, n)


# ----------------------------------------------------------- resize and pad
@converts(aten.upsample_nearest2d.vec, aten.upsample_nearest2d.default,
          aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default)
def _upsample(cx, n):
    bilinear = n.target in (aten.upsample_bilinear2d.vec, aten.upsample_bilinear2d.default)
    size = tuple(int(d) for d in n.meta["val"].shape[2:])
    if n.target == aten.upsample_nearest2d.vec:
        scales = _arg(n, 2, "scale_factors")
    elif n.target == aten.upsample_bilinear2d.vec:
        scales = _arg(n, 3, "scale_factors")
    else:  # .default: (input, output_size, [align_corners,] scales_h, scales_w)
        first = 3 if bilinear else 2
        hw = (_arg(n, first, "scales_h"), _arg(n, first + 1, "scales_w"))
        scales = None if hw[0] is None or hw[1] is None else hw
    attrs = {"size": size, "mode": "bilinear" if bilinear else "nearest",
             "align_corners": bool(_arg(n, 2, "align_corners", False)) if bilinear else False,
             "scales": None if scales is None else tuple(float(s) for s in scales)}
    return cx.emit("resize", [cx.val(n.args[0])], attrs, n)


@converts(aten.pad.default, aten.constant_pad_nd.default, aten.reflection_pad2d.default,
          aten.replication_pad2d.default, aten.reflection_pad1d.default, aten.replication_pad1d.default)
def _pad(cx, n):
    pads = tuple(int(p) for p in n.args[1])
    if n.target == aten.pad.default:
        mode, value = _arg(n, 2, "mode", "constant"), _arg(n, 3, "value", None)
    elif n.target == aten.constant_pad_nd.default:
        mode, value = "constant", _arg(n, 2, "value", 0.0)
    else:
        mode, value = ("reflect" if "reflection" in str(n.target) else "replicate"), None
    if mode not in ("constant", "reflect", "replicate"):
        cx.unsupported(n, f"pad mode {mode!r}")
    return cx.emit("pad", [cx.val(n.args[0])], {"pads": pads, "mode": mode,
                                                "value": float(value or 0.0) if mode == "constant" else None}, n)


@converts(aten.channel_shuffle.default, aten.native_channel_shuffle.default)
def _channel_shuffle(cx, n):  # nn.ChannelShuffle
    return cx.emit("channel_shuffle", [cx.val(n.args[0])], {"groups": int(n.args[1])}, n)


@converts(aten.pixel_shuffle.default)
def _pixel_shuffle(cx, n):
    return cx.emit("pixel_shuffle", [cx.val(n.args[0])], {"upscale": int(n.args[1])}, n)


@converts(aten.amax.default, aten.amin.default)
def _amax_amin(cx, n):
    nd = len(n.args[0].meta["val"].shape)
    dims = _arg(n, 1, "dim", ())
    axes = tuple(sorted(_axis(d, nd) for d in dims)) if dims else tuple(range(nd))
    op = "amax" if n.target == aten.amax.default else "amin"
    return cx.emit(op, [cx.val(n.args[0])], {"axes": axes, "keepdim": bool(_arg(n, 2, "keepdim", False))}, n)


@converts(aten.softmax.int, aten._softmax.default)
def _softmax(cx, n):
    nd = len(n.args[0].meta["val"].shape)
    return cx.emit("softmax", [cx.val(n.args[0])], {"axis": _axis(n.args[1], nd)}, n)


# -------------------------------------------------------------------- binary
def _binary(op):
    def convert(cx, n):
        a, b = cx.val(n.args[0]), cx.val(n.args[1])
        alpha = n.kwargs.get("alpha", 1)
        if alpha != 1:
            b = cx.emit("mul", [b, cx.const(np.float32(alpha), "alpha")], {}, n, suffix="alpha")
        if n.kwargs.get("rounding_mode") is not None:
            cx.unsupported(n, "division with a rounding mode")
        return cx.emit(op, [a, b], {}, n)

    return convert


for _op, _ts in {
    "add": [aten.add.Tensor, aten.add.Scalar],
    "sub": [aten.sub.Tensor, aten.sub.Scalar],
    "mul": [aten.mul.Tensor, aten.mul.Scalar],
    "div": [aten.div.Tensor, aten.div.Scalar],
}.items():
    for _t in _ts:
        CONVERTERS[_t] = _binary(_op)


@converts(aten.neg.default)
def _neg(cx, n):
    return cx.emit("mul", [cx.val(n.args[0]), cx.const(np.float32(-1), "const")], {}, n)


# ------------------------------------------------------------------- pooling
@converts(aten.max_pool2d.default, aten.max_pool2d_with_indices.default)
def _max_pool2d(cx, n):
    k = _pair(n.args[1])
    stride = _arg(n, 2, "stride", None) or k
    attrs = dict(kernel=k, stride=_pair(stride), padding=_pair(_arg(n, 3, "padding", 0)),
                 dilation=_pair(_arg(n, 4, "dilation", 1)), ceil_mode=bool(_arg(n, 5, "ceil_mode", False)))
    out = cx.emit("max_pool2d", [cx.val(n.args[0])], attrs, n)
    return [out, None] if n.target == aten.max_pool2d_with_indices.default else out


@converts(aten.avg_pool2d.default)
def _avg_pool2d(cx, n):
    k = _pair(n.args[1])
    stride = _arg(n, 2, "stride", None) or k
    if _arg(n, 6, "divisor_override") is not None:
        cx.unsupported(n, "avg_pool2d with divisor_override")
    attrs = dict(kernel=k, stride=_pair(stride), padding=_pair(_arg(n, 3, "padding", 0)),
                 ceil_mode=bool(_arg(n, 4, "ceil_mode", False)),
                 count_include_pad=bool(_arg(n, 5, "count_include_pad", True)))
    return cx.emit("avg_pool2d", [cx.val(n.args[0])], attrs, n)


@converts(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def _adaptive_avg_pool2d(cx, n):
    size = tuple(int(s) for s in n.meta["val"].shape[-2:])
    return cx.emit("adaptive_avg_pool2d", [cx.val(n.args[0])], {"output_size": size}, n)


@converts(aten.adaptive_max_pool2d.default)
def _adaptive_max_pool2d(cx, n):
    size = tuple(int(s) for s in n.meta["val"][0].shape[-2:])
    return [cx.emit("adaptive_max_pool2d", [cx.val(n.args[0])], {"output_size": size}, n), None]


@converts(aten.mean.dim, aten.mean.default)
def _mean(cx, n):
    nd = len(n.args[0].meta["val"].shape)
    dims = _arg(n, 1, "dim", None) if n.target == aten.mean.dim else None
    dims = list(range(nd)) if not dims else [_axis(d, nd) for d in dims]
    keep = bool(_arg(n, 2, "keepdim", False)) if n.target == aten.mean.dim else False
    if n.kwargs.get("dtype") is not None:
        cx.unsupported(n, "mean with a dtype")
    return cx.emit("mean", [cx.val(n.args[0])], {"axes": tuple(dims), "keepdim": keep}, n)


# ------------------------------------------------------------- data movement
@converts(aten.cat.default, aten.concat.default)
def _cat(cx, n):
    tensors = n.args[0]
    nd = len(tensors[0].meta["val"].shape)
    return cx.emit("concat", [cx.val(t) for t in tensors], {"axis": _axis(_arg(n, 1, "dim", 0), nd)}, n)


@converts(aten.expand.default)
def _expand(cx, n):
    """Broadcasting size-1 axes (and adding leading ones) is tiling them: a repeat."""
    src = tuple(int(d) for d in n.args[0].meta["val"].shape)
    out = tuple(int(d) for d in n.meta["val"].shape)
    padded = (1,) * (len(out) - len(src)) + src
    if padded == out:
        return _reshape(cx, n)
    return cx.emit("repeat", [cx.val(n.args[0])], {"repeats": tuple(o // i for o, i in zip(out, padded))}, n)


@converts(aten.scaled_dot_product_attention.default)
def _attention(cx, n):
    q, k, v = n.args[:3]
    if _arg(n, 3, "attn_mask") is not None or _arg(n, 4, "dropout_p", 0.0) or _arg(n, 5, "is_causal", False):
        cx.unsupported(n, "scaled_dot_product_attention with a mask, dropout or is_causal")
    if len(q.meta["val"].shape) != 4:
        cx.unsupported(n, "scaled_dot_product_attention on inputs that are not [batch, heads, length, dim]")
    scale = _arg(n, 6, "scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(int(q.meta["val"].shape[-1]))
    return cx.emit("attention", [cx.val(q), cx.val(k), cx.val(v)], {"scale": scale}, n)


@converts(aten.repeat.default)
def _repeat(cx, n):
    return cx.emit("repeat", [cx.val(n.args[0])], {"repeats": tuple(int(r) for r in n.args[1])}, n)


def _slices(cx, n, x, axis, sizes):
    out, start = [], 0
    for i, s in enumerate(sizes):
        out.append(cx.emit("slice", [cx.val(x)], dict(axis=axis, start=start, end=start + s, step=1), n,
                           suffix=str(i)))
        start += s
    return out


@converts(aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default, aten.unsafe_split.Tensor)
def _split(cx, n):
    x = n.args[0]
    shape = x.meta["val"].shape
    axis = _axis(_arg(n, 2, "dim", 0), len(shape))
    sizes = [int(v.shape[axis]) for v in n.meta["val"]]
    return _slices(cx, n, x, axis, sizes)


@converts(aten.slice.Tensor, aten.narrow.default)
def _slice(cx, n):
    x = n.args[0]
    shape = x.meta["val"].shape
    axis = _axis(_arg(n, 1, "dim", 0), len(shape))
    size = int(shape[axis])
    if n.target == aten.narrow.default:
        start, length = int(n.args[2]), int(n.args[3])
        start, end, step = start % size if start < 0 else start, None, 1
        end = start + length
    else:
        start, end, step = _arg(n, 2, "start", None), _arg(n, 3, "end", None), _arg(n, 4, "step", 1)
        start, end, _ = slice(start, end).indices(size)
    if (start, end, step) == (0, size, 1):
        return cx.val(x)
    return cx.emit("slice", [cx.val(x)], dict(axis=axis, start=int(start), end=int(end), step=int(step)), n)


@converts(aten.select.int)
def _select(cx, n):
    x = n.args[0]
    shape = x.meta["val"].shape
    axis = _axis(n.args[1], len(shape))
    idx = int(n.args[2]) % int(shape[axis])
    s = cx.emit("slice", [cx.val(x)], dict(axis=axis, start=idx, end=idx + 1, step=1), n, suffix="slice")
    return cx.emit("reshape", [s], {"shape": tuple(int(d) for d in n.meta["val"].shape)}, n)


@converts(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
          aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unflatten.int)
def _reshape(cx, n):
    shape = tuple(int(d) for d in n.meta["val"].shape)
    if shape == tuple(int(d) for d in n.args[0].meta["val"].shape):
        return cx.val(n.args[0])
    return cx.emit("reshape", [cx.val(n.args[0])], {"shape": shape}, n)


@converts(aten.permute.default, aten.transpose.int, aten.t.default)
def _permute(cx, n):
    nd = len(n.args[0].meta["val"].shape)
    if n.target == aten.permute.default:
        dims = [_axis(d, nd) for d in n.args[1]]
    else:
        d0, d1 = (0, 1) if n.target == aten.t.default else (_axis(n.args[1], nd), _axis(n.args[2], nd))
        dims = list(range(nd))
        dims[d0], dims[d1] = dims[d1], dims[d0]
    if dims == list(range(nd)):
        return cx.val(n.args[0])
    return cx.emit("permute", [cx.val(n.args[0])], {"dims": tuple(dims)}, n)


# Ops that only assert metadata at trace time; they produce no value.
IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int} | (
    {torch.ops.aten._assert_scalar.default} if hasattr(aten, "_assert_scalar") else set()
)

