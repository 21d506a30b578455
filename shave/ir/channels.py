"""Channel rules: how an op's input dims relate to its output dims, index by index.

Pruning needs to know, for every op, which indices of which input dims travel
to which indices of which output dims (and which weight dims are filters or
consume channels). An op's rule returns a ChannelRule for one node. Dims are
named by End = (slot, axis): slot is the input position, or OUT for the
node's output. A coupling (a, b, ia, ib) says index ia[k] of dim a and index
ib[k] of dim b are the same channel: removing one removes the other.

Ops without a rule cannot be pruned through: the pruning analysis names them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OUT = -1
End = tuple  # (slot, axis)


@dataclass
class ChannelRule:
    couplings: list = field(default_factory=list)  # (End, End, np.ndarray, np.ndarray)
    produces: list = field(default_factory=list)  # weight dims whose slices are filters
    reduces: list = field(default_factory=list)  # weight dims that consume (sum over) channels
    frozen: list = field(default_factory=list)  # dims whose indices must all stay

    def same(self, a: End, b: End, n: int) -> "ChannelRule":
        idx = np.arange(n)
        self.couplings.append((a, b, idx, idx))
        return self

    def pairs(self, a: End, b: End, ia, ib) -> "ChannelRule":
        self.couplings.append((a, b, np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)))
        return self


def elementwise(in_types, out, attrs) -> ChannelRule:
    """Inputs broadcast against the output (aligned from the right): a dim of
    full size carries the same channels; a size-1 dim carries none."""
    r = ChannelRule()
    for slot, t in enumerate(in_types):
        offset = out.ndim - t.ndim
        for axis, size in enumerate(t.shape):
            if size == out.shape[axis + offset] and size > 1:
                r.same((slot, axis), (OUT, axis + offset), size)
    return r


def repeat(in_types, out, attrs) -> ChannelRule:
    """Tiling (torch's repeat): output index i of an axis is input index i % size."""
    r = ChannelRule()
    t = in_types[0]
    offset = out.ndim - t.ndim
    for axis, size in enumerate(t.shape):
        if size > 1:
            idx = np.arange(out.shape[axis + offset])
            r.pairs((0, axis), (OUT, axis + offset), idx % size, idx)
    return r


def leading(n_axes: int):
    """Ops that keep their first n axes (batch, channel) and change the rest (pooling)."""

    def rule(in_types, out, attrs) -> ChannelRule:
        r = ChannelRule()
        for axis in range(n_axes):
            r.same((0, axis), (OUT, axis), out.shape[axis])
        return r

    return rule


def _groups(r: ChannelRule, x_end, out_end, cin: int, cout: int, g: int) -> None:
    """A grouped conv: group k's input and output channels go together (whole groups)."""
    cin_g, cout_g = cin // g, cout // g
    for k in range(g):
        ins = np.arange(k * cin_g, (k + 1) * cin_g)
        outs = np.arange(k * cout_g, (k + 1) * cout_g)
        ia, ib = np.repeat(ins, cout_g), np.tile(outs, cin_g)
        r.pairs(x_end, out_end, ia, ib)


def conv2d(in_types, out, attrs) -> ChannelRule:
    x, w = in_types[0], in_types[1]
    r = ChannelRule().same((0, 0), (OUT, 0), out.shape[0])
    r.same((1, 0), (OUT, 1), w.shape[0])
    r.produces.append((1, 0))
    if len(in_types) > 2:
        r.same((2, 0), (OUT, 1), w.shape[0])
    g = attrs["groups"]
    if g == 1:
        r.same((0, 1), (1, 1), x.shape[1])
        r.reduces.append((1, 1))
    else:
        _groups(r, (0, 1), (OUT, 1), x.shape[1], w.shape[0], g)
    return r


def conv_transpose2d(in_types, out, attrs) -> ChannelRule:
    x, w = in_types[0], in_types[1]
    g = attrs["groups"]
    r = ChannelRule().same((0, 0), (OUT, 0), out.shape[0])
    if len(in_types) > 2:
        r.same((2, 0), (OUT, 1), out.shape[1])
    if g == 1:
        r.same((0, 1), (1, 0), x.shape[1])
        r.reduces.append((1, 0))
        r.same((1, 1), (OUT, 1), w.shape[1])
        r.produces.append((1, 1))
    else:  # whole groups go; the weight's rows are the input channels, its columns the channels within a group
        _groups(r, (0, 1), (OUT, 1), x.shape[1], out.shape[1], g)
        r.same((0, 1), (1, 0), x.shape[1])
        r.frozen += [(1, 1)]
    return r


def linear(in_types, out, attrs) -> ChannelRule:
    x, w = in_types[0], in_types[1]
    r = ChannelRule()
    for axis in range(x.ndim - 1):
        r.same((0, axis), (OUT, axis), x.shape[axis])
    r.same((0, x.ndim - 1), (1, 1), w.shape[1])
    r.reduces.append((1, 1))
    r.same((1, 0), (OUT, out.ndim - 1), w.shape[0])
    r.produces.append((1, 0))
    if len(in_types) > 2:
        r.same((2, 0), (OUT, out.ndim - 1), w.shape[0])
    return r


def batch_norm(in_types, out, attrs) -> ChannelRule:
    r = elementwise(in_types[:1], out, attrs)
    for slot in range(1, 5):
        r.same((slot, 0), (OUT, 1), out.shape[1])
    return r


def layer_norm(in_types, out, attrs) -> ChannelRule:
    """Normalised dims are frozen: dropping a channel would change the statistics."""
    r = elementwise(in_types[:1], out, attrs)
    k = len(attrs["normalized_shape"])
    for slot in (1, 2):
        for axis in range(k):
            r.same((slot, axis), (OUT, out.ndim - k + axis), out.shape[out.ndim - k + axis])
    r.frozen += [(OUT, out.ndim - k + axis) for axis in range(k)]
    return r


def softmax(in_types, out, attrs) -> ChannelRule:
    r = elementwise(in_types, out, attrs)
    r.frozen.append((OUT, attrs["axis"]))
    return r


def mean(in_types, out, attrs) -> ChannelRule:
    r = ChannelRule()
    kept = [a for a in range(in_types[0].ndim) if a not in attrs["axes"]]
    for pos, axis in enumerate(kept):
        r.same((0, axis), (OUT, axis if attrs["keepdim"] else pos), in_types[0].shape[axis])
    return r


def concat(in_types, out, attrs) -> ChannelRule:
    r = ChannelRule()
    ax, offset = attrs["axis"], 0
    for slot, t in enumerate(in_types):
        for axis, size in enumerate(t.shape):
            if axis == ax:
                r.pairs((slot, axis), (OUT, axis), np.arange(size), offset + np.arange(size))
            else:
                r.same((slot, axis), (OUT, axis), size)
        offset += t.shape[ax]
    return r


def slice_(in_types, out, attrs) -> ChannelRule:
    r = ChannelRule()
    for axis, size in enumerate(out.shape):
        if axis == attrs["axis"]:
            j = np.arange(size)
            r.pairs((0, axis), (OUT, axis), attrs["start"] + attrs["step"] * j, j)
            if attrs["step"] != 1:
                r.frozen.append((OUT, axis))
        else:
            r.same((0, axis), (OUT, axis), size)
    return r


def permute(in_types, out, attrs) -> ChannelRule:
    r = ChannelRule()
    for j, d in enumerate(attrs["dims"]):
        r.same((0, d), (OUT, j), out.shape[j])
    return r


def channel_permute(in_types, out, attrs) -> ChannelRule:
    r = ChannelRule()
    for axis, size in enumerate(out.shape):
        if axis == 1:
            r.pairs((0, 1), (OUT, 1), np.asarray(attrs["indices"]), np.arange(size))
        else:
            r.same((0, axis), (OUT, axis), size)
    return r


def reshape_groups(src: tuple, dst: tuple) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal size into runs of consecutive axes with equal products."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        gi, gj = [i] if i < len(src) else [], [j] if j < len(dst) else []
        pi = src[i] if i < len(src) else 1
        pj = dst[j] if j < len(dst) else 1
        i, j = i + bool(gi), j + bool(gj)
        while pi != pj:
            if pi < pj:
                gi.append(i)
                pi *= src[i]
                i += 1
            else:
                gj.append(j)
                pj *= dst[j]
                j += 1
        groups.append((gi, gj))
    return groups


def reshape(in_types, out, attrs) -> ChannelRule:
    """Axes kept as they are carry their channels. When several input axes merge
    into one output axis (flatten), each input index maps to the block of output
    indices holding it. An input axis split over several output axes couples
    every index to all others (so it is in effect not prunable)."""
    src, dst = in_types[0].shape, out.shape
    r = ChannelRule()
    for gi, gj in reshape_groups(src, dst):
        gi = [a for a in gi if src[a] > 1] or gi[:1]
        gj = [b for b in gj if dst[b] > 1] or gj[:1]
        if not gi or not gj:
            continue
        if len(gi) == 1 and len(gj) == 1:
            r.same((0, gi[0]), (OUT, gj[0]), src[gi[0]])
        elif len(gj) == 1:  # merge: each input axis's coordinate of every output element
            coords = np.indices([src[a] for a in gi]).reshape(len(gi), -1)
            for k, a in enumerate(gi):
                r.pairs((0, a), (OUT, gj[0]), coords[k], np.arange(coords.shape[1]))
        else:
            for a in gi:
                r.frozen.append((0, a))
            for b in gj:
                r.frozen.append((OUT, b))
    return r
