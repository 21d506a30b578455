"""Grouped convs whose groups are narrower than a vector, computed group by group inside it.

ResNeXt's 3x3 convs have 4- or 8-channel groups (32 groups of 128 or 256 channels), RegNet's 8;
a vector holds 16 (AVX-512) or 8 (AVX2) channels. The direct kernel (conv.py) needs each
group's output channels to fill whole vector blocks, so the planner merged narrow groups into
block-wide ones with zero weights between them (fusion.merge_groups): 4 channel-groups per
16-lane block computed 4x the conv's multiply-adds, and ran at a quarter of the dense convs'
speed per useful multiply-add (docs/tvm-notes.md).

This kernel takes a grouped conv whose groups have as many input as output channels (cg), cg
dividing the vector width v: output block o (channels o*v .. o*v+v-1) then reads input block o
only, and lane j of it the cg input channels of its own group, lanes (j // cg) * cg + i of that
block. The reduction step, for one output column and one tap, is

    acc[j] += X[(j // cg) * cg + i] * W[i, j]    for i < cg, j < v

which is a tensor intrinsic (`intrin_name(cg, v)`): one vector load of the input block, then per i a
shuffle of it (`T.Shuffle`: lane j takes lane (j // cg) * cg + i, within a 128-bit lane for
cg <= 4: one vshufps / vpermilps; across lanes for cg = 8: one vpermps) and an FMA with the
weights of the v output channels. That is cg FMAs per tap and column for v output channels, as
many as the conv's multiply-adds need, where the merged kernel did v.

Everything else is the direct kernel's: the same ConvSpec (with `groups` the conv's own count),
the pack stage, register tiles of ocb_in blocks x reg_n columns, the output stage and the
blocked layouts (`ragged`: a padded last block's padding lanes form whole groups of their own,
whose packed weights are zero). Weights are packed [OC/v, KH, KW, cg, v].
"""
from __future__ import annotations

import math

import numpy as np

from .conv import (_direct_candidate_tiles, _direct_default_tile, pack_in_task, pack_stage, packs_per_task,
                   parallel_tasks, plan_tile, schedule_pack_pass, schedule_tile_ends)
from .conv_spec import ConvSpec, kernel_args, output_stage
from .kernels import ConvKernelType, register
from .parallel import worth_parallel


def supports_groups(c: int, oc: int, groups: int, vec: int) -> bool:
    """Whether a conv of c -> oc channels in `groups` groups is one this kernel computes at `vec`
    lanes: cg input and output channels a group, cg < vec dividing vec."""
    if groups <= 1 or c != oc or c % groups:
        return False
    cg = c // groups
    return cg < vec and vec % cg == 0


def supports(spec: ConvSpec) -> bool:
    """supports_groups (not depthwise: one channel a group is the depthwise kernel's)."""
    return not spec.depthwise and supports_groups(spec.c, spec.oc, spec.groups, spec.vec)


def intrin_name(cg: int, v: int) -> str:
    return f"shave_lane_groups_{cg}x{v}_f32"


_registered: set = set()


