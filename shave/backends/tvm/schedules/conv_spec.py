"""What every conv kernel shares: the ConvSpec a kernel is built from, its arguments and its
output stage (bias, residual, the fused activation). The kernels (kernels.py's registry: the
direct kernel of conv.py, the Winograd kernel of winograd.py) all build on it."""
from __future__ import annotations

import math
from dataclasses import dataclass


def out_size(spec, axis: int) -> int:
    """Output height (axis 0) or width (1) of a conv spec (fields h, w, kh, kw, stride, pad, dilation)."""
    size, k = (spec.h, spec.kh) if axis == 0 else (spec.w, spec.kw)
    pad = spec.pad[axis] + spec.pad[axis + 2]
    return (size + pad - spec.dilation[axis] * (k - 1) - 1) // spec.stride[axis] + 1


class OutSize:
    """oh / ow of a conv spec dataclass (fields h, w, kh, kw, stride, pad, dilation)."""

    @property
    def oh(self) -> int:
        return out_size(self, 0)

    @property
    def ow(self) -> int:
        return out_size(self, 1)


@dataclass(frozen=True)
class ConvSpec(OutSize):
    n: int
    c: int
    h: int
    w: int
    oc: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    depthwise: bool
    act: str | None  # None, "relu", "clip:lo:hi", "sigmoid", "silu", "hardswish", "hardsigmoid" (ACTS)
    residual: bool
    vec: int
    tile: tuple[int, int] | None = None  # (ocb_in, reg_n) chosen by tuning; None: the default plan
    in_blocked: bool = False  # X is [N, ceil(C/v), H, W, v] (see `in_shape`)
    out_blocked: bool = False  # Y is [N, ceil(OC/v), OH, OW, v]
    res_blocked: bool = False  # the residual is [N, ceil(OC/v), OH, OW, v]
    groups: int = 1  # grouped dense conv (not depthwise): each group's OC/groups a multiple of vec
    shift: bool = False  # input read through a per-channel shift (int32 [c] arguments DY, DX after the residual)
    kernel: str = "direct"  # the kernel that computes it (kernels.py registry: "direct", "winograd")
    regs: int = 16  # vector registers of the target (shave.isa): 16 ymm, 32 zmm or NEON
    fma_pipes: int = 2  # vector FMAs issued per cycle (shave.isa): 1 where a zmm FMA runs as two halves (Zen 4)

    def in_shape(self) -> tuple[int, ...]:
        """Shape of X. Blocked, channel c is lane c % v of block c // v; where C is not a multiple
        of v the last block has padding lanes (`blocked_shape`)."""
        if self.in_blocked:
            return blocked_shape(self.n, self.c, self.h, self.w, self.vec)
        return (self.n, self.c, self.h, self.w)

    def out_shape(self, blocked: bool | None = None) -> tuple[int, ...]:
        """Shape of Y (or, with blocked=True/False, of an output/residual in that layout)."""
        blocked = self.out_blocked if blocked is None else blocked
        if blocked:
            return blocked_shape(self.n, self.oc, self.oh, self.ow, self.vec)
        return (self.n, self.oc, self.oh, self.ow)

    @property
    def bias_len(self) -> int:
        """Length of the bias argument: OC, padded with zeros to whole blocks for a blocked output
        (its padding lanes get act(0 [+ the residual's padding lane]): finite values no consumer reads)."""
        return blocked_shape(1, self.oc, 1, 1, self.vec)[1] * self.vec if self.out_blocked else self.oc


