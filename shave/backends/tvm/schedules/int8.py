"""Int8 conv kernel: uint8 activations x int8 weights -> int32, requantized in the epilogue.

One PrimFunc per qconv2d layer (dense, groups=1; or depthwise, below) computes the
reference op of ir/opset_quant.py bit for bit:

1. `pack`: the input, re-laid out as [N, C/4, Hp, Wp, 4] uint8 (4 channels = one
   int32 per pixel); the spatial border is filled with the input zero point (so it
   contributes x_zp * w, removed with everything else below), padded channels with 0.
2. `conv`: sum(x_q * w_q) into an int32 [N, OC/8, OH, OWp, 8] accumulator over
   weights packed at compile time to [OC/8, C/4, KH, KW, 8(out), 4(in)] int8 (32
   bytes, one ymm, per step). The 8x4 step is tensorized with the target's dot product
   (shave.isa's `int8_dot`):
   - AVX-512 VNNI / AVX-VNNI: one `vpdpbusd` (ymm): the 4 input bytes broadcast to 32,
     u8 x s8 products summed by 4 into the 8 int32 accumulators, no intermediate
     saturation, so any 8-bit weight is exact.
   - AVX2: `vpmaddubsw` (u8 x s8 -> 16 x i16 pair sums) then `vpmaddwd` with ones
     (-> 8 x i32) added to the accumulator. The pair sums saturate unless the weights
     are within +-64 (2 * 255 * 64 < 2^15); weights beyond (8-bit, `wide`): the input is
     packed as int16 pairs and the weights as int16 [OC/8, C/2, KH, KW, 8, 2], one
     `vpmaddwd` per step (16 multiply-adds, exact for any 8-bit weight).
   - Arm `+dotprod` (`shifted`): `sdot` multiplies signed bytes only, so the pack stores
     x - 128 as int8 and the bias folds the 128 * sum(w) back in (fold_bias); two
     `sdot` per step (4 int32 lanes each).
   Register tile: `reg_n` output columns x `ocb_in` blocks of 8 channels, fully
   unrolled (2 x up to 5 within 16 registers; 2 x up to 8 on x86 targets with 32, AVX-512:
   MobileNetV2's dense int8 layers, each timed alone on Zen 4, summed 1.7x faster with VNNI and
   1.15x with the AVX2 pair and int16 variants); the (batch, channel block, row) loops run in parallel. Without a dot
   product (or where tensorizing fails) the same compute runs with a plain schedule
   (int32 lanes, same tiling).
3. `out`: + int32 bias, where the bias already holds -x_zp * sum(w) per channel
   (compile time), then float32(acc) * mult [+ float32(r - r_zp) * r_mult], round
   half to even, + out_zp, clamp, uint8 (or the clamped float32), written to NCHW
   from the register tile.

Depthwise (groups = C = OC): the input packed [N, C/8, Hp, Wp, 8] uint8, weights
[C/8, KH, KW, 8] widened to int32 at compile time (any 8-bit weight), each tap a zero-extend,
an int32 multiply and add over 8 channel lanes; tile of reg_n columns as conv.py's depthwise.
With `fp32_taps` (CPUs whose vpmulld is two uops and 10 cycles' latency: Intel's; shave.isa
`slow_int32_multiply`) the weights are float32 and the input is packed as float32: a blocked
input per tile, on the stack (all kh rows, or one row at a time where that would pass
conv.STACK_BYTES), an NCHW one (a gather) in one pass before; so a tap is one FMA; the float32 sums of integer products stay exact below 2^24 (kh x kw x 255 x
128; fp32_taps_exact), and the sum converts to the same int32. Intel Xeon (emeraldrapids),
whole models int8 against int32 taps: MobileNetV2 0.83x / 0.80x (batch 1 / 8), MNASNet 0.85x,
bytes identical (docs/tvm-notes.md, int8).

Lowering (lower_quant.py) emits the unscheduled compute as a call_tir marked with
the `shave.qconv` attribute (the spec); int8_blocked.block_qconvs then switches the
activations passed only between these kernels to [N, C/8, H, W, 8] uint8 (`in_blocked`,
`out_blocked`, `res_blocked`: the pack copies 8-byte blocks, a 1x1 u8 x s8 kernel without
padding reads the blocked input in place, the epilogue stores 8 lanes at once), and
`schedule_qconvs` schedules every kernel for the target.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

from ....ir import get_op
from .conv_spec import OutSize, _act, _pick_reg_n
from .parallel import worth_parallel

VO, VI = 8, 4  # output channels per block (int32 lanes of a ymm), input channels per step
MAX_W = 64  # |w| bound that keeps vpmaddubsw's int16 pair sums from saturating
INTRIN = "shave_dot_8x4_u8i8i32_avx2"
INTRIN_WIDE = "shave_dot_8x2_i16i16i32_avx2"
INTRIN_WIDE_U8 = "shave_dot_8x2_u8i16i32_avx2"  # the same, the 2 input bytes widened in a register
INTRIN_VNNI = "shave_dot_8x4_u8i8i32_vnni"
INTRIN_SDOT = "shave_dot_8x4_i8i8i32_sdot"
# 4 (2) pixels of 8 float32 integers in [0, 255] -> 32 (16) bytes
STORES = {4: "shave_store_4x8_f32u8_avx2", 2: "shave_store_2x8_f32u8_avx2"}
SHIFT = 128  # the `shifted` variant packs x - SHIFT as int8 (Arm sdot multiplies signed bytes only)


@dataclass(frozen=True)
class QConvSpec(OutSize):
    n: int
    c: int
    h: int
    w: int
    oc: int
    kh: int
    kw: int
    stride: tuple
    pad: tuple  # top, left, bottom, right
    dilation: tuple
    x_zp: int
    out_zp: int
    out_dtype: str  # "uint8" or "float32"
    lo: float | None
    hi: float | None
    residual: bool = False
    r_zp: int = 0
    r_mult: float = 0.0
    tile: tuple | None = None  # (ocb_in, reg_n); None: the default
    depthwise: bool = False  # groups = C = OC: int32 lanes over 8 channels, no u8 x s8 pair sums
    wide: bool = False  # dense with 8-bit weights (beyond +-MAX_W) for AVX2: int16 pairs, vpmaddwd only
    pairs: bool = True  # the weights are within +-MAX_W: AVX2's vpmaddubsw pair sums cannot saturate
    shifted: bool = False  # dense, input packed as int8 x - SHIFT (Arm sdot); the bias holds the difference
    in_blocked: bool = False  # X is [N, C/8, H, W, 8] uint8 (block_qconvs), not NCHW
    out_blocked: bool = False  # Y is [N, OC/8, OH, OW, 8] uint8
    res_blocked: bool = False  # R is [N, OC/8, OH, OW, 8] uint8
    act: str | None = None  # an activation on real values (opset_quant.float_acts), then * out_inv
    out_inv: float = 1.0
    fp32_taps: bool = False  # depthwise: input packed as float32, taps as float32 FMAs (exact: fp32_taps_exact)
    regs: int = 16  # vector registers of the target (shave.isa): 32 on AVX-512 sizes larger register tiles

    @property
    def vi(self) -> int:
        """Input channels per packed pixel: 4 bytes, 2 int16 (wide) or the 8 lanes (depthwise)."""
        return VO if self.depthwise else (2 if self.wide else VI)

    def out_shape(self) -> tuple[int, ...]:
        if self.out_blocked:
            return (self.n, self.oc // VO, self.oh, self.ow, VO)
        return (self.n, self.oc, self.oh, self.ow)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(s: str) -> "QConvSpec":
        d = json.loads(s)
        for k in ("stride", "pad", "dilation", "tile"):
            if d[k] is not None:
                d[k] = tuple(d[k])
        return QConvSpec(**d)


def plan(spec: QConvSpec) -> dict:
    ocb = math.ceil(spec.oc / VO)
    if spec.tile is not None:
        ocb_in, reg_n = spec.tile
    elif spec.depthwise:
        ocb_in, reg_n = 1, _pick_reg_n(spec.ow, 8)
    else:  # accumulators + weights + broadcast + ones + temporaries within the 16 ymm registers
        ocb_in = 2 if ocb >= 2 else 1
        reg_n = _pick_reg_n(spec.ow, 5 if ocb_in == 2 else 8)
        if spec.regs >= 32 and not spec.shifted:  # x86 with 32 (AVX-512VL: ymm0-31): 2 x 8 accumulators
            reg_n = _pick_reg_n(spec.ow, 8)
    return {"ocb": math.ceil(ocb / ocb_in) * ocb_in, "ocb_in": ocb_in, "reg_n": reg_n,
            "owp": math.ceil(spec.ow / reg_n) * reg_n, "icb": math.ceil(spec.c / spec.vi)}


def reads_in_place(spec: QConvSpec) -> bool:
    """A blocked uint8 input a dense kernel reads without a copy (the wide variant widens each
    byte pair in a register): no padding, and the register tiles read only existing columns
    (the tile width divides the output width); not for the shifted variant (its pack shifts)."""
    return (spec.in_blocked and not spec.depthwise and not spec.shifted and not any(spec.pad)
            and plan(spec)["owp"] == spec.ow)


def pack_weight(spec: QConvSpec, w: np.ndarray) -> np.ndarray:
    """OIHW int8 -> [OC/8, C/4, KH, KW, 8, 4] int8 (depthwise: [C/8, KH, KW, 8] int32, or float32
    with fp32_taps), zero padded."""
    p = plan(spec)
    if spec.depthwise:
        wp = np.zeros((p["ocb"] * VO, spec.kh, spec.kw), np.float32 if spec.fp32_taps else np.int32)
        wp[:spec.oc] = w[:, 0]
        return np.ascontiguousarray(wp.reshape(p["ocb"], VO, spec.kh, spec.kw).transpose(0, 2, 3, 1))
    wp = np.zeros((p["ocb"] * VO, p["icb"] * spec.vi, spec.kh, spec.kw), np.int16 if spec.wide else np.int8)
    wp[:spec.oc, :spec.c] = w
    wp = wp.reshape(p["ocb"], VO, p["icb"], spec.vi, spec.kh, spec.kw)  # O, o, I, i, kh, kw
    return np.ascontiguousarray(wp.transpose(0, 2, 4, 5, 1, 3))  # O, I, kh, kw, o, i


def fold_bias(spec: QConvSpec, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """int32 bias with the input zero point's share, -x_zp * sum(w), folded in (shifted: the
    kernel sums (x - SHIFT) * w, so -(x_zp - SHIFT) * sum(w))."""
    zp = spec.x_zp - (SHIFT if spec.shifted else 0)
    b = bias.astype(np.int64) - zp * w.reshape(w.shape[0], -1).astype(np.int64).sum(1)
    if np.abs(b).max(initial=0) >= 2 ** 31:
        raise ValueError("folded int8 bias overflows int32")
    return b.astype(np.int32)


def supports(w: np.ndarray, groups: int) -> bool:
    """Dense and depthwise convs (other grouped convs keep the integer fallback)."""
    if w.ndim != 4:
        return False
    return groups == 1 or (groups == w.shape[0] and w.shape[1] == 1)


def _fp32_patch_rows(spec: QConvSpec, reg_n: int) -> int:
    """Kernel rows of a depthwise fp32_taps tile's float32 input patch packed at once: all kh where
    that patch is a stack array (under conv.STACK_BYTES), else one row at a time (stride 2)."""
    from .conv import STACK_BYTES, _dw_cols

    return spec.kh if spec.kh * _dw_cols(spec, reg_n) * VO * 4 < STACK_BYTES else 1


def fp32_taps_exact(kh: int, kw: int) -> bool:
    """Does a float32 sum of kh x kw products of uint8 inputs and int8 weights hold every partial
    sum exactly (all below 2^24)?"""
    return kh * kw * 255 * 128 < 2 ** 24


def variant(w: np.ndarray, depthwise: bool, dot: str, fp32_taps: bool = False) -> dict:
    """The QConvSpec fields (wide, pairs, shifted, fp32_taps) of a conv with int8 weights `w`, packed
    for a target whose int8 dot product is `dot`: int16 pairs only where AVX2's pair sums would
    saturate, x - 128 input only for Arm's sdot; a depthwise conv's taps as float32 FMAs where
    `fp32_taps` (the target's int32 multiply is slow: shave.isa `slow_int32_multiply`) and its
    sums stay exact."""
    big = needs_wide(w)
    if depthwise:
        return {"pairs": not big, "fp32_taps": fp32_taps and fp32_taps_exact(*w.shape[2:])}
    return {"wide": big and dot == "avx2", "pairs": not big, "shifted": dot == "neon_dot"}


def needs_wide(w: np.ndarray) -> bool:
    """Weights beyond +-MAX_W would saturate vpmaddubsw's pair sums: the int16 variant."""
    return int(np.abs(w.astype(np.int32)).max(initial=0)) > MAX_W


def compute_primfunc(spec: QConvSpec):
    """Arguments: X uint8 NCHW, packed W int8, bias int32 [OC], mult float32 [OC], (R uint8 NCHW), Y."""
    from tvm import te, tirx

    p = plan(spec)
    ocb, owp, icb = p["ocb"], p["owp"], p["icb"]
    n, c, h, w, oc = spec.n, spec.c, spec.h, spec.w, spec.oc
    kh, kw = spec.kh, spec.kw
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, pl = spec.pad[0], spec.pad[1]
    oh, ow = spec.oh, spec.ow
    hp = (oh - 1) * sh + dh * (kh - 1) + 1
    wp = (owp - 1) * sw + dw * (kw - 1) + 1
    if (spec.in_blocked and c % VO) or ((spec.out_blocked or spec.res_blocked) and oc % VO):
        raise ValueError("a blocked int8 layout needs channels that are a multiple of 8")
    X = te.placeholder((n, c // VO, h, w, VO) if spec.in_blocked else (n, c, h, w), "uint8", name="X")
    if spec.depthwise:
        Wt = te.placeholder((ocb, kh, kw, VO), "float32" if spec.fp32_taps else "int32", name="W")
    else:
        Wt = te.placeholder((ocb, icb, kh, kw, VO, spec.vi), "int16" if spec.wide else "int8", name="W")
    B = te.placeholder((oc,), "int32", name="B")
    M = te.placeholder((oc,), "float32", name="M")
    args = [X, Wt, B, M]
    Res = None
    if spec.residual:
        Res = te.placeholder((n, oc // VO, oh, ow, VO) if spec.res_blocked else (n, oc, oh, ow), "uint8", name="R")
        args.append(Res)

    vi = spec.vi
    pdt = "int16" if spec.wide else ("int8" if spec.shifted else "uint8")

    def x_at(b, ch, iy, ix):
        if spec.in_blocked:
            return X[b, ch // VO, iy, ix, ch % VO]
        return X[b, tirx.min(ch, c - 1), iy, ix]

    def pack_fn(b, i, y, x, j):
        ch = i * vi + j
        iy, ix = y - pt, x - pl
        inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
        val = tirx.if_then_else(inside, x_at(b, ch, iy, ix), tirx.const(spec.x_zp, "uint8"))
        val = tirx.if_then_else(ch < c, val, tirx.const(0, "uint8"))
        if spec.shifted:  # x - 128 as int8 (padded channels: -128, against zero weights)
            return (val.astype("int32") - SHIFT).astype("int8")
        if spec.depthwise and spec.fp32_taps:
            return val.astype("float32")
        return val.astype(pdt)

    rkh = te.reduce_axis((0, kh), name="rkh")
    rkw = te.reduce_axis((0, kw), name="rkw")
    if spec.depthwise:
        P = te.compute((n, ocb, hp, wp, VO), pack_fn, name="pack")
        acc = "float32" if spec.fp32_taps else "int32"
        Cc = te.compute(
            (n, ocb, oh, owp, VO),
            lambda b, o, y, x, j: te.sum(
                P[b, o, y * sh + rkh * dh, x * sw + rkw * dw, j].astype(acc) * Wt[o, rkh, rkw, j],
                axis=[rkh, rkw]), name="conv")
    rcb = te.reduce_axis((0, icb), name="rcb")
    rci = te.reduce_axis((0, vi), name="rci")
    if reads_in_place(spec):  # the blocked input itself: 8 // vi steps of vi bytes per block
        q = VO // vi
        Cc = te.compute(
            (n, ocb, oh, owp, VO),
            lambda b, o, y, x, j: te.sum(
                X[b, rcb // q, y * sh + rkh * dh, x * sw + rkw * dw, rcb % q * vi + rci].astype("int32")
                * Wt[o, rcb, rkh, rkw, j, rci].astype("int32"), axis=[rcb, rkh, rkw, rci]), name="conv")
    elif not spec.depthwise:
        P = te.compute((n, icb, hp, wp, vi), pack_fn, name="pack")
        Cc = te.compute(
            (n, ocb, oh, owp, VO),
            lambda b, o, y, x, j: te.sum(
                P[b, rcb, y * sh + rkh * dh, x * sw + rkw * dw, rci].astype("int32")
                * Wt[o, rcb, rkh, rkw, j, rci].astype("int32"), axis=[rcb, rkh, rkw, rci]), name="conv")

    f32 = lambda v: tirx.const(float(np.float32(v)), "float32")  # noqa: E731

    def epilogue(b, o, y, x, to_bytes=True):
        acc = Cc[b, o // VO, y, x, o % VO]
        if spec.fp32_taps:  # an integer the float32 sum holds exactly (fp32_taps_exact)
            acc = acc.astype("int32")
        val = (acc + B[o]).astype("float32") * M[o]
        if Res is not None:
            r = Res[b, o // VO, y, x, o % VO] if spec.res_blocked else Res[b, o, y, x]
            # both products rounded to float32 before the add, as the reference: no fused multiply-add
            val = _fence(val) + _fence((r.astype("int32") - spec.r_zp).astype("float32") * f32(spec.r_mult))
        if spec.act is not None:  # as the reference: the activation on y, then y * out_inv for a uint8 output
            val = _act(_fence(val), get_op(spec.act).epilogue({}))
            if spec.out_dtype == "uint8":
                val = _fence(val * f32(spec.out_inv))
        if spec.out_dtype == "uint8":
            q = tirx.round(val) + f32(spec.out_zp)
            q = tirx.min(tirx.max(q, f32(0 if spec.lo is None else spec.lo)), f32(255 if spec.hi is None else spec.hi))
            return q.astype("uint8") if to_bytes else q
        if spec.lo is not None:
            val = tirx.max(val, f32(spec.lo))
        if spec.hi is not None:
            val = tirx.min(val, f32(spec.hi))
        return val

    if _quant_stage(spec):
        # the requantized values as float32 first ("quant", integers in [lo, hi]), then the
        # conversion to bytes as a stage of its own, which x86 targets tensorize over whole
        # groups of 8-byte pixels (STORES, _schedule_out)
        Q = te.compute(spec.out_shape(), lambda b, o, y, x, j: epilogue(b, o * VO + j, y, x, to_bytes=False),
                       name="quant")
        Y = te.compute(spec.out_shape(), lambda *i: Q(*i).astype("uint8"), name="out")
    elif spec.out_blocked:
        Y = te.compute(spec.out_shape(), lambda b, o, y, x, j: epilogue(b, o * VO + j, y, x), name="out")
    else:
        Y = te.compute(spec.out_shape(), lambda b, o, y, x: epilogue(b, o, y, x), name="out")
    return te.create_prim_func(args + [Y])


def _fence(x):
    """x, with LLVM barred from contracting its multiply into a later add (TVM's LLVM codegen
    allows floating-point contraction, and an FMA rounds once where the reference rounds twice)."""
    from tvm import tirx

    return tirx.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", x)


_registered = False


def _register_intrin():
    global _registered
    if _registered:
        return
    from tvm.script import tirx as T
    from tvm.s_tir import TensorIntrin

    def description(k, adt, bdt):  # C[i] += A[k'] * B[i, k'] over the 8 x k step, int32
        @T.prim_func(s_tir=True)
        def desc(A: T.Buffer((k,), adt, offset_factor=1), B: T.Buffer((8, k), bdt, offset_factor=1),
                 C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:8], A[0:k], B[0:8, 0:k])
                T.writes(C[0:8])
                for i in T.serial(0, 8):
                    for r in T.serial(0, k):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, r])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
        return desc

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            # names bound with T.meta_var are substituted as expressions: a plain `a = ...` in the
            # body becomes a buffer, which TVM allocates from the workspace pool at every use
            a = T.meta_var(T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8),
                                         dtype="uint8x32"))
            pairs = T.meta_var(T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                                       a, B.vload([0, 0], dtype="int8x32"), dtype="int16x16"))
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")

    def impl16(adt):  # int16 pairs; a uint8 pair is widened in the register (vpmovzxbw)
        @T.prim_func(s_tir=True)
        def impl(A: T.Buffer((2,), adt, offset_factor=1), B: T.Buffer((8, 2), "int16", offset_factor=1),
                 C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:8], A[0:2], B[0:8, 0:2])
                T.writes(C[0:8])
                if adt == "uint8":
                    a = T.meta_var(T.cast(T.reinterpret(T.broadcast(
                        T.reinterpret(A.vload([0], "uint8x2"), dtype="int16"), 8), dtype="uint8x16"), "int16x16"))
                else:
                    a = T.meta_var(T.reinterpret(T.broadcast(
                        T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), 8), dtype="int16x16"))
                C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a, B.vload([0, 0], dtype="int16x16"),
                    dtype="int32x8")
        return impl

    @T.prim_func(s_tir=True)
    def impl_vnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            # vpdpbusd ymm: C += the 4 u8 x s8 products of each int32 lane, summed without saturation
            # (LLVM 22 declares its byte operands <32 x i8>; TVM's own dot_16x4_vnni passes i32 lanes)
            C[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"), C.vload([0], dtype="int32x8"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8), dtype="uint8x32"),
                B.vload([0, 0], dtype="int8x32"), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def impl_sdot(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
                  C: T.Buffer((8,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            # two sdot (4 int32 lanes, 16 bytes each): output channels 0-3 and 4-7
            a = T.meta_var(T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                                         dtype="int8x16"))
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([0], dtype="int32x4"), a,
                B.vload([0, 0], dtype="int8x16"), dtype="int32x4")
            C[T.ramp(T.int32(4), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"), C.vload([4], dtype="int32x4"), a,
                B.vload([4, 0], dtype="int8x16"), dtype="int32x4")

    def store_desc(cols):  # Y[c, j] = uint8(Q[c, j]) for `cols` pixels of 8 lanes
        @T.prim_func(s_tir=True)
        def desc(Q: T.Buffer((cols, 8), "float32", offset_factor=1), Y: T.Buffer((cols, 8), "uint8", offset_factor=1)):
            with T.sblock("root"):
                T.reads(Q[0:cols, 0:8])
                T.writes(Y[0:cols, 0:8])
                for c, j in T.grid(cols, 8):
                    with T.sblock("update"):
                        vc, vj = T.axis.remap("SS", [c, j])
                        Y[vc, vj] = T.Cast("uint8", Q[vc, vj])
        return desc

    def to_i16(q, c):  # two columns of float32 integers -> 16 int16 (saturating, per 128-bit half)
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.packssdw"), T.Cast("int32x8", q.vload([c, 0], dtype="float32x8")),
            T.Cast("int32x8", q.vload([c + 1, 0], dtype="float32x8")), dtype="int16x16")

    def pixels(a, b):  # -> bytes (packuswb, per 128-bit half); vpermd puts each pixel's 8 bytes together
        lanes = T.ramp(T.int32(0), 1, 8)
        return T.reinterpret(T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.permd"),
            T.reinterpret(T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.packuswb"), a, b,
                                                  dtype="uint8x32"), dtype="int32x8"),
            T.shift_right(lanes, 1) + T.shift_left(T.bitwise_and(lanes, 1), 2), dtype="int32x8"), dtype="uint8x32")

    @T.prim_func(s_tir=True)
    def store4(Q: T.Buffer((4, 8), "float32", offset_factor=1), Y: T.Buffer((4, 8), "uint8", offset_factor=1)):
        with T.sblock("root"):
            T.reads(Q[0:4, 0:8])
            T.writes(Y[0:4, 0:8])
            Y.vstore([0, 0], pixels(to_i16(Q, 0), to_i16(Q, 2)))

    @T.prim_func(s_tir=True)
    def store2(Q: T.Buffer((2, 8), "float32", offset_factor=1), Y: T.Buffer((2, 8), "uint8", offset_factor=1)):
        with T.sblock("root"):
            T.reads(Q[0:2, 0:8])
            T.writes(Y[0:2, 0:8])
            Y.vstore([0, 0], T.vectorlow("uint8x16", pixels(to_i16(Q, 0), to_i16(Q, 0))))

    for name, d, i in ((STORES[4], store_desc(4), store4), (STORES[2], store_desc(2), store2),
                       (INTRIN, description(4, "uint8", "int8"), impl),
                       (INTRIN_WIDE, description(2, "int16", "int16"), impl16("int16")),
                       (INTRIN_WIDE_U8, description(2, "uint8", "int16"), impl16("uint8")),
                       (INTRIN_VNNI, description(4, "uint8", "int8"), impl_vnni),
                       (INTRIN_SDOT, description(4, "int8", "int8"), impl_sdot)):
        try:
            TensorIntrin.register(name, d, i)
        except Exception:
            TensorIntrin.register(name, d, i, override=True)
    _registered = True