def _register_intrin(cg: int, v: int) -> str:
    """Register (once) the cg x v reduction step (module docstring) and return its name."""
    name = intrin_name(cg, v)
    if name in _registered:
        return name
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((v,), "float32", offset_factor=1), B: T.Buffer((cg, v), "float32", offset_factor=1),
             C: T.Buffer((v,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:v], A[0:v], B[0:cg, 0:v])
            T.writes(C[0:v])
            for r, j in T.grid(cg, v):
                with T.sblock("update"):
                    vj, vr = T.axis.remap("SR", [j, r])  # the conv block's order: spatial, then reduction
                    C[vj] = C[vj] + A[vj // cg * cg + vr] * B[vr, vj]

    def step(A, B, C):  # C + sum_i shuffle_i(A) * B[i], one FMA after another (LLVM contracts them)
        a = A.vload([0], f"float32x{v}")
        acc = C.vload([0], f"float32x{v}")
        for i in range(cg):
            acc = acc + T.Shuffle([a], [(j // cg) * cg + i for j in range(v)]) * B.vload([i, 0], f"float32x{v}")
        return acc

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((v,), "float32", offset_factor=1), B: T.Buffer((cg, v), "float32", offset_factor=1),
             C: T.Buffer((v,), "float32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:v], A[0:v], B[0:cg, 0:v])
            T.writes(C[0:v])
            C[T.ramp(T.int32(0), 1, v)] = step(A, B, C)

    try:
        TensorIntrin.register(name, desc, impl)
    except Exception:
        TensorIntrin.register(name, desc, impl, override=True)
    _registered.add(name)
    return name


def register_intrinsics() -> None:
    """Register the step of every group width and vector width the kernel can be built with (a
    tuning database's records name them in their traces, and reading the records needs them)."""
    for v in (4, 8, 16):
        for cg in (2, 4, 8):
            if cg < v:
                _register_intrin(cg, v)


def plan(spec: ConvSpec) -> dict:
    """Tiling decisions (as conv.plan's: ocb rounded up to whole tiles, padded width owp)."""
    p = plan_tile(spec, spec.tile or _direct_default_tile(spec))
    p["cg"] = spec.c // spec.groups
    return p


def pack_weight(spec: ConvSpec, w: np.ndarray) -> np.ndarray:
    """[OC, cg, KH, KW] -> [OC/v, KH, KW, cg, v] (output channels padded to whole tiles with zeros)."""
    v, p = spec.vec, plan(spec)
    wp = np.zeros((p["ocb"] * v, p["cg"], spec.kh, spec.kw), np.float32)
    wp[:spec.oc] = w
    return np.ascontiguousarray(wp.reshape(p["ocb"], v, p["cg"], spec.kh, spec.kw).transpose(0, 3, 4, 2, 1))


def compute_primfunc(spec: ConvSpec):
    """The unscheduled kernel. Registers its tensor intrinsic: a tuner replaying the default
    schedule's trace on this workload (in this process) needs it."""
    from tvm import te, tirx

    v, p = spec.vec, plan(spec)
    cg, ocb = p["cg"], p["ocb"]
    _register_intrin(cg, v)
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    X, Wt, B, Res = kernel_args(spec, (ocb, spec.kh, spec.kw, cg, v))
    args = [X, Wt, B] + ([Res] if Res is not None else [])
    DY = DX = None
    if spec.shift:  # a folded input shift, read by the pack stage (as the direct kernel's)
        DY, DX = te.placeholder((spec.c,), "int32", name="DY"), te.placeholder((spec.c,), "int32", name="DX")
        args += [DY, DX]
    cb = math.ceil(spec.c / v)
    P = pack_stage(spec, X, v, cb, p["owp"], DY, DX)
    rkh = te.reduce_axis((0, spec.kh), name="rkh")
    rkw = te.reduce_axis((0, spec.kw), name="rkw")
    rci = te.reduce_axis((0, cg), name="rci")
    # output blocks past the channels (a tile's padding) read the last input block, times zero weights
    block = (lambda o: o) if ocb == cb else (lambda o: tirx.min(o, cb - 1))
    Cc = te.compute(
        (spec.n, ocb, spec.oh, p["owp"], v),
        lambda b, o, y, x, j: te.sum(
            P[b, block(o), y * sh + rkh * dh, x * sw + rkw * dw, j // cg * cg + rci] * Wt[o, rkh, rkw, rci, j],
            axis=[rkh, rkw, rci]), name="conv")
    return te.create_prim_func(args + [output_stage(spec, Cc, B, Res)])


def default_schedule(spec: ConvSpec):
    import tvm

    p = plan(spec)
    sch = tvm.s_tir.Schedule(compute_primfunc(spec))
    par = worth_parallel(sch.mod["main"])
    pack, conv, out = sch.get_sblock("pack"), sch.get_sblock("conv"), sch.get_sblock("out")
    per_task = packs_per_task(spec)
    if not per_task:
        schedule_pack_pass(sch, pack, spec, par)
    b, o, y, x, j, rkh, rkw, rci = sch.get_loops(conv)
    oo, oi = sch.split(o, [None, p["ocb_in"]])
    xo, xi = sch.split(x, [None, p["reg_n"]])
    sch.reorder(b, oo, y, xo, rkh, rkw, oi, xi, rci, j)
    outer, xo = parallel_tasks(sch, spec, p, b, oo, y, xo)
    if per_task:
        pack_in_task(sch, pack, outer)
    if par:
        sch.parallel(outer)
    sch.reverse_compute_at(out, xo)
    schedule_tile_ends(sch, sch.decompose_reduction(conv, rkh), out, spec, 2)
    sch.tensorize(rci, _register_intrin(p["cg"], spec.vec))
    sch.unroll(oi)
    sch.unroll(xi)
    return sch


@register
class LaneGroups(ConvKernelType):
    """This module's kernel: grouped convs of cg-channel groups, cg < v dividing v."""

    name, priority = "lane_groups", 5
    supports = staticmethod(supports)
    default_tile = staticmethod(_direct_default_tile)
    candidate_tiles = staticmethod(_direct_candidate_tiles)
    pack_weight = staticmethod(pack_weight)
    compute_primfunc = staticmethod(compute_primfunc)
    default_schedule = staticmethod(default_schedule)

    def ragged(self, spec) -> bool:
        return True
