"""TVM's lowering of Relax ops to TIR, constant folding and operator fusion: what every
target's default schedules start from (within a target scope).

relu and clip are legalized here as selects instead of TOPI's max/min: max(NaN, 0) is 0 in
TVM's code, while PyTorch's relu, relu6, clamp and hardswish keep a NaN a NaN. A select on
`x < lo` is false for NaN, so the NaN passes through, at no cost (LLVM emits the same
vmaxps/vminps with the operands in the NaN-keeping order)."""
from __future__ import annotations

import tvm
from tvm import relax


def nan_keeping_clip(x, lo=None, hi=None, dtype="float32"):
    """TIR: x (of `dtype`) clamped to [lo, hi] (either may be None), a NaN x left NaN."""
    from tvm import tirx

    if lo is not None:
        x = tirx.Select(x < tirx.const(lo, dtype), tirx.const(lo, dtype), x)
    if hi is not None:
        x = tirx.Select(x > tirx.const(hi, dtype), tirx.const(hi, dtype), x)
    return x


def _legalize_clip(bb, call):
    """relax.nn.relu / relax.clip on floats as nan_keeping_clip; integers as TOPI does."""
    from tvm import te

    x = call.args[0]
    if "float" not in str(x.ty.dtype):  # integers have no NaN
        return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)
    lo, hi = (0.0, None) if call.op.name == "relax.nn.relu" else (float(v.value) for v in call.args[1:3])
    name = "relu" if call.op.name == "relax.nn.relu" else "clip"  # a C identifier (CUDA kernel names)
    return bb.call_te(lambda t: te.compute(t.shape, lambda *i: nan_keeping_clip(t[i], lo, hi, t.dtype), name=name),
                      x, primfunc_name_hint=name)


def legalize_and_fuse(mod: tvm.IRModule) -> tvm.IRModule:
    return tvm.transform.Sequential([
        relax.transform.LegalizeOps({"relax.nn.relu": _legalize_clip, "relax.clip": _legalize_clip}),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(mod)
