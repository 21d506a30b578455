"""Relax lowering of the int8 ops (ir/opset_quant.py), integer all the way to the requantization.

qconv2d / qlinear: (x - x_zp) and the weight widened to int32, conv2d / matmul with an int32
accumulator, + int32 bias, then the requantization in float32 in the reference's order
(float32(acc) * mult [+ float32(r - r_zp) * r_mult]), round half to even (TVM's round is LLVM's
nearbyint), + out_zp, clamp, uint8. The result is integer-exact against the reference kernels.

A dense or depthwise qconv2d, or a 2-d qlinear (as a 1x1 conv, batch along the width), with
constant weights is instead one call_tir to the int8 kernel of schedules/int8.py (weights packed for
the target's dot product, x_zp folded into the bias here; scheduled for the target, with vpdpbusd
on VNNI, vpmaddubsw on AVX2, sdot on Arm +dotprod, by schedule_module).
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from .lowering import LOWERING_CPU, LOWERING_DOT, LOWERINGS, _channel, constant_value, lowers
from .schedules import int8

R = relax.op


def _i32(v) -> relax.Constant:
    return relax.const(np.int32(v), "int32")


def _f32(v) -> relax.Constant:
    return relax.const(np.float32(v), "float32")


def _requantize(bb, y, a):
    if a.get("act") is not None:  # on real values, as the op's reference kernel computes it, then to output units
        y = bb.emit(LOWERINGS[a["act"]](bb, [y], {}, None))
        if a["out_dtype"] == "uint8":
            y = bb.emit(R.multiply(y, _f32(a["out_inv"])))
    if a["out_dtype"] == "uint8":
        q = bb.emit(R.add(R.round(y), _f32(a["out_zp"])))
        lo = 0 if a["lo"] is None else a["lo"]
        hi = 255 if a["hi"] is None else a["hi"]
        return R.astype(R.clip(q, float(lo), float(hi)), "uint8")
    if a["lo"] is None and a["hi"] is None:
        return y
    big = float(np.finfo(np.float32).max)
    return R.clip(y, -big if a["lo"] is None else float(a["lo"]), big if a["hi"] is None else float(a["hi"]))


def _centred(bb, x, zp):
    x32 = bb.emit(R.astype(x, "int32"))
    return bb.emit(R.subtract(x32, _i32(zp))) if zp else x32


def _consts(ins):
    """numpy weight, bias, multiplier of a qconv2d/qlinear, or None when they are not constants."""
    values = tuple(constant_value(v) for v in ins[1:4])
    return None if any(v is None for v in values) else values


def _x86_registers() -> int:
    """Vector registers of the x86 CPU being lowered for (its int8 register tiles), else 16."""
    cpu = LOWERING_CPU.get()
    return cpu.vector_registers if cpu is not None and cpu.arch == "x86_64" else 16


def _slow_int32_multiply() -> bool:
    """Is the CPU being lowered for slow at vector int32 multiplies (shave.isa)?"""
    cpu = LOWERING_CPU.get()
    return cpu is not None and cpu.slow_int32_multiply


def _kernel_call(bb, x, xs, w, bias, mult, a, stride, pad, dilation, residual=None, depthwise=False):
    """call_tir to the int8 conv kernel on NCHW uint8 `x` of shape xs, or None where it does not apply."""
    spec = int8.QConvSpec(
        *xs, int(w.shape[0]), int(w.shape[2]), int(w.shape[3]), stride, pad, dilation, int(a["x_zp"]),
        int(a["out_zp"]), a["out_dtype"], None if a["lo"] is None else float(a["lo"]),
        None if a["hi"] is None else float(a["hi"]), residual is not None,
        int(a.get("r_zp", 0)) if residual is not None else 0, float(a.get("r_mult", 0.0)) if residual is not None else 0.0,
        depthwise=depthwise, act=a.get("act"), out_inv=float(a.get("out_inv", 1.0)), regs=_x86_registers(),
        **int8.variant(w, depthwise, LOWERING_DOT.get(), _slow_int32_multiply()))
    if spec.oh < 1 or spec.ow < 1:
        return None
    try:
        b = int8.fold_bias(spec, w, bias)
    except ValueError:
        return None
    prim = int8.compute_primfunc(spec).with_attr("shave.qconv", spec.to_json())
    gv = bb.add_func(prim, "shave_qconv")
    args = [x, relax.const(int8.pack_weight(spec, w)), relax.const(b), relax.const(mult.astype(np.float32))]
    if residual is not None:
        args.append(residual)
    out = (spec.n, spec.oc, spec.oh, spec.ow)
    return relax.call_tir(gv, args, relax.TensorType(out, a["out_dtype"]))


def _qconv_kernel(bb, ins, a, node):
    consts = _consts(ins)
    if consts is None or not int8.supports(consts[0], a["groups"]):
        return None
    xs = tuple(int(d) for d in ins[0].ty.shape.values)
    pad = tuple(int(p) for p in a["padding"])
    return _kernel_call(bb, ins[0], xs, *consts, a, tuple(int(s) for s in a["stride"]),
                        pad * 2 if len(pad) == 2 else pad, tuple(int(d) for d in a["dilation"]),
                        ins[4] if len(ins) > 4 else None, a["groups"] > 1)


def _qlinear_kernel(bb, ins, a, node):
    """A 2-d qlinear as the int8 conv kernel: a 1x1 conv with the batch along the width."""
    consts = _consts(ins)
    xs = tuple(int(d) for d in ins[0].ty.shape.values)
    if consts is None or len(xs) != 2 or not int8.supports(consts[0][:, :, None, None], 1):
        return None
    (n, k), oc = xs, consts[0].shape[0]
    x = bb.emit(R.reshape(R.permute_dims(ins[0]), (1, k, 1, n)))
    call = _kernel_call(bb, x, (1, k, 1, n), consts[0][:, :, None, None], consts[1], consts[2], a, (1, 1),
                        (0, 0, 0, 0), (1, 1))
    if call is None:
        return None
    return R.permute_dims(R.reshape(bb.emit(call), (oc, n)))


@lowers("qconv2d")
def _qconv2d(bb, ins, a, node):
    call = _qconv_kernel(bb, ins, a, node)
    if call is not None:
        return call
    x = _centred(bb, ins[0], a["x_zp"])
    w = bb.emit(R.astype(ins[1], "int32"))
    acc = bb.emit(R.nn.conv2d(x, w, strides=a["stride"], padding=a["padding"], dilation=a["dilation"],
                              groups=a["groups"], out_dtype="int32"))
    acc = bb.emit(R.add(acc, _channel(ins[2], 4)))
    y = bb.emit(R.multiply(R.astype(acc, "float32"), _channel(ins[3], 4)))
    if len(ins) > 4:
        r = _centred(bb, ins[4], a.get("r_zp", 0))
        y = bb.emit(R.add(y, R.multiply(R.astype(r, "float32"), _f32(a["r_mult"]))))
    return _requantize(bb, y, a)


@lowers("qlinear")
def _qlinear(bb, ins, a, node):
    call = _qlinear_kernel(bb, ins, a, node)
    if call is not None:
        return call
    x = _centred(bb, ins[0], a["x_zp"])
    w = bb.emit(R.astype(ins[1], "int32"))
    acc = bb.emit(R.add(R.matmul(x, R.permute_dims(w), out_dtype="int32"), ins[2]))
    return _requantize(bb, bb.emit(R.multiply(R.astype(acc, "float32"), ins[3])), a)


@lowers("quantize")
def _quantize(bb, ins, a, node):
    q = bb.emit(R.add(R.round(R.divide(ins[0], _f32(a["scale"]))), _f32(a["zero_point"])))
    return R.astype(R.clip(q, 0.0, 255.0), "uint8")


@lowers("dequantize")
def _dequantize(bb, ins, a, node):
    return R.multiply(R.astype(_centred(bb, ins[0], a["zero_point"]), "float32"), _f32(a["scale"]))


@lowers("fake_quant")
def _fake_quant(bb, ins, a, node):
    s = _f32(a["scale"])
    q = bb.emit(R.clip(R.add(R.round(R.divide(ins[0], s)), _f32(a["zero_point"])), float(a["qmin"]), float(a["qmax"])))
    return R.multiply(R.subtract(q, _f32(a["zero_point"])), s)


@lowers("fake_quant_channel")
def _fake_quant_channel(bb, ins, a, node):
    nd = len(node.type.shape)
    s = _channel(ins[1], nd, 0)
    return R.multiply(R.clip(R.round(R.divide(ins[0], s)), -float(a["qmax"]), float(a["qmax"])), s)
