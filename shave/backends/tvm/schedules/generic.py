"""Generic CPU rule for every PrimFunc that is not one of shave's own kernels (conv, int8).

Per block at the root of a PrimFunc: the leading spatial loops are fused and
run in parallel (when the block has enough work to pay for the threads: parallel.py), and
the innermost loop of a pure spatial (elementwise, injective) block is split
by the vector width and vectorised when its extent is a multiple of it.
Reductions (pooling, mean, matmul) keep their reduction loops serial inside.
A reduction whose reduced extent is a multiple of the vector width (a global
average pool, a mean over H x W, softmax's sums) is instead split into vector-wide
partial sums (`rfactor`: 4 vectors of them where the extent allows, for independent
adds) reduced at the end: a 96 x 112 x 112 global pool went from 0.82-0.98 ms to
0.085 ms. A function whose scheduling raises keeps its default code.
"""
from __future__ import annotations

import tvm
from tvm import tirx

from .parallel import MIN_PARALLEL_ITERATIONS


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _schedule_block(sch, block, vec):
    blk = sch.get(block)
    loops = sch.get_loops(block)
    if not loops or len(loops) != len(blk.iter_vars):
        return
    # leading spatial iters, in loop order (TE and legalization emit spatial loops first)
    n_spatial = 0
    for iv in blk.iter_vars:
        if iv.iter_type != tirx.IterVar.DataPar:
            break
        n_spatial += 1
    if n_spatial == 0:
        return
    exts = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in exts):
        return
    work = 1
    for e in exts:
        work *= e
    pure = n_spatial == len(loops)
    spatial = loops[:n_spatial]
    if pure and exts[n_spatial - 1] % vec == 0 and exts[n_spatial - 1] >= vec:
        last_o, last_i = sch.split(spatial[-1], [None, vec])
        sch.vectorize(last_i)
        spatial = spatial[:-1] + [last_o]
    if len(spatial) > 1:
        spatial = spatial[:-1]  # keep the innermost loop whole: no div/mod in its indices
    if work >= MIN_PARALLEL_ITERATIONS:
        outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if _extent(sch, outer) and _extent(sch, outer) > 1:
            sch.parallel(outer)


def _vectorize_reduction(sch, block, vec) -> bool:
    """Partial sums in vector lanes for a block whose trailing loops are all reductions, with a
    reduced extent that is a multiple of `vec`; False (schedule unchanged) where it does not apply."""
    blk = sch.get(block)
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in blk.iter_vars]
    n_sp = 0
    while n_sp < len(kinds) and kinds[n_sp] == tirx.IterVar.DataPar:
        n_sp += 1
    if (n_sp == len(kinds) or len(loops) != len(kinds)
            or any(k != tirx.IterVar.CommReduce for k in kinds[n_sp:])):
        return False
    exts = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in exts):
        return False
    total = 1
    for e in exts[n_sp:]:
        total *= e
    width = next((w for w in (vec * 4, vec * 2, vec, vec // 2) if w >= 4 and total % w == 0 and total >= 4 * w),
                 None)
    if width is None:
        return False
    red = loops[n_sp:]
    ro, ri = sch.split(sch.fuse(*red) if len(red) > 1 else red[0], [None, width])
    rf = sch.rfactor(ri, n_sp)
    rloops = sch.get_loops(rf)
    if width > vec:  # several vector accumulators: independent adds
        acc, lanes = sch.split(rloops[-1], [None, vec])
        sch.unroll(acc)
        sch.vectorize(lanes)
    else:
        sch.vectorize(rloops[-1])
    work = 1
    for e in exts:
        work *= e
    if n_sp and work >= MIN_PARALLEL_ITERATIONS:
        sp = rloops[:n_sp]
        outer = sch.fuse(*sp) if len(sp) > 1 else sp[0]
        if _extent(sch, outer) and _extent(sch, outer) > 1:
            sch.parallel(outer)
    return True


def schedule_func(func: tirx.PrimFunc, vec: int) -> tirx.PrimFunc:
    sch = tvm.s_tir.Schedule(func)
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    for block in blocks[:-1]:  # inline padding and elementwise producers into their consumers
        try:
            sch.compute_inline(block)
        except Exception:
            pass
    for block in sch.get_child_blocks(root):
        trial = sch.copy()
        try:
            if _vectorize_reduction(trial, block, vec):
                sch = trial
                continue
        except Exception:
            pass
        _schedule_block(sch, block, vec)
    return sch.mod["main"]


def schedule_generic(mod: tvm.IRModule, vec: int) -> tvm.IRModule:
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs or {}
        if "tirx.is_scheduled" in attrs and int(attrs["tirx.is_scheduled"]) == 1:
            new = func
        else:
            try:
                new = schedule_func(func, vec).with_attr("tirx.is_scheduled", True)
            except Exception:
                new = func
        updates[gv] = new.with_attr("op_pattern", 8)
    for gv, f in updates.items():
        mod[gv] = f
    return mod
