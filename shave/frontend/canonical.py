"""Exact rewrites applied right after capture, so passes see one form of each idiom.

channel shuffle: reshape (N, C, H, W) -> (N, g, C/g, H, W), permute (0, 2, 1, 3, 4),
reshape back to (N, C, H, W) becomes one channel_permute with the explicit
index list (out[:, j] = x[:, indices[j]]). Pruning can then drop any channel
and keep the rest in their shuffled order.
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph


def _shuffle_indices(in_shape, mid_shape, dims) -> tuple[int, ...] | None:
    n, c = in_shape[:2]
    if len(in_shape) != 4 or len(mid_shape) != 5 or tuple(dims) != (0, 2, 1, 3, 4):
        return None
    if mid_shape[0] != n or mid_shape[1] * mid_shape[2] != c or tuple(mid_shape[3:]) != tuple(in_shape[2:]):
        return None
    g = mid_shape[1]
    return tuple(int(i) for i in np.arange(c).reshape(g, c // g).T.reshape(-1))


def fold_channel_shuffle(graph: Graph) -> Graph:
    for first, perm, last in list(graph.chains("reshape", "permute", "reshape")):
        in_shape = graph.type_of(first.inputs[0]).shape
        idx = _shuffle_indices(in_shape, first.type.shape, perm.attrs["dims"])
        if idx is None or last.type.shape != in_shape:
            continue
        last.op, last.inputs, last.attrs = "channel_permute", [first.inputs[0]], {"indices": idx}
        graph.nodes.remove(first)
        graph.nodes.remove(perm)
    return graph


def canonicalize(graph: Graph) -> Graph:
    return fold_channel_shuffle(graph)
