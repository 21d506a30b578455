"""Physically remove channels: slice weights, fix attributes, re-infer types."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ...errors import PassError
from ...ir import Graph, infer_types


def removal_map(units) -> dict:
    """dim -> sorted indices to drop, merged over units."""
    out = defaultdict(list)
    for u in units:
        for d, idx in u.indices.items():
            out[d].extend(int(i) for i in idx)
    return {d: np.array(sorted(set(v)), dtype=np.int64) for d, v in out.items()}


def _survivors(size: int, removed) -> np.ndarray:
    return np.flatnonzero(_keep_mask(size, removed))


def remove_channels(graph: Graph, units) -> Graph:
    """Remove the channels of `units` (from dependency.analyse) from `graph` in place."""
    removed = removal_map(units)
    old_types = {n.name: n.type for n in graph.nodes}
    for (value, axis), idx in removed.items():
        if graph.is_param(value):
            graph.set_param(value, np.delete(graph.params[value], idx, axis=axis))

    for n in graph.nodes:
        out_rm = {axis: idx for (v, axis), idx in removed.items() if v == n.name}
        if n.op in ("conv2d", "conv_transpose2d") and n.attrs["groups"] > 1 and 1 in out_rm:
            cout = n.type.shape[1]
            per_group = cout // n.attrs["groups"]
            if len(out_rm[1]) % per_group:
                raise PassError(f"node {n.name!r}: removing {len(out_rm[1])} channels breaks its groups")
            n.attrs = dict(n.attrs, groups=n.attrs["groups"] - len(out_rm[1]) // per_group)
        elif n.op == "reshape" and out_rm:
            shape = list(n.attrs["shape"])
            for axis, idx in out_rm.items():
                shape[axis] -= len(idx)
            n.attrs = dict(n.attrs, shape=tuple(shape))
        elif n.op == "slice":
            axis = n.attrs["axis"]
            in_rm = removed.get((n.inputs[0], axis))
            if in_rm is not None or axis in out_rm:
                start, end = n.attrs["start"], n.attrs["end"]
                kept_before = start - int(np.sum(in_rm < start)) if in_rm is not None else start
                new_len = (end - start) - len(out_rm.get(axis, ()))
                n.attrs = dict(n.attrs, start=kept_before, end=kept_before + new_len)
        elif n.op == "channel_permute":
            in_rm = removed.get((n.inputs[0], 1), np.array([], dtype=np.int64))
            old = np.asarray(n.attrs["indices"])
            keep_out = _survivors(len(old), out_rm.get(1, []))
            rank = np.cumsum(_keep_mask(len(old), in_rm)) - 1
            n.attrs = dict(n.attrs, indices=tuple(int(rank[old[j]]) for j in keep_out))
        elif n.op == "shift" and 1 in out_rm:  # each surviving channel keeps its own shift
            keep = _survivors(len(n.attrs["shifts"]), out_rm[1])
            n.attrs = dict(n.attrs, shifts=tuple(n.attrs["shifts"][j] for j in keep))
        elif n.op == "channel_shuffle" and 1 in out_rm:  # no longer a shuffle: the permutation that is left
            from ...ir.opset_rewrites import shuffle_indices

            in_rm = removed.get((n.inputs[0], 1), np.array([], dtype=np.int64))
            old = np.asarray(shuffle_indices(n.type.shape[1], n.attrs["groups"]))
            rank = np.cumsum(_keep_mask(len(old), in_rm)) - 1
            n.op, n.attrs = "channel_permute", {"indices": tuple(int(rank[old[j]]) for j in _survivors(len(old), out_rm[1]))}
    infer_types(graph)
    for n in graph.nodes:  # every dim must have shrunk by exactly what was removed from it
        want = tuple(s - len(removed.get((n.name, a), ())) for a, s in enumerate(old_types[n.name].shape))
        if n.type.shape != want:
            raise PassError(f"pruning left node {n.name!r} ({n.op}) with shape {n.type.shape}, expected {want}")
    return graph


def _keep_mask(size: int, removed) -> np.ndarray:
    keep = np.ones(size, dtype=bool)
    keep[np.asarray(removed, dtype=np.int64)] = False
    return keep
