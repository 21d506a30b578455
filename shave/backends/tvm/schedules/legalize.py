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


# exp(x) for float32 in vector registers. TVM's tirx.exp becomes LLVM's llvm.exp, which x86 codegen
# scalarises into one libm expf call per lane (64 calls in a SiLU conv tile). Cephes' expf instead:
# x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-5 polynomial, 2^n built in the exponent bits;
# within 2 ulp of expf, and every step vectorises (FMAs, a floor, an integer shift).
_EXP_HI, _EXP_LO = 88.3762626647949, -87.3365447504021  # e^x overflows / goes denormal beyond
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 in two parts: n * _LN2_HI is exact
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def shared(value, body, name: str = "v"):
    """body(v) with v bound once to `value` (a TIR Let): an expression used several times stays
    one computation instead of a tree with a copy per use, which TVM's simplifier and the unrolled
    register tiles would multiply (an inlined vector_exp made EfficientNet-B0's build 7x slower)."""
    from tvm import tirx

    if isinstance(value, (tirx.Var, tirx.FloatImm, tirx.IntImm)):
        return body(value)
    var = tirx.Var(name, "float32")
    return tirx.Let(var, value, body(var))


def vector_exp(x):
    """TIR float32 e^x that vectorises (see above); a NaN stays NaN. x is clamped to
    [_EXP_LO, _EXP_HI]: beyond, the result saturates at about 1.2e-38 / 2.4e38 instead of going
    denormal or to inf (vector_sigmoid, its user, is 0 or 1 to float32 precision there)."""
    from tvm import tirx

    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731

    def from_clamped(xc):
        def from_n(n):
            def from_r(r):
                p = f32(_EXP_POLY[0])
                for c in _EXP_POLY[1:]:
                    p = p * r + f32(c)
                two_n = tirx.reinterpret("float32", tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32")))
                return (p * (r * r) + r + f32(1.0)) * two_n
            return shared(xc - n * f32(_LN2_HI) - n * f32(_LN2_LO), from_r, "exp_r")
        return shared(tirx.floor(xc * f32(1.44269504088896341) + f32(0.5)), from_n, "exp_n")

    return shared(x, lambda v: shared(nan_keeping_clip(v, _EXP_LO, _EXP_HI), from_clamped, "exp_x"), "exp_in")


def vector_sigmoid(x):
    """1 / (1 + e^-x) with vector_exp."""
    from tvm import tirx

    one = tirx.const(1.0, "float32")
    return one / (one + vector_exp(-x))


# erf(x) for float32 in vector registers: libm's erff (what tirx.erf becomes) is one scalar call
# per lane. A rational function instead, odd numerator over even denominator in x^2 on x clamped
# to [-4, 4] (erf is +-1 in float32 beyond): the float32 approximation Eigen and XLA use, within a
# few ulp of erff; only FMAs, a division and a clamp.
_ERF_NUM = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_DEN = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def vector_erf(x):
    """TIR float32 erf(x) that vectorises (see above); a NaN stays NaN."""
    from tvm import tirx

    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731

    def from_clamped(xc):
        def from_sq(x2):
            p, q = f32(_ERF_NUM[0]), f32(_ERF_DEN[0])
            for c in _ERF_NUM[1:]:
                p = p * x2 + f32(c)
            for c in _ERF_DEN[1:]:
                q = q * x2 + f32(c)
            return xc * p / q
        return shared(xc * xc, from_sq, "erf_x2")

    return shared(nan_keeping_clip(x, -4.0, 4.0), from_clamped, "erf_x")


def vector_gelu(x):
    """PyTorch's exact GELU, x * (0.5 + 0.5 * erf(x / sqrt 2)), with vector_erf."""
    from tvm import tirx

    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    return shared(x, lambda v: v * (f32(0.5) + f32(0.5) * vector_erf(v * f32(0.7071067811865476))), "gelu_x")


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


def _legalize_sigmoid(bb, call):
    """relax.sigmoid and relax.nn.silu on float32 with vector_sigmoid; other dtypes as TOPI does."""
    from tvm import te

    x = call.args[0]
    if str(x.ty.dtype) != "float32":
        return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)
    silu = call.op.name == "relax.nn.silu"
    name = "silu" if silu else "sigmoid"
    return bb.call_te(lambda t: te.compute(
        t.shape, lambda *i: shared(t[i], lambda v: v * vector_sigmoid(v)) if silu else vector_sigmoid(t[i]),
        name=name),
        x, primfunc_name_hint=name)


def _legalize_gelu(bb, call):
    """relax.nn.gelu on float32 with vector_gelu; other dtypes as TOPI does."""
    from tvm import te

    x = call.args[0]
    if str(x.ty.dtype) != "float32":
        return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")(bb, call)
    return bb.call_te(lambda t: te.compute(t.shape, lambda *i: vector_gelu(t[i]), name="gelu"), x,
                      primfunc_name_hint="gelu")


EXP_KERNELS = ("sigmoid", "silu")  # the PrimFuncs _legalize_sigmoid makes


@tvm.transform.module_pass(opt_level=0, name="shave.OneExpPerKernel")
def _one_exp_per_kernel(mod, ctx):
    """Mark the exp-based activation kernels "out-elementwise fusable" (TVM's pattern for ops like
    conv2d): FuseOps then fuses what follows one of them (an SE gate's multiply) but never a chain
    of two into one kernel. Fused, each inlined exp nests its Let-bound steps inside the next, and
    TVM's LowerIntrin worked exponentially in that depth: sigmoid -> sigmoid -> silu never finished
    building (found by the fuzzer)."""
    for gv, f in list(mod.functions.items()):
        if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(EXP_KERNELS):
            mod[gv] = f.with_attr("op_pattern", 4)  # kOutEWiseFusable
    return mod


def legalize_and_fuse(mod: tvm.IRModule) -> tvm.IRModule:
    return tvm.transform.Sequential([
        relax.transform.LegalizeOps({"relax.nn.relu": _legalize_clip, "relax.clip": _legalize_clip,
                                     "relax.sigmoid": _legalize_sigmoid, "relax.nn.silu": _legalize_sigmoid,
                                     "relax.nn.gelu": _legalize_gelu}),
        relax.transform.AnnotateTIROpPattern(),
        _one_exp_per_kernel,
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ])(mod)
