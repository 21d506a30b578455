"""Attention's kernels on CPUs: batched matmuls C[b] = scale * A[b] @ B[b] (or A[b] @ B[b]^T),
both operands computed at run time (the conv kernels need constant weights), and the softmax
between them. The scores are written with their rows padded to whole vectors (-3.4e38 in the
padding, 0 after the softmax), the softmax runs on whole vectors, and the second matmul takes
the padded probabilities with B's missing rows as zeros.

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

from .parallel import worth_parallel


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


def padded(n: int, lanes: int) -> int:
    """n rounded up to whole vectors: the row length of the scores between the kernels."""
    return math.ceil(n / lanes) * lanes


def build_primfunc(batch: int, m: int, n: int, k: int, *, trans_b: bool, scale: float, lanes: int,
                   regs: int = 16, k_valid: int | None = None, pad_out: bool = False):
    """The scheduled PrimFunc: (A [batch, m, k], B [batch, k, n] or [batch, n, k] when trans_b)
    -> C [batch, m, n] = scale * A @ B (B^T).

    `pad_out`: C is [batch, m, padded(n)], the columns past n -3.4e38 (nothing after softmax).
    `k_valid`: B has only k_valid rows (k > k_valid: A's columns past them are padding whose
    products are taken as zero): attention's probabilities, padded rows of the scores, times v."""
    import tvm
    from tvm import te, tirx

    v = lanes
    rows, cols = tile(m, n, v, regs)
    nb = math.ceil(math.ceil(n / v) / cols) * cols
    mp = math.ceil(m / rows) * rows
    kv = k if k_valid is None else k_valid
    A = te.placeholder((batch, m, k), "float32", name="A")
    B = te.placeholder((batch, n, kv) if trans_b else (batch, kv, n), "float32", name="B")
    zero = tirx.const(0.0, "float32")

    def b_at(b, j, kk):
        return B[b, j, kk] if trans_b else B[b, kk, j]

    Bp = te.compute((batch, nb, k, v), lambda b, jo, kk, ji: tirx.if_then_else(
        tirx.all(jo * v + ji < n, kk < kv), b_at(b, tirx.min(jo * v + ji, n - 1), tirx.min(kk, kv - 1)), zero),
        name="pack_b")
    Ap = te.compute((batch, mp, k), lambda b, i, kk: tirx.if_then_else(
        i < m, A[b, tirx.min(i, m - 1), kk], zero), name="pack_a")
    r = te.reduce_axis((0, k), name="r")
    C = te.compute((batch, mp, nb * v), lambda b, i, j: te.sum(Ap[b, i, r] * Bp[b, j // v, r, j % v], axis=r),
                   name="mm")
    s = tirx.const(float(scale), "float32")
    if pad_out:
        low = tirx.const(-3.4e38, "float32")
        out = te.compute((batch, m, padded(n, v)), lambda b, i, j: tirx.if_then_else(j < n, C[b, i, j] * s, low),
                         name="out")
    else:
        out = te.compute((batch, m, n), lambda b, i, j: C[b, i, j] * s, name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([A, B, out]))
    par = worth_parallel(sch.mod["main"])
    for name in ("pack_b", "pack_a"):
        blk = sch.get_sblock(name)
        loops = sch.get_loops(blk)
        if par:
            sch.parallel(sch.fuse(loops[0], loops[1]))
        if name == "pack_b":
            sch.vectorize(loops[-1])
    mm = sch.get_sblock("mm")
    b, i, j, kk = sch.get_loops(mm)
    io, ii = sch.split(i, [None, rows])
    jo, jv = sch.split(j, [None, v])
    joo, joi = sch.split(jo, [None, cols])
    sch.reorder(b, io, joo, kk, ii, joi, jv)
    if par:
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


def softmax_primfunc(rows: int, n: int, lanes: int):
    """Softmax over the last axis of X [rows, n], n a multiple of `lanes` (the scores as the
    first kernel writes them, padded with -3.4e38): per row, vector-wide partial maxima and sums
    and legalize.vector_exp, rows in parallel. TVM's softmax ran a libm expf per element and
    serial reductions (6.5 ms for ViT-B/16's 12 x 197 x 197 scores at one thread)."""
    import tvm
    from tvm import te, tirx

    from .legalize import vector_exp

    v = lanes
    if n % v:
        raise ValueError(f"softmax kernel rows must be whole vectors: {n} % {v}")
    X = te.placeholder((rows, n), "float32", name="X")
    jo = te.reduce_axis((0, n // v), name="jo")
    M8 = te.compute((rows, v), lambda r, i: te.max(X[r, jo * v + i], axis=jo), name="max_v")
    li = te.reduce_axis((0, v), name="li")
    M = te.compute((rows,), lambda r: te.max(M8[r, li], axis=li), name="max")
    E = te.compute((rows, n), lambda r, j: vector_exp(X[r, j] - M[r]), name="exp")
    so = te.reduce_axis((0, n // v), name="so")
    S8 = te.compute((rows, v), lambda r, i: te.sum(E[r, so * v + i], axis=so), name="sum_v")
    si = te.reduce_axis((0, v), name="si")
    S = te.compute((rows,), lambda r: te.sum(S8[r, si], axis=si), name="sum")
    O = te.compute((rows, n), lambda r, j: E[r, j] * (tirx.const(1.0, "float32") / S[r]), name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([X, O]))
    par = worth_parallel(sch.mod["main"])
    out = sch.get_sblock("out")
    r, j = sch.get_loops(out)
    jo_, ji = sch.split(j, [None, v])
    sch.vectorize(ji)
    if par:
        sch.parallel(r)
    for name in ("sum", "sum_v", "exp", "max", "max_v"):
        sch.compute_at(sch.get_sblock(name), r)
    for name in ("max_v", "sum_v"):
        blk = sch.get_sblock(name)
        i, red = sch.get_loops(blk)[-2:]
        sch.reorder(red, i)
        sch.vectorize(i)
        init = sch.decompose_reduction(blk, red)
        sch.vectorize(sch.get_loops(init)[-1])
    e = sch.get_sblock("exp")
    _, ej = sch.get_loops(e)[-2:]
    sch.vectorize(sch.split(ej, [None, v])[1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
