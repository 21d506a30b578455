"""Lowerings of the float IR ops, with Relax's own operators, composed where Relax has no
direct equivalent (batch_norm, hardswish, ...). Batch norm is written out as its inference
formula, never as relax.op.nn.batch_norm, so batch statistics can never leak in."""
from __future__ import annotations

import numpy as np
from tvm import relax

from ...errors import CompileError
from .lowering import LOWERING_CPU, R, _channel, _f32, _shape, constant_value, lowers


@lowers("conv2d")
def _conv2d(bb, ins, a, node):
    y = bb.emit(R.nn.conv2d(ins[0], ins[1], strides=a["stride"], padding=a["padding"], dilation=a["dilation"],
                            groups=a["groups"]))
    return R.add(y, _channel(ins[2], 4)) if len(ins) > 2 else y


@lowers("conv_transpose2d")
def _conv_transpose2d(bb, ins, a, node):
    y = bb.emit(R.nn.conv2d_transpose(ins[0], ins[1], strides=a["stride"], padding=a["padding"],
                                      output_padding=a["output_padding"], dilation=a["dilation"], groups=a["groups"]))
    return R.add(y, _channel(ins[2], 4)) if len(ins) > 2 else y


@lowers("linear")
def _linear(bb, ins, a, node):
    return R.linear(ins[0], ins[1], ins[2] if len(ins) > 2 else None)


def batch_norm_affine(bb, mean, var, w, b, eps: float) -> tuple:
    """(scale, shift) per channel of an inference batch norm: x * scale + shift. Where the
    statistics and affine are constants (a model's parameters) both are computed here, in numpy
    with the same float32 steps, not left to FoldConstant (lowering.reshape)."""
    consts = [constant_value(e) for e in (mean, var, w, b)]
    if all(c is not None for c in consts):
        m, v, g, beta = (np.asarray(c, np.float32) for c in consts)
        scale = g * (np.float32(1) / np.sqrt(v + np.float32(eps)))
        return relax.const(scale), relax.const(beta - m * scale)
    scale = bb.emit(R.multiply(w, R.rsqrt(R.add(var, _f32(eps)))))
    return scale, bb.emit(R.subtract(b, R.multiply(mean, scale)))


@lowers("batch_norm")
def _batch_norm(bb, ins, a, node):
    nd = len(node.type.shape)
    scale, shift = batch_norm_affine(bb, *ins[1:], a["eps"])
    return R.add(R.multiply(ins[0], _channel(scale, nd)), _channel(shift, nd))


@lowers("layer_norm")
def _layer_norm(bb, ins, a, node):
    nd = len(node.type.shape)
    axes = list(range(nd - len(a["normalized_shape"]), nd))
    return R.nn.layer_norm(ins[0], ins[1], ins[2], axes, a["eps"])


lowers("relu")(lambda bb, ins, a, n: R.nn.relu(ins[0]))
lowers("relu6")(lambda bb, ins, a, n: R.clip(ins[0], 0.0, 6.0))
lowers("sigmoid")(lambda bb, ins, a, n: R.sigmoid(ins[0]))
lowers("tanh")(lambda bb, ins, a, n: R.tanh(ins[0]))
lowers("silu")(lambda bb, ins, a, n: R.nn.silu(ins[0]))
lowers("hardsigmoid")(lambda bb, ins, a, n: R.divide(R.clip(R.add(ins[0], _f32(3)), 0.0, 6.0), _f32(6)))
lowers("hardswish")(
    lambda bb, ins, a, n: R.multiply(ins[0], R.divide(R.clip(R.add(ins[0], _f32(3)), 0.0, 6.0), _f32(6))))
lowers("softmax")(lambda bb, ins, a, n: R.nn.softmax(ins[0], a["axis"]))