X86_DOTS = ("avx512_vnni", "avx_vnni", "avx2")  # every VNNI CPU has AVX2 as well


def step_intrin(spec: QConvSpec, dot: str) -> str | None:
    """The tensor intrinsic for the 8x4 (or 8x2) step of a dense `spec` on a target whose int8
    dot product is `dot` (shave.isa), or None for the plain schedule."""
    x86 = dot in X86_DOTS
    if spec.depthwise:
        return None
    if spec.shifted:
        return INTRIN_SDOT if dot == "neon_dot" else None
    if spec.wide:
        return (INTRIN_WIDE_U8 if reads_in_place(spec) else INTRIN_WIDE) if x86 else None
    if dot in ("avx512_vnni", "avx_vnni"):
        return INTRIN_VNNI
    return INTRIN if x86 and spec.pairs else None


def schedule(spec: QConvSpec, dot: str):
    """The scheduled PrimFunc of `spec` for a target whose int8 dot product is `dot` (an
    shave.isa INT8_DOTS name): tensorized with step_intrin(spec, dot), plain without."""
    import tvm

    intrin = step_intrin(spec, dot)
    p = plan(spec)
    sch = tvm.s_tir.Schedule(compute_primfunc(spec))
    par = worth_parallel(sch.mod["main"])
    grouped = _stores_groups(spec, dot)
    if _quant_stage(spec) and not grouped:  # one epilogue stage, converting pixel by pixel
        sch.compute_inline(sch.get_sblock("quant"))
    conv, out = sch.get_sblock("conv"), sch.get_sblock("quant" if grouped else "out")
    patch_per_tile = spec.depthwise and spec.fp32_taps and spec.in_blocked  # a copy; a gather is not cheap to redo
    if not (patch_per_tile or reads_in_place(spec)):  # a per-tile patch is packed inside the tile loop, below
        b, i, y, x, j = sch.get_loops(sch.get_sblock("pack"))
        if par:
            sch.parallel(sch.fuse(b, i, y))
        if spec.in_blocked:  # contiguous bytes of one channel block
            sch.vectorize(j)
    # the accumulator stays "global" (the intrinsics' C too): a stack array under 1 KB kept in
    # registers, where "local" made it a workspace allocation per tile (conv.STACK_BYTES)
    if spec.depthwise:  # int32 (or float32: fp32_taps) lanes over 8 channels, reg_n columns, as conv.py's depthwise kernel
        b, o, y, x, j, rkh, rkw = sch.get_loops(conv)
        xo, xi = sch.split(x, [None, p["reg_n"]])
        sch.reorder(b, o, y, xo, rkh, rkw, xi, j)
        if par:
            sch.parallel(sch.fuse(b, o, y))
        sch.vectorize(j)
        sch.unroll(xi)
        if patch_per_tile:  # the tile's float32 input patch, a stack array (conv.py's depthwise kernel)
            pack = sch.get_sblock("pack")
            sch.compute_at(pack, xo if _fp32_patch_rows(spec, p["reg_n"]) == spec.kh else rkh)
            sch.vectorize(sch.get_loops(pack)[-1])
        sch.reverse_compute_at(out, xo)
        init = sch.decompose_reduction(conv, rkh)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(sch.get_loops(init)[-2])
        _schedule_out(sch, out, spec, grouped)
        return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
    b, o, y, x, j, rcb, rkh, rkw, rci = sch.get_loops(conv)
    oo, oi = sch.split(o, [None, p["ocb_in"]])
    xo, xi = sch.split(x, [None, p["reg_n"]])
    if intrin:  # the 8x4 (j, rci) step is the tensorized intrinsic
        sch.reorder(b, oo, y, xo, rcb, rkh, rkw, oi, xi, j, rci)
    else:  # int32 lanes over j, the 4 input channels one after another
        sch.reorder(b, oo, y, xo, rcb, rkh, rkw, rci, oi, xi, j)
    if par:
        sch.parallel(sch.fuse(b, oo, y))
    if not intrin:
        sch.vectorize(j)
    sch.reverse_compute_at(out, xo)
    init = sch.decompose_reduction(conv, rcb)
    iloops = sch.get_loops(init)
    sch.vectorize(iloops[-1])
    for lp in iloops[-3:-1]:
        sch.unroll(lp)
    if intrin:
        _register_intrin()
        sch.tensorize(j, intrin)
    sch.unroll(oi)
    sch.unroll(xi)
    _schedule_out(sch, out, spec, grouped)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)


