"""Batched matmul kernels for attention: C[b] = scale * A[b] @ B[b] (or A[b] @ B[b]^T), both
operands computed at run time (the conv kernels need constant weights).

One PrimFunc per shape, in three stages:

1. `pack_b`: B as [batch, N/v, K, v] (v = vector lanes; the columns padded with zeros to a
   whole number of register tiles), so the inner loop loads one contiguous vector of v output
   columns per k; a transposed B (A @ B^T: attention's q @ k^T) is gathered here, no separate
   transpose kernel.
2. `pack_a`: A with its rows padded with zeros to a multiple of the tile's rows (197 tokens
   have no divisor that makes a tile), so the inner loop has no bounds check.
3. `mm`: register tiles of `rows` x (`cols` x v) accumulators (at most 12 of the 16 ymm
   registers with the `cols` B vectors and one broadcast of A), the k loop around them, the
   (batch, row tile) loops fused and parallel; the `out` stage (scale, unpadded store) runs on
   the tile, so the accumulator is a stack array LLVM keeps in registers (conv.STACK_BYTES).

The generic schedule left these matmuls with the reduction innermost and B read with a
stride of N: ViT-B/16's attention matmuls ran at about 1.3 GFLOP/s, half of its time.
"""
from __future__ import annotations

import math


def tile(m: int, n: int, lanes: int, regs: int = 16) -> tuple[int, int]:
    """(rows, cols): the register tile, rows x cols vectors of accumulators. The most
    accumulators that leave room for the cols B vectors and a broadcast in `regs` registers,
    rows chosen to waste the fewest padded rows of A."""
    nb = math.ceil(n / lanes)
    cols = 2 if nb >= 2 else 1
    if regs >= 32 and nb >= 3:
        cols = 3
    best = None
    for rows in range(2, 13):
        if rows * cols + cols + 1 > regs:
            break
        waste = math.ceil(m / rows) * rows - m
        key = (waste, -rows)
        if best is None or key < best[0]:
            best = (key, rows)
    return (best[1] if best else 1), cols


def build_primfunc(batch: int, m: int, n: int, k: int, *, trans_b: bool, scale: float, lanes: int,
                   regs: int = 16):
    """The scheduled PrimFunc: (A [batch, m, k], B [batch, k, n] or [batch, n, k] when trans_b)
    -> C [batch, m, n] = scale * A @ B (B^T)."""
    import tvm
    from tvm import te, tirx

    v = lanes
    rows, cols = tile(m, n, v, regs)
    nb = math.ceil(math.ceil(n / v) / cols) * cols
    mp = math.ceil(m / rows) * rows
    A = te.placeholder((batch, m, k), "float32", name="A")
    B = te.placeholder((batch, n, k) if trans_b else (batch, k, n), "float32", name="B")
    zero = tirx.const(0.0, "float32")

    def b_at(b, j, kk):
        return B[b, j, kk] if trans_b else B[b, kk, j]

    Bp = te.compute((batch, nb, k, v), lambda b, jo, kk, ji: tirx.if_then_else(
        jo * v + ji < n, b_at(b, tirx.min(jo * v + ji, n - 1), kk), zero), name="pack_b")
    Ap = te.compute((batch, mp, k), lambda b, i, kk: tirx.if_then_else(
        i < m, A[b, tirx.min(i, m - 1), kk], zero), name="pack_a")
    r = te.reduce_axis((0, k), name="r")
    C = te.compute((batch, mp, nb * v), lambda b, i, j: te.sum(Ap[b, i, r] * Bp[b, j // v, r, j % v], axis=r),
                   name="mm")
    s = tirx.const(float(scale), "float32")
    out = te.compute((batch, m, n), lambda b, i, j: C[b, i, j] * s, name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([A, B, out]))

    for name in ("pack_b", "pack_a"):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        sch.parallel(sch.fuse(loops[0], loops[1]))
        if name == "pack_b":
            sch.vectorize(loops[-1])
    mm = sch.get_sblock("mm")
    b, i, j, kk = sch.get_loops(mm)
    io, ii = sch.split(i, [None, rows])
    jo, jv = sch.split(j, [None, v])
    joo, joi = sch.split(jo, [None, cols])
    sch.reorder(b, io, joo, kk, ii, joi, jv)
    sch.parallel(sch.fuse(b, io))
    sch.vectorize(jv)
    sch.unroll(ii)
    sch.unroll(joi)
    sch.reverse_compute_at(sch.get_sblock("out"), joo)
    init = sch.decompose_reduction(mm, kk)
    iloops = sch.get_loops(init)
    sch.vectorize(iloops[-1])
    for lp in iloops[-3:-1]:
        sch.unroll(lp)
    for lp in sch.get_loops(sch.get_sblock("out"))[-2:]:
        sch.unroll(lp)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
