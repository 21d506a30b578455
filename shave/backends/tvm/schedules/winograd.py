"""Winograd F(2x2, 3x3) conv kernel: the same spec, layouts and epilogue as conv.py.

For a dense (groups=1) 3x3 conv with stride 1 and dilation 1, the output is cut
into 2x2 tiles; each needs a 4x4 input patch d, and

    Y_tile = A^T [ sum_c (G g_c G^T) . (B^T d_c B) ] A

so the 36 multiplies per tile, input and output channel of the direct conv
become 16 (2.25x fewer). One PrimFunc, four stages:

1. `vtrans`: V[xi, pb, cb, t, ci] = (B^T d B)[xi] for tile p = pb*reg_n + t
   (tiles of all images numbered together, padded to a multiple of reg_n),
   channel cb*v + ci; the patch is read from X (NCHW or blocked) with the zero
   border, vectorised over the v channels of a block.
2. `gemm`: 16 independent products M[xi] = V[xi] (tiles x C) . U[xi] (C x OC),
   vectorised over v output channels with a register tile of reg_n tiles x
   ocb_in channel blocks (the inner loop of conv.py: one weight vector load per
   block, one broadcast per tile, ocb_in*reg_n FMAs), U = G g G^T transformed and
   packed at compile time to [16, OC/v, C/v, v(in), v(out)].
3. `otrans`: O = A^T m A per tile, written [N, OC/v, 2*TH, 2*TW, v].
4. `out`: bias, residual and activation, written blocked or NCHW.
"""
from __future__ import annotations

import math

import numpy as np

from .conv_spec import DENSE_TILES, ConvSpec, _pick_reg_n, kernel_args, output_stage
from .kernels import ConvKernelType, register
from .parallel import worth_parallel

# F(2, 3) (Lavin & Gray): Y = A^T [(G g G^T) . (B^T d B)] A
_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)
ALPHA = 4  # input tile size
M_OUT = 2  # output tile size
FUSED_WEIGHT_BYTES = 4 << 20  # transformed weights up to this size: the fused schedule
MIN_CHANNELS = 32


def supports(spec: ConvSpec) -> bool:
    """A conv the Winograd kernel computes: dense 3x3, stride 1, dilation 1, no input shift."""
    return (not spec.depthwise and spec.groups == 1 and not spec.shift and (spec.kh, spec.kw) == (3, 3)
            and spec.stride == (1, 1) and spec.dilation == (1, 1))


def use_winograd(spec: ConvSpec) -> bool:
    """The rule: every conv the kernel supports with at least MIN_CHANNELS input and output
    channels (measured faster than the direct kernel on ResNet-18's 3x3 layers, 32-512
    channels, batch 1 and 8; see docs/tvm-notes.md, Winograd)."""
    return supports(spec) and min(spec.c, spec.oc) >= MIN_CHANNELS


def tiles_shape(spec: ConvSpec) -> tuple[int, int]:
    """(tile rows, tile columns) of one image."""
    return math.ceil(spec.oh / M_OUT), math.ceil(spec.ow / M_OUT)


def default_tile(spec: ConvSpec) -> tuple[int, int]:
    """(ocb_in, reg_n) of the GEMM register tile: 2 channel blocks x 4-7 tiles of a tile row."""
    ocb = math.ceil(spec.oc / spec.vec)
    ocb_in = 2 if ocb >= 2 else 1
    return ocb_in, _pick_reg_n(tiles_shape(spec)[1], 7 if ocb_in == 2 else 12)


def candidate_tiles(spec: ConvSpec) -> list[tuple[int, int]]:
    ocb = math.ceil(spec.oc / spec.vec)
    tw = tiles_shape(spec)[1]
    out = [default_tile(spec)]
    for ocb_in, max_reg in DENSE_TILES[32 if spec.regs >= 32 else 16]:
        if ocb_in > ocb:
            continue
        t = (ocb_in, _pick_reg_n(tw, max_reg))
        if t not in out:
            out.append(t)
    return out