def _quant_stage(spec: QConvSpec) -> bool:
    """The epilogue of a blocked uint8 output is two stages: "quant" (float32) and "out" (bytes)."""
    return spec.out_blocked and spec.out_dtype == "uint8"


def _stores_groups(spec: QConvSpec, dot: str) -> bool:
    """Whether the bytes of a blocked uint8 output are stored 4 (or 2) pixels at a time (STORES):
    x86, whole tiles only (a partial one, padded blocks or columns, stores under a predicate),
    and an even tile width (TVM's tensorize needs each group to start at a multiple of its
    width, so 7-column tiles convert pixel by pixel)."""
    p = plan(spec)
    return (_quant_stage(spec) and dot in X86_DOTS and p["reg_n"] % 2 == 0 and p["owp"] == spec.ow
            and p["ocb"] * VO == spec.oc)


def _schedule_out(sch, out, spec: QConvSpec, grouped: bool) -> None:
    """The epilogue under the register tile: the 8 lanes of a blocked output as one vector. With
    `grouped` (_stores_groups) `out` is the "quant" stage (float32, a stack array of the tile),
    and the bytes are stored 4 (or 2) pixels at a time: 32 bytes from 4 vectors in 8
    instructions (STORES), where the conversion pixel by pixel took about 4 a pixel."""
    loops = sch.get_loops(out)
    if grouped:  # under the tile loop, after "quant": ([blocks,] columns, lanes)
        inner = 2 if spec.depthwise else 3
        store = sch.get_sblock("out")
        sch.reverse_compute_at(store, loops[-inner - 1])
        _register_intrin()
        sloops = sch.get_loops(store)
        group = 4 if plan(spec)["reg_n"] % 4 == 0 else 2
        xo, xi = sch.split(sloops[-2], [None, group])
        for lp in sloops[-inner:-2] + [xo]:
            sch.unroll(lp)
        sch.tensorize(xi, STORES[group])
    if spec.out_blocked:
        sch.vectorize(loops[-1])
        loops = loops[:-1]
    for lp in loops[-2:]:
        sch.unroll(lp)


def schedule_qconvs(mod, target: dict):
    """Schedule every PrimFunc the int8 lowering marked (`shave.qconv`) for `target`."""
    from tvm import tirx

    from ....isa import isa

    dot = isa(target).int8_dot
    updates = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc) and func.attrs is not None and "shave.qconv" in func.attrs:
            spec = QConvSpec.from_json(str(func.attrs["shave.qconv"]))
            try:
                new = schedule(spec, dot)
            except Exception:  # a tensor intrinsic that did not apply: the plain schedule
                if step_intrin(spec, dot) is None and not _stores_groups(spec, dot):
                    raise
                new = schedule(spec, "none")
            new = new.with_attr("global_symbol", gv.name_hint)
            if "shave.replaces" in func.attrs:  # int8_blocked's mark, for the profile (lower.follow_renames)
                new = new.with_attr("shave.replaces", func.attrs["shave.replaces"])
            updates[gv] = new
    for gv, f in updates.items():
        mod[gv] = f
    return mod