def blocked_shape(n: int, c: int, h: int, w: int, v: int) -> tuple[int, int, int, int, int]:
    """[N, ceil(C/v), H, W, v]: the blocked layout of an [N, C, H, W] value. Channels C..ceil(C/v)*v-1
    are padding lanes: written by the kernel that makes the value (with finite values) and ignored
    by every reader (a dense conv's packed weights are zero there; a depthwise conv computes them
    into its own padding lanes; a global pool drops them)."""
    return (n, -(-c // v), h, w, v)


def _padded_columns(ow: int, reg_n: int) -> int:
    """Columns a row of `ow` computes beyond its end in tiles `reg_n` wide."""
    return math.ceil(ow / reg_n) * reg_n - ow


def _pick_reg_n(ow: int, max_reg: int, min_reg: int | None = None) -> int:
    """Tile width in [min_reg (default max_reg/2), max_reg] that wastes the fewest padded columns
    (then the widest)."""
    if ow <= max_reg:
        return ow
    best = None
    for r in range(max_reg, max(1, min_reg or max_reg // 2) - 1, -1):
        waste = _padded_columns(ow, r)
        if best is None or waste < best[0]:
            best = (waste, r)
    return best[1]


# Dense register tiles (ocb_in, max reg_n) worth measuring: 4-14 accumulators, which with the
# ocb_in weight vectors and a broadcast fit 16 registers; with 32 (AVX-512, NEON) also tiles of
# up to 28 accumulators (fewer loads per FMA: (ocb_in + reg_n) / (ocb_in * reg_n)).
DENSE_TILES = {16: [(1, 8), (1, 12), (2, 4), (2, 6), (3, 4), (4, 3)],
               32: [(1, 8), (1, 12), (2, 4), (2, 6), (3, 4), (4, 3), (1, 24), (2, 12), (3, 8), (4, 6), (6, 4)]}


# The activations a conv kernel applies in its epilogue, on the register tile (no pass over memory):
# each as PyTorch computes it, in the same order as the Relax lowering of the op (lower_float.py).
ACTS = ("relu", "clip", "sigmoid", "silu", "hardswish", "hardsigmoid")


def _act(x, act):
    """The fused activation; a NaN stays NaN, as in PyTorch (legalize.nan_keeping_clip)."""
    from tvm import tirx

    from .legalize import nan_keeping_clip, shared, vector_sigmoid

    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    if act is None:
        return x
    if act == "relu":
        return nan_keeping_clip(x, 0.0)
    if act == "sigmoid":
        return vector_sigmoid(x)
    if act == "silu":
        return shared(x, lambda v: v * vector_sigmoid(v), "silu_x")
    if act == "hardsigmoid":  # relu6(x + 3) / 6
        return nan_keeping_clip(x + f32(3.0), 0.0, 6.0) / f32(6.0)
    if act == "hardswish":  # x * (relu6(x + 3) / 6)
        return shared(x, lambda v: v * (nan_keeping_clip(v + f32(3.0), 0.0, 6.0) / f32(6.0)), "hswish_x")
    _, lo, hi = act.split(":")
    return nan_keeping_clip(x, float(lo), float(hi))


def kernel_args(spec: ConvSpec, w_shape):
    """Placeholders X (NCHW or blocked), packed weights of `w_shape`, bias, residual (or None)."""
    from tvm import te

    X = te.placeholder(spec.in_shape(), "float32", name="X")
    Wt = te.placeholder(w_shape, "float32", name="W")
    B = te.placeholder((spec.bias_len,), "float32", name="B")
    Res = te.placeholder(spec.out_shape(spec.res_blocked), "float32", name="R") if spec.residual else None
    return X, Wt, B, Res


def output_stage(spec: ConvSpec, acc, B, Res):
    """Y (blocked or NCHW) = act(acc + bias [+ residual]) from the blocked result `acc`
    ([N, OC/v, >= OH, >= OW, v])."""
    from tvm import te

    v = spec.vec

    def epilogue(val, b, o, y, x, j):
        """bias, residual, activation for output channel o * v + j."""
        val = val + B[o * v + j]
        if Res is not None:
            val = val + (Res[b, o, y, x, j] if spec.res_blocked else Res[b, o * v + j, y, x])
        return _act(val, spec.act)

    if spec.out_blocked:
        return te.compute(spec.out_shape(), lambda b, o, y, x, j: epilogue(acc[b, o, y, x, j], b, o, y, x, j),
                          name="out")
    return te.compute(spec.out_shape(),
                      lambda b, o, y, x: epilogue(acc[b, o // v, y, x, o % v], b, o // v, y, x, o % v), name="out")
