"""fold_bn: fold inference batch norm into the conv / linear / conv-transpose before it.

    y = (W*x + b - mean) / sqrt(var + eps) * gamma + beta
      = (s*W)*x + (b - mean)*s + beta,      s = gamma / sqrt(var + eps)

A batch norm that follows something else (the Keras order conv -> ReLU -> BN)
folds forward into the layer that reads it, where that is exact: a conv2d
without padding (padding would see zeros where the unfolded graph sees the
BN's shift) or a 2-d linear, reading the BN as its only input:

    W (s*x + t) + b = (W*s) x + (b + W t)       (s, t per input channel)

Any layer in the op registry (role "layer") folds backwards: the scale applies to the
weight's output-channel axis (its `out_axis` trait: dim 0 of a conv weight,
also grouped and depthwise, and of a linear weight; dim 1 within each group
of a conv-transpose weight, laid out in, out/groups, kh, kw). A BN is folded
only when all its statistics are constants and the layer's output feeds
nothing but the BN. `FoldBN(only=names)` folds only the named batch norms
(recovery folds the ones it inserted for training).
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph, get_op
from .base import Pass, register_pass


def _scaled_weight(layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """w with output channel k scaled by s[k]; with groups, axis `out_axis` indexes the channels within
    each group and the groups are stacked along axis 0."""
    axis = get_op(layer.op).out_axis
    if axis == 0:
        return w * s.reshape(-1, *([1] * (w.ndim - 1)))
    g = layer.attrs.get("groups", 1)
    grouped = w.reshape(g, w.shape[0] // g, *w.shape[1:])
    shape = [g] + [1] * (w.ndim)
    shape[axis + 1] = w.shape[axis]
    return (grouped * s.reshape(shape)).reshape(w.shape)


@register_pass("fold_bn", contract="exact")
class FoldBN(Pass):
    def __init__(self, only=None):
        self.only = None if only is None else frozenset([only] if isinstance(only, str) else only)

    def _norms(self, graph: Graph) -> list:
        return [n for n in graph.nodes if n.op == "batch_norm" and (self.only is None or n.name in self.only)]

    def run(self, graph: Graph) -> Graph:
        for bn in self._norms(graph):
            layer = graph.producer(bn.inputs[0])
            if layer is None or get_op(layer.op).role != "layer" or graph.use_count(layer.name) != 1:
                continue
            if not all(graph.is_param(v) for v in bn.inputs[1:] + layer.inputs[1:]):
                continue
            if layer.op == "linear" and layer.type.ndim != 2:
                continue  # BN normalises dim 1; a linear's features are the last dim
            mean, var, gamma, beta = (graph.params[v].astype(np.float64) for v in bn.inputs[1:])
            s = gamma / np.sqrt(var + bn.attrs["eps"])
            op = get_op(layer.op)
            w = graph.params[layer.inputs[op.weight]].astype(np.float64)
            b = graph.params[layer.inputs[op.bias]].astype(np.float64) if len(layer.inputs) > op.bias else 0.0
            dtype = graph.params[layer.inputs[op.weight]].dtype
            new_w = graph.add_param(f"{layer.name}.weight.bn", _scaled_weight(layer, w, s).astype(dtype))
            new_b = graph.add_param(f"{layer.name}.bias.bn", ((b - mean) * s + beta).astype(dtype))
            layer.inputs = layer.inputs[:op.weight] + [new_w, new_b]
            graph.replace_uses(bn.name, layer.name)
            graph.nodes.remove(bn)
        for bn in self._norms(graph):
            _fold_forward(graph, bn)
        return graph


def _fold_forward(graph: Graph, bn) -> None:
    """Fold `bn` into the one conv2d (unpadded) or 2-d linear that reads it, when exact."""
    users = graph.users(bn.name)
    if len(users) != 1 or graph.use_count(bn.name) != 1 or users[0].inputs[0] != bn.name:
        return
    layer = users[0]
    if layer.op == "conv2d":
        if any(layer.attrs["padding"]):
            return
    elif layer.op != "linear" or graph.type_of(bn.name).ndim != 2:
        return
    if not all(graph.is_param(v) for v in bn.inputs[1:] + layer.inputs[1:]):
        return
    mean, var, gamma, beta = (graph.params[v].astype(np.float64) for v in bn.inputs[1:])
    s = gamma / np.sqrt(var + bn.attrs["eps"])
    t = beta - mean * s
    w = graph.params[layer.inputs[1]].astype(np.float64)
    dtype = graph.params[layer.inputs[1]].dtype
    b = graph.params[layer.inputs[2]].astype(np.float64) if len(layer.inputs) > 2 else np.zeros(w.shape[0])
    g = layer.attrs.get("groups", 1)
    cin_g = w.shape[1]
    # input channel of weight [o, c]: the group of output o, then c within it
    chan = (np.arange(w.shape[0]) // (w.shape[0] // g))[:, None] * cin_g + np.arange(cin_g)[None, :]
    extra = (1,) * (w.ndim - 2)
    new_w = w * s[chan].reshape(*chan.shape, *extra)
    new_b = b + (w * t[chan].reshape(*chan.shape, *extra)).reshape(w.shape[0], -1).sum(1)
    layer.inputs = [bn.inputs[0], graph.add_param(f"{layer.name}.weight.bn", new_w.astype(dtype)),
                    graph.add_param(f"{layer.name}.bias.bn", new_b.astype(dtype))]
    graph.nodes.remove(bn)