@lowers("attention")
def _attention(bb, ins, a, node):  # softmax(q k^T * scale) v on [batch, heads, length, dim]
    q, k, v = ins
    cpu = LOWERING_CPU.get()
    if cpu is None or cpu.fp32_lanes < 4:  # TVM's matmuls (GPU; or a CPU without SIMD)
        scores = R.multiply(R.matmul(q, R.permute_dims(k, [0, 1, 3, 2])), relax.const(a["scale"], "float32"))
        return R.matmul(R.nn.softmax(scores, -1), v)
    from .schedules import matmul

    (nb, heads, lq, d), lk = _shape(q), _shape(k)[2]
    bh, lanes = nb * heads, cpu.fp32_lanes
    lp = matmul.padded(lk, lanes)  # the scores' rows padded to whole vectors (-3.4e38: 0 after softmax)
    flat = lambda x, rows, cols: bb.emit(R.reshape(x, [bh, rows, cols]))  # noqa: E731
    scores = _kernel(bb, matmul.build_primfunc(bh, lq, lk, d, trans_b=True, scale=a["scale"], lanes=lanes,
                                               regs=cpu.vector_registers, pad_out=True),
                     f"shave_qk_{bh}x{lq}x{lk}x{d}_s{abs(hash(a['scale'])) % 10**6}", [flat(q, lq, d), flat(k, lk, d)],
                     (bh, lq, lp))
    probs = _kernel(bb, matmul.softmax_primfunc(bh * lq, lp, lanes), f"shave_softmax_{bh * lq}x{lp}",
                    [bb.emit(R.reshape(scores, [bh * lq, lp]))], (bh * lq, lp))
    out = _kernel(bb, matmul.build_primfunc(bh, lq, d, lp, trans_b=False, scale=1.0, lanes=lanes,
                                            regs=cpu.vector_registers, k_valid=lk),
                  f"shave_pv_{bh}x{lq}x{d}x{lk}", [flat(probs, lq, lp), flat(v, lk, d)], (bh, lq, d))
    return R.reshape(out, [nb, heads, lq, d])


def add_opaque(bb, func, name: str):
    """Add shave's scheduled PrimFunc `func` to the module as `name`, opaque to FuseOps (fused with
    its neighbours, TVM 0.27's FuseTIR fails on some, e.g. "Inconsistent buffers T_concat and X
    mapped to the same relax var"); the builder returns the GlobalVar of an identical function
    already there."""
    return bb.add_func(func.with_attr("op_pattern", 8).with_attr("global_symbol", name), name)


def _kernel(bb, func, name: str, args: list, shape):
    """call_tir of a scheduled PrimFunc, added to the module once per name."""
    gv = add_opaque(bb, func, name)
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(shape, "float32")))
lowers("add")(lambda bb, ins, a, n: R.add(ins[0], ins[1]))
lowers("sub")(lambda bb, ins, a, n: R.subtract(ins[0], ins[1]))
lowers("mul")(lambda bb, ins, a, n: R.multiply(ins[0], ins[1]))
lowers("div")(lambda bb, ins, a, n: R.divide(ins[0], ins[1]))


@lowers("gelu")
def _gelu(bb, ins, a, node):
    return R.nn.gelu_tanh(ins[0]) if a["approximate"] == "tanh" else R.nn.gelu(ins[0])


@lowers("clamp")
def _clamp(bb, ins, a, node):
    lo, hi = a["min"], a["max"]
    big = float(np.finfo(np.float32).max)
    return R.clip(ins[0], max(lo, -big), min(hi, big))


lowers("leaky_relu")(lambda bb, ins, a, n: R.nn.leakyrelu(ins[0], a["negative_slope"]))


@lowers("resize")
def _resize(bb, ins, a, node):
    in_hw, out_hw = _shape(ins[0])[2:], tuple(a["size"])
    if a["scales"] is not None and any(abs(1.0 / s - i / o) > 1e-9 for s, i, o in zip(a["scales"], in_hw, out_hw)):
        # PyTorch maps output pixels through 1 / scale, TVM through in / out: equal only when out = in * scale
        raise CompileError(f"node {node.name!r}: resize by scale factor {a['scales']} from {in_hw} to {out_hw} "
                           "(not in * scale) has no TVM lowering; give interpolate a size= instead")
    if a["mode"] == "nearest":  # torch: src = floor(dst * in / out)
        return R.image.resize2d(ins[0], out_hw, layout="NCHW", method="nearest_neighbor",
                                coordinate_transformation_mode="asymmetric", rounding_method="floor")
    return R.image.resize2d(ins[0], out_hw, layout="NCHW", method="linear",
                            coordinate_transformation_mode="align_corners" if a["align_corners"] else "half_pixel")


@lowers("pad")
def _pad(bb, ins, a, node):
    """F.pad order (last axis first) to Relax's per-axis (before, after); negative constant pads crop."""
    shape = _shape(ins[0])
    nd, pads = len(shape), list(a["pads"])
    width = [0] * (2 * nd)
    for i in range(0, len(pads), 2):
        axis = nd - 1 - i // 2
        width[2 * axis], width[2 * axis + 1] = pads[i], pads[i + 1]
    x = ins[0]
    if any(w > 0 for w in width):
        mode = {"constant": "constant", "reflect": "reflect", "replicate": "replicate"}[a["mode"]]
        x = bb.emit(R.nn.pad(x, [max(w, 0) for w in width], mode, a["value"] or 0.0))
    crop = [(axis, -width[2 * axis], width[2 * axis + 1]) for axis in range(nd)
            if width[2 * axis] < 0 or width[2 * axis + 1] < 0]
    if crop:
        padded = _shape(x)
        x = R.strided_slice(x, [c[0] for c in crop], [max(c[1], 0) for c in crop],
                            [padded[c[0]] + min(c[2], 0) for c in crop])
    return x