def plan(spec: ConvSpec) -> dict:
    v = spec.vec
    if not supports(spec):
        raise ValueError("the Winograd kernel needs a dense 3x3 conv with stride 1 and dilation 1")
    if (spec.in_blocked and spec.c % v) or ((spec.out_blocked or spec.res_blocked) and spec.oc % v):
        raise ValueError("a blocked layout needs channels that are a multiple of the vector width")
    ocb_in, reg_n = spec.tile or default_tile(spec)
    if ocb_in < 1 or reg_n < 1:
        raise ValueError(f"invalid conv tile {spec.tile}")
    th, tw = tiles_shape(spec)
    ocb = math.ceil(math.ceil(spec.oc / v) / ocb_in) * ocb_in
    cb = math.ceil(spec.c / v)
    fused = ALPHA * ALPHA * ocb * cb * v * v * 4 <= FUSED_WEIGHT_BYTES
    return {"ocb": ocb, "ocb_in": ocb_in, "reg_n": reg_n, "cb": cb, "th": th, "txo": math.ceil(tw / reg_n),
            "fused": fused}


def transform_weight(w: np.ndarray) -> np.ndarray:
    """[OC, C, 3, 3] -> U = G g G^T as [16, OC, C] (xi = row * 4 + column), in float64."""
    u = np.einsum("ik,ockl,jl->ijoc", _G, w.astype(np.float64), _G)
    return u.reshape(ALPHA * ALPHA, *w.shape[:2])


def pack_weight(spec: ConvSpec, w: np.ndarray) -> np.ndarray:
    """OIHW -> U packed [16, OC/v, C/v, v(in), v(out)], zero-padded channels."""
    v, p = spec.vec, plan(spec)
    u = np.zeros((ALPHA * ALPHA, p["ocb"] * v, p["cb"] * v), np.float64)
    u[:, :spec.oc, :spec.c] = transform_weight(w)
    u = u.reshape(ALPHA * ALPHA, p["ocb"], v, p["cb"], v)  # xi, O, o, I, i
    return np.ascontiguousarray(u.transpose(0, 1, 3, 4, 2).astype(np.float32))


def _combine(mat_l, vals, mat_r):
    """mat_l @ vals @ mat_r^T for a grid of TE expressions and small integer matrices
    (entries 0, +-1): sums and differences only."""
    rows = []
    for a in range(mat_l.shape[0]):
        row = []
        for b in range(mat_r.shape[0]):
            acc = None
            terms = [(mat_l[a, i] * mat_r[b, j], vals[i][j]) for i in range(mat_l.shape[1])
                     for j in range(mat_r.shape[1]) if mat_l[a, i] * mat_r[b, j] != 0]
            terms.sort(key=lambda ct: ct[0] < 0)  # a positive term first (every row has a +1)
            for coef, term in terms:
                if acc is None:
                    acc = term
                else:
                    acc = acc + term if coef > 0 else acc - term
            row.append(acc)
        rows.append(row)
    return rows


def _select(index, exprs):
    """exprs[index] for a loop variable `index` (folded once the loop is unrolled)."""
    from tvm import tirx

    out = exprs[-1]
    for k in range(len(exprs) - 2, -1, -1):
        out = tirx.Select(index == k, exprs[k], out)
    return out


