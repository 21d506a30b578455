"""Generic CPU rule for every PrimFunc that is not one of shave's own kernels (conv, int8).

Per block at the root of a PrimFunc: the leading spatial loops are fused and
run in parallel (when the block has enough work to pay for the threads), and
the innermost loop of a pure spatial (elementwise, injective) block is split
by the vector width and vectorised when its extent is a multiple of it.
Reductions (pooling, mean, matmul) keep their reduction loops serial inside.
A function whose scheduling raises keeps its default code.
"""
from __future__ import annotations

import tvm
from tvm import tirx

MIN_PARALLEL_WORK = 4096  # iterations below which a thread launch costs more than it saves


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
    if work >= MIN_PARALLEL_WORK:
        outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        if _extent(sch, outer) and _extent(sch, outer) > 1:
            sch.parallel(outer)


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