@lowers("pixel_shuffle")
def _pixel_shuffle(bb, ins, a, node):
    n, c, h, w = _shape(ins[0])
    r = a["upscale"]
    x = bb.emit(R.reshape(ins[0], (n, c // (r * r), r, r, h, w)))
    x = bb.emit(R.permute_dims(x, [0, 1, 4, 2, 5, 3]))
    return R.reshape(x, (n, c // (r * r), h * r, w * r))


lowers("amax")(lambda bb, ins, a, n: R.max(ins[0], list(a["axes"]), a["keepdim"]))
lowers("amin")(lambda bb, ins, a, n: R.min(ins[0], list(a["axes"]), a["keepdim"]))


def pool_padding(node, in_shape, a):
    """Padding (top, left, bottom, right) that makes TVM's floor-mode window count
    equal torch's output size. torch's ceil_mode drops a last window that would
    start in the right padding, so it cannot be passed through as is."""
    out_h, out_w = node.type.shape[2:]
    pad = list(a["padding"]) * 2
    for i, (n_in, n_out) in enumerate(zip(in_shape[2:], (out_h, out_w))):
        k, s, p = a["kernel"][i], a["stride"][i], a["padding"][i]
        d = a.get("dilation", (1, 1))[i]
        need = (n_out - 1) * s + d * (k - 1) + 1  # extent the windows cover
        pad[2 + i] = max(p, need - n_in - p)
    return pad


@lowers("max_pool2d")
def _max_pool2d(bb, ins, a, node):
    pad = pool_padding(node, _shape(ins[0]), a)
    return R.nn.max_pool2d(ins[0], a["kernel"], a["stride"], pad, a["dilation"], ceil_mode=False)


@lowers("avg_pool2d")
def _avg_pool2d(bb, ins, a, node):
    in_shape = _shape(ins[0])
    pad = pool_padding(node, in_shape, a)
    extra = [pad[2] - a["padding"][0], pad[3] - a["padding"][1]]
    if a["count_include_pad"] and any(extra):
        # torch divides by the window clipped to the *declared* padding; spell it out
        return _avg_pool_explicit(bb, ins[0], in_shape, a, node)
    return R.nn.avg_pool2d(ins[0], a["kernel"], a["stride"], pad, (1, 1), ceil_mode=False,
                           count_include_pad=a["count_include_pad"])


def _avg_pool_explicit(bb, x, in_shape, a, node):
    """Sum pooling over zero padding, divided by torch's per-window divisor (a constant)."""
    out_h, out_w = node.type.shape[2:]
    pad = pool_padding(node, in_shape, a)
    k, s, p = a["kernel"], a["stride"], a["padding"]
    summed = bb.emit(R.multiply(R.nn.avg_pool2d(x, k, s, pad, (1, 1), count_include_pad=True), _f32(k[0] * k[1])))
    div = np.empty((out_h, out_w), np.float32)
    for i in range(out_h):
        h0 = i * s[0] - p[0]
        h1 = min(h0 + k[0], in_shape[2] + p[0])
        for j in range(out_w):
            w0 = j * s[1] - p[1]
            w1 = min(w0 + k[1], in_shape[3] + p[1])
            div[i, j] = (h1 - h0) * (w1 - w0)
    return R.divide(summed, relax.const(div))


@lowers("adaptive_avg_pool2d")
def _adaptive_avg_pool2d(bb, ins, a, node):
    return R.nn.adaptive_avg_pool2d(ins[0], a["output_size"])


@lowers("adaptive_max_pool2d")
def _adaptive_max_pool2d(bb, ins, a, node):
    h, w = _shape(ins[0])[2:]
    oh, ow = a["output_size"]
    if h % oh or w % ow:
        raise CompileError(f"node {node.name!r}: adaptive_max_pool2d from {h}x{w} to {oh}x{ow} (not a divisor) "
                           "has no TVM lowering")
    return R.nn.max_pool2d(ins[0], (h // oh, w // ow), (h // oh, w // ow))


@lowers("mean")
def _mean(bb, ins, a, node):
    return R.mean(ins[0], list(a["axes"]), a["keepdim"])


@lowers("concat")
def _concat(bb, ins, a, node):
    return R.concat(list(ins), a["axis"])


@lowers("slice")
def _slice(bb, ins, a, node):
    return R.strided_slice(ins[0], [a["axis"]], [a["start"]], [a["end"]], [a["step"]])


lowers("reshape")(lambda bb, ins, a, n: R.reshape(ins[0], a["shape"]))
lowers("permute")(lambda bb, ins, a, n: R.permute_dims(ins[0], list(a["dims"])))
lowers("repeat")(lambda bb, ins, a, n: R.tile(ins[0], list(a["repeats"])))


def interleaved_runs(indices, max_runs: int = 8) -> list[int] | None:
    """The starts of g runs of m consecutive channels whose interleaving the gather `indices` is
    (indices[i * g + r] = starts[r] + i), with the fewest runs (at most max_runs), or None.
    A shuffle is one; a slice of a shuffle (ShuffleNet's split after its shuffle) is another."""
    idx = np.asarray(indices, dtype=np.int64)
    for g in range(1, min(max_runs, len(idx)) + 1):
        if len(idx) % g:
            continue
        cols = idx.reshape(-1, g)
        if (cols - cols[0] == np.arange(len(cols))[:, None]).all():
            return [int(v) for v in cols[0]]
    return None


@lowers("channel_permute")
def _channel_permute(bb, ins, a, node):
    """A gather of interleaved runs is slices, a concat and a reshape -> transpose -> reshape:
    injective ops FuseOps fuses into their consumer (a concat, the next gather). Any other index
    list is a take (mode "clip": the indices are constants inside the axis, as verify checks, and
    TVM's default "fast" mode prints an out-of-bounds warning at every compile); a take with a
    constant index tensor is not fused with its consumer."""
    x, indices, shape = ins[0], a["indices"], _shape(ins[0])
    starts = interleaved_runs(indices) if len(shape) >= 2 else None
    if starts is None:
        return R.take(x, relax.const(np.asarray(indices, dtype="int64")), axis=1, mode="clip")
    g, m = len(starts), len(indices) // len(starts)
    parts = [R.strided_slice(x, [1], [s], [s + m]) for s in starts]
    if g == 1:
        return parts[0]
    y = bb.emit(R.concat([bb.emit(p) for p in parts], 1))
    y = bb.emit(R.reshape(y, (shape[0], g, m) + shape[2:]))
    y = bb.emit(R.permute_dims(y, [0, 2, 1] + list(range(3, len(shape) + 1))))
    return R.reshape(y, (shape[0], g * m) + shape[2:])


SHIFT_KERNEL = "shave_shift"  # a shift read by one conv is folded into that conv's input packing (schedules/fusion.py)


def shift_primfunc(n: int, c: int, h: int, w: int, dtype: str):
    """out[b, ch, y, x] = X[b, ch, y - DY[ch], x - DX[ch]] (0 outside X); DY, DX are int32 [c]."""
    from tvm import te, tirx

    X = te.placeholder((n, c, h, w), dtype, name="X")
    DY = te.placeholder((c,), "int32", name="DY")
    DX = te.placeholder((c,), "int32", name="DX")

    def fn(b, ch, y, x):
        iy, ix = y - DY[ch], x - DX[ch]
        ok = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        val = X[b, ch, tirx.max(tirx.min(iy, h - 1), 0), tirx.max(tirx.min(ix, w - 1), 0)]
        return tirx.if_then_else(ok, val, tirx.const(0, dtype))

    return te.create_prim_func([X, DY, DX, te.compute((n, c, h, w), fn, name="shift")])


@lowers("shift")
def _shift(bb, ins, a, node):
    n, c, h, w = _shape(ins[0])
    dtype = node.type.dtype
    name = f"{SHIFT_KERNEL}_{n}x{c}x{h}x{w}"  # one kernel per shape (add_func reuses an equal one)
    gv = bb.add_func(shift_primfunc(n, c, h, w, dtype).with_attr("global_symbol", name), name)
    dy, dx = (relax.const(np.asarray([s[k] for s in a["shifts"]], dtype="int32")) for k in (0, 1))
    return relax.call_tir(gv, [ins[0], dy, dx], relax.TensorType((n, c, h, w), dtype))


@lowers("channel_shuffle")
def _channel_shuffle(bb, ins, a, node):
    shape, g = _shape(ins[0]), a["groups"]
    split = bb.emit(R.reshape(ins[0], (shape[0], g, shape[1] // g) + shape[2:]))
    swapped = bb.emit(R.permute_dims(split, [0, 2, 1] + list(range(3, len(shape) + 1))))
    return R.reshape(swapped, shape)
