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