def compute_primfunc(spec: ConvSpec):
    """The unscheduled PrimFunc. Arguments: X, packed U, bias [OC], (residual), Y."""
    from tvm import te, tirx

    v = spec.vec
    p = plan(spec)
    ocb, cb, reg_n, th, txo = p["ocb"], p["cb"], p["reg_n"], p["th"], p["txo"]
    n, c, h, w = spec.n, spec.c, spec.h, spec.w
    pt, pl = spec.pad[0], spec.pad[1]
    xi_n = ALPHA * ALPHA

    X, U, B, Res = kernel_args(spec, (xi_n, ocb, cb, v, v))
    zero = tirx.const(0.0, "float32")

    def patch_fn(b, ty, to, i, t, y, x, j):
        """Input value at row y, column x of tile (ty, to*reg_n + t)'s 4x4 patch, channel i*v + j."""
        iy, ix = ty * M_OUT + y - pt, (to * reg_n + t) * M_OUT + x - pl
        inside = [iy >= 0, iy < h, ix >= 0, ix < w]
        if spec.in_blocked:
            return tirx.if_then_else(tirx.all(*inside), X[b, i, iy, ix, j], zero)
        ch = i * v + j
        return tirx.if_then_else(tirx.all(ch < c, *inside), X[b, tirx.min(ch, c - 1), iy, ix], zero)

    D = te.compute((n, th, txo, cb, reg_n, ALPHA, ALPHA, v), patch_fn, name="patch")

    def vtrans_fn(e, b, ty, to, i, t, j):
        d = [[D[b, ty, to, i, t, y, x, j] for x in range(ALPHA)] for y in range(ALPHA)]
        vals = _combine(_BT, d, _BT)
        return _select(e, [vals[a][bb] for a in range(ALPHA) for bb in range(ALPHA)])

    V = te.compute((xi_n, n, th, txo, cb, reg_n, v), vtrans_fn, name="vtrans")
    rcb = te.reduce_axis((0, cb), name="rcb")
    rci = te.reduce_axis((0, v), name="rci")
    M = te.compute((xi_n, n, th, txo, ocb, reg_n, v),
                   lambda e, b, ty, to, o, t, j: te.sum(V[e, b, ty, to, rcb, t, rci] * U[e, o, rcb, rci, j],
                                                        axis=[rcb, rci]), name="gemm")

    def otrans_fn(b, o, y, x, j):
        tx = x // M_OUT
        m = [[M[a * ALPHA + bb, b, y // M_OUT, tx // reg_n, o, tx % reg_n, j] for bb in range(ALPHA)]
             for a in range(ALPHA)]
        vals = _combine(_AT, m, _AT)
        return _select((y % M_OUT) * M_OUT + x % M_OUT, [vals[a][bb] for a in range(M_OUT) for bb in range(M_OUT)])

    O = te.compute((n, ocb, th * M_OUT, txo * reg_n * M_OUT, v), otrans_fn, name="otrans")

    return te.create_prim_func([X, U, B] + ([Res] if Res is not None else []) + [output_stage(spec, O, B, Res)])


def default_schedule(spec: ConvSpec):
    import tvm

    sch = tvm.s_tir.Schedule(compute_primfunc(spec))
    _schedule(sch, spec, plan(spec))
    return sch


def _unroll_vectorize(sch, block, n_unroll):
    """Vectorise a block's innermost loop and unroll the n_unroll loops around it."""
    loops = sch.get_loops(block)
    sch.vectorize(loops[-1])
    for lp in loops[-1 - n_unroll:-1]:
        sch.unroll(lp)


def _schedule(sch, spec: ConvSpec, p: dict) -> None:
    par = worth_parallel(sch.mod["main"])
    if p["fused"]:
        _schedule_fused(sch, spec, p, par)
    else:
        _schedule_staged(sch, spec, p, par)


def _gemm_tile(sch, gemm, acc, oi, t, j, first_r):
    """The register tile: unrolled channel blocks x tiles, vectorised lanes, zeroed and stored whole."""
    sch.vectorize(j)
    for lp in (oi, t):
        if lp is not None:
            sch.unroll(lp)
    init = sch.decompose_reduction(gemm, first_r)
    n_tile = (oi is not None) + (t is not None)
    _unroll_vectorize(sch, init, n_tile)
    _unroll_vectorize(sch, acc, n_tile)


def _input_transform(sch, vtrans, patch, e, t, j):
    """Per tile: the 4x4 x v patch (zero border) in registers, then its 16 transformed vectors."""
    if e is not None:
        sch.unroll(e)
    sch.vectorize(j)
    sch.compute_at(patch, t)
    sch.set_scope(patch, 0, "local")
    _unroll_vectorize(sch, patch, 2)


def _output_transform(sch, otrans, o, y, x, j):
    """Per 2x2 output tile: 16 vectors of M in, 4 out."""
    ty, yi = sch.split(y, [None, M_OUT])
    tx, xi = sch.split(x, [None, M_OUT])
    sch.reorder(*[lp for lp in (o, ty, tx, yi, xi, j) if lp is not None])
    sch.unroll(yi)
    sch.unroll(xi)
    sch.vectorize(j)
    sch.set_scope(otrans, 0, "local")
    return ty


def _schedule_fused(sch, spec: ConvSpec, p: dict, par: bool) -> None:
    """Per block of reg_n tiles of a tile row (parallel): its input transform, the 16 GEMMs
    (all of U, kept in L2 by the size rule), the output transform and the epilogue; V, M
    and O are per-block buffers that stay in cache."""
    patch, vtrans, gemm = sch.get_sblock("patch"), sch.get_sblock("vtrans"), sch.get_sblock("gemm")
    otrans, out = sch.get_sblock("otrans"), sch.get_sblock("out")
    acc = sch.cache_write(gemm, 0, "local")
    loops = sch.get_loops(out)
    b, o, y, x = loops[:4]
    ty, yi = sch.split(y, [None, M_OUT])
    to, xr = sch.split(x, [None, M_OUT * p["reg_n"]])
    sch.reorder(b, ty, to, o, yi, xr)
    outer = sch.fuse(b, ty, to)
    if par:
        sch.parallel(outer)
    if spec.out_blocked:
        sch.vectorize(loops[-1])
    sch.compute_at(otrans, outer)
    sch.compute_at(acc, outer)
    v, ocb_in, reg_n = spec.vec, p["ocb_in"], p["reg_n"]
    lp = _new_loops(sch, acc, [("e", ALPHA * ALPHA), ("o", p["ocb"]), ("t", reg_n), ("j", v)])
    oo, oi = sch.split(lp["o"], [None, ocb_in]) if lp["o"] is not None else (None, None)
    sch.compute_at(gemm, oo if oo is not None else lp["e"])
    gl = _new_loops(sch, gemm, [("oi", ocb_in), ("t", reg_n), ("j", v), ("rcb", p["cb"]), ("rci", v)])
    sch.reorder(*[gl[k] for k in ("rcb", "rci", "oi", "t", "j") if gl[k] is not None])
    _gemm_tile(sch, gemm, acc, gl["oi"], gl["t"], gl["j"], gl["rcb"] or gl["rci"])
    sch.set_scope(acc, 0, "local")
    sch.compute_at(vtrans, outer)
    sch.set_scope(vtrans, 0, "local")
    vl = _new_loops(sch, vtrans, [("e", ALPHA * ALPHA), ("i", p["cb"]), ("t", reg_n), ("j", v)])
    sch.reorder(*[vl[k] for k in ("i", "t", "e", "j") if vl[k] is not None])
    _input_transform(sch, vtrans, patch, vl["e"], vl["t"] or vl["i"] or outer, vl["j"])
    ol = _new_loops(sch, otrans, [("o", math.ceil(spec.oc / v)), ("y", M_OUT), ("x", M_OUT * reg_n), ("j", v)])
    _output_transform(sch, otrans, ol["o"], ol["y"], ol["x"], ol["j"])


def _new_loops(sch, block, dims):
    """{name: loop} of the loops compute_at made for `block` over its innermost block
    vars `dims` ([(name, extent)] in order); None for unit extents (no loop made)."""
    made = [d for d in dims if d[1] > 1]
    loops = sch.get_loops(block)[-len(made):] if made else []
    out = {name: None for name, _ in dims}
    for (name, ext), loop in zip(made, loops):
        assert 1 < int(sch.get(loop).extent) <= ext, (name, ext)
        out[name] = loop
    return out


def _schedule_staged(sch, spec: ConvSpec, p: dict, par: bool) -> None:
    """Each of the 16 GEMMs over all tiles before the next (U's panel stays in L1/L2; V and M
    go out to memory), the transforms as parallel passes of their own."""
    patch, vtrans, gemm = sch.get_sblock("patch"), sch.get_sblock("vtrans"), sch.get_sblock("gemm")
    otrans, out = sch.get_sblock("otrans"), sch.get_sblock("out")
    e, b, ty, to, o, t, j, rcb, rci = sch.get_loops(gemm)
    oo, oi = sch.split(o, [None, p["ocb_in"]])
    sch.reorder(e, oo, b, ty, to, rcb, rci, oi, t, j)
    outer = sch.fuse(e, oo, b, ty, to)
    if par:
        sch.parallel(outer)
    acc = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(acc, outer)
    _gemm_tile(sch, gemm, acc, oi, t, j, rcb)
    e, b, ty, to, i, t, j = sch.get_loops(vtrans)
    sch.reorder(b, ty, to, i, t, e, j)
    if par:
        sch.parallel(sch.fuse(b, ty, to, i))
    _input_transform(sch, vtrans, patch, e, t, j)
    b, o, y, x, j = sch.get_loops(otrans)
    ty = _output_transform(sch, otrans, o, y, x, j)
    row = sch.fuse(b, o, ty)
    if par:
        sch.parallel(row)
    sch.reverse_compute_at(out, row)
    if spec.out_blocked:
        sch.vectorize(sch.get_loops(out)[-1])


@register
class Winograd(ConvKernelType):
    """This module's kernel, chosen for the convs `use_winograd` accepts; whole channel blocks only."""

    name, priority = "winograd", 10
    supports = staticmethod(supports)
    chosen = staticmethod(use_winograd)
    default_tile = staticmethod(default_tile)
    candidate_tiles = staticmethod(candidate_tiles)
    pack_weight = staticmethod(pack_weight)
    compute_primfunc = staticmethod(compute_primfunc)
    default_schedule = staticmethod(default_schedule)
