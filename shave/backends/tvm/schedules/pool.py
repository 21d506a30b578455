"""Pooling on the blocked layout ([N, C/v, H, W, v]), for the pools schedules/fusion.py keeps
between conv kernels (SqueezeNet's, GoogLeNet's and Inception's max pools, Inception's and
DenseNet's average pools).

Each output is the max (or the mean) of its window's taps written out (no reduction loop): a
pure spatial compute whose innermost loop runs over the v lanes of a channel block, which the
generic schedule vectorises (TVM's NCHW pool on a 54- or 27-wide row did not vectorise at all).
Taps outside the input read -inf for a max and 0 for a mean (only where a window can reach the
padding); a mean divides by the whole window (torch's count_include_pad, fusion.py keeps only
the pools where that is torch's divisor).
"""
from __future__ import annotations


def blocked_pool_primfunc(kind: str, in_shape: tuple, out_hw: tuple, kernel: tuple, stride: tuple,
                          pad: tuple, dilation: tuple, dtype: str = "float32"):
    """out[n, c, y, x, l] = max (kind "max") or mean ("avg") over the window of
    X[n, c, y * sh + i * dh - pt, x * sw + j * dw - pl, l] for X of `in_shape` [N, C/v, H, W, v];
    `pad` is (top, left, bottom, right)."""
    from tvm import te, tirx

    n, cb, h, w, v = in_shape
    oh, ow = out_hw
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    pt, pl = pad[0], pad[1]
    X = te.placeholder(in_shape, dtype, name="X")
    outside = tirx.min_value(dtype) if kind == "max" else tirx.const(0, dtype)
    # which taps can fall outside: a row tap i is always inside when every output row's reads are
    edge_y = [not (i * dh - pt >= 0 and (oh - 1) * sh + i * dh - pt < h) for i in range(kh)]
    edge_x = [not (j * dw - pl >= 0 and (ow - 1) * sw + j * dw - pl < w) for j in range(kw)]

    def tap(b, c, y, x, lane, i, j):
        iy, ix = y * sh + i * dh - pt, x * sw + j * dw - pl
        conds = ([iy >= 0, iy < h] if edge_y[i] else []) + ([ix >= 0, ix < w] if edge_x[j] else [])
        if not conds:
            return X[b, c, iy, ix, lane]
        val = X[b, c, tirx.max(tirx.min(iy, h - 1), 0), tirx.max(tirx.min(ix, w - 1), 0), lane]
        return tirx.if_then_else(tirx.all(*conds), val, outside)

    def fn(b, c, y, x, lane):
        acc = None
        for i in range(kh):
            for j in range(kw):
                t = tap(b, c, y, x, lane, i, j)
                acc = t if acc is None else (tirx.max(acc, t) if kind == "max" else acc + t)
        return acc if kind == "max" else acc * tirx.const(1.0 / (kh * kw), dtype)

    out = te.compute((n, cb, oh, ow, v), fn, name=f"{kind}_pool")
    return te.create_prim_func([X, out])


def blocked_global_mean_primfunc(in_shape: tuple):
    """out[n, c, 0, 0, l] = the mean of X[n, c, :, :, l] for X of `in_shape` [N, C/v, H, W, v] (the
    squeeze of an SE block, a classifier's global pool), scheduled: the lanes of a channel block
    in a vector, summed over the H*W positions into (up to) 4 independent vector accumulators.
    TVM's reduction on this layout vectorised across positions v floats apart, or not at all
    (MobileNetV3-Small's 16 x 56 x 56 pool took 19 us, this 2-3)."""
    import tvm
    from tvm import te

    from .parallel import MIN_PARALLEL_ITERATIONS

    n, cb, h, w, v = in_shape
    hw = h * w
    parts = next(p for p in (4, 2, 1) if w % p == 0)
    X = te.placeholder(in_shape, "float32", name="X")
    ry, rx = te.reduce_axis((0, h), name="ry"), te.reduce_axis((0, w // parts), name="rx")
    partial = te.compute((n, cb, parts, v), lambda b, c, p, lane: te.sum(
        X[b, c, ry, rx * parts + p, lane], axis=[ry, rx]), name="partial")
    q = te.reduce_axis((0, parts), name="q")
    total = te.compute((n, cb, 1, 1, v), lambda b, c, y, x, lane: te.sum(partial[b, c, q, lane], axis=q),
                       name="total")
    out = te.compute((n, cb, 1, 1, v), lambda *i: total(*i) * tvm.tirx.const(1.0 / hw, "float32"), name="mean")
    sch = tvm.s_tir.Schedule(te.create_prim_func([X, out]))
    pb, tb, ob = sch.get_sblock("partial"), sch.get_sblock("total"), sch.get_sblock("mean")
    b, c, y, x, lane = sch.get_loops(ob)
    bc = sch.fuse(b, c)
    if n * cb * hw * v >= MIN_PARALLEL_ITERATIONS and n * cb > 1:
        sch.parallel(bc)
    sch.compute_at(tb, bc)
    sch.compute_at(pb, bc)
    # partial: p, lane, ry, rx -> ry, rx, p (unrolled), lane (vector)
    loops = sch.get_loops(pb)[1:]  # (p,) lane, ry, rx: a single part's loop is dropped by compute_at
    *lane_p, r_y, r_x = loops
    sch.reorder(r_y, r_x, *lane_p)
    if len(lane_p) == 2:
        sch.unroll(lane_p[0])
    sch.vectorize(lane_p[-1])
    sch.decompose_reduction(pb, r_y)
    tl = [lp for lp in sch.get_loops(tb)[1:] if sch.get(lp).extent.value > 1]  # lanes (, parts)
    sch.vectorize(tl[0])  # (the sum over the parts inside, unrolled)
    if len(tl) == 2:
        sch.unroll(tl[1])
    sch.vectorize(sch.get_loops(ob)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def blocked_gate_primfunc(in_shape: tuple, channels: int):
    """out = X * G per channel, for X of `in_shape` [N, C/v, H, W, v] and G [N, channels] (an SE
    block's scale), scheduled: G is laid out as blocks first (zero in the padding lanes past
    `channels`, conv_spec.blocked_shape), then each output vector is one multiply. (TVM fused
    the padding of G into the multiply: a select per element.)"""
    import tvm
    from tvm import te, tirx

    from .parallel import MIN_PARALLEL_ITERATIONS

    n, cb, h, w, v = in_shape
    X = te.placeholder(in_shape, "float32", name="X")
    G = te.placeholder((n, channels), "float32", name="G")
    gb = te.compute((n, cb, v), lambda b, c, lane: tirx.if_then_else(
        c * v + lane < channels, G[b, tirx.min(c * v + lane, channels - 1)], tirx.const(0.0, "float32")),
        name="gate_blocks")
    out = te.compute(in_shape, lambda b, c, y, x, lane: X[b, c, y, x, lane] * gb[b, c, lane], name="gated")
    sch = tvm.s_tir.Schedule(te.create_prim_func([X, G, out]))
    b, c, y, x, lane = sch.get_loops(sch.get_sblock("gated"))
    sch.vectorize(lane)
    if n * cb * h * w * v >= MIN_PARALLEL_ITERATIONS and n * cb * h > 1:
        sch.parallel(sch.fuse(b, c, y))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
