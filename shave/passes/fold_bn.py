"""fold_bn: fold inference batch norm into the conv / linear / conv-transpose before it.

    y = (W*x + b - mean) / sqrt(var + eps) * gamma + beta
      = (s*W)*x + (b - mean)*s + beta,      s = gamma / sqrt(var + eps)

Any layer in the op registry (role "layer") folds: the scale applies to the
weight's output-channel axis (its `out_axis` trait: dim 0 of a conv weight,
also grouped and depthwise, and of a linear weight; dim 1 within each group
of a conv-transpose weight, laid out in, out/groups, kh, kw). A BN is folded
only when all its statistics are constants and the layer's output feeds
nothing but the BN.
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
    def run(self, graph: Graph) -> Graph:
        for bn in [n for n in graph.nodes if n.op == "batch_norm"]:
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
        return graph
