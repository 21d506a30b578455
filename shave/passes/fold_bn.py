"""fold_bn: fold inference batch norm into the conv / linear / conv-transpose before it.

    y = (W*x + b - mean) / sqrt(var + eps) * gamma + beta
      = (s*W)*x + (b - mean)*s + beta,      s = gamma / sqrt(var + eps)

The scale applies to the layer's output channels: dim 0 of a conv weight
(also grouped and depthwise), dim 0 of a linear weight, and dim 1 within each
group of a conv-transpose weight (laid out in, out/groups, kh, kw). A BN is
folded only when all its statistics are constants and the layer's output
feeds nothing but the BN.
"""
from __future__ import annotations

import numpy as np

from ..ir import Graph
from .base import Pass, register_pass

FOLDABLE = ("conv2d", "linear", "conv_transpose2d")


def _scaled_weight(layer, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    if layer.op == "conv_transpose2d":
        g = layer.attrs["groups"]
        cin, cout_g = w.shape[:2]
        w = w.reshape(g, cin // g, cout_g, *w.shape[2:]) * s.reshape(g, 1, cout_g, *([1] * (w.ndim - 2)))
        return w.reshape(cin, cout_g, *w.shape[3:])
    return w * s.reshape(-1, *([1] * (w.ndim - 1)))


@register_pass("fold_bn", contract="exact")
class FoldBN(Pass):
    def run(self, graph: Graph) -> Graph:
        for bn in [n for n in graph.nodes if n.op == "batch_norm"]:
            layer = graph.producer(bn.inputs[0])
            if layer is None or layer.op not in FOLDABLE or graph.use_count(layer.name) != 1:
                continue
            if not all(graph.is_param(v) for v in bn.inputs[1:] + layer.inputs[1:]):
                continue
            if layer.op == "linear" and layer.type.ndim != 2:
                continue  # BN normalises dim 1; a linear's features are the last dim
            mean, var, gamma, beta = (graph.params[v].astype(np.float64) for v in bn.inputs[1:])
            s = gamma / np.sqrt(var + bn.attrs["eps"])
            w = graph.params[layer.inputs[1]].astype(np.float64)
            b = graph.params[layer.inputs[2]].astype(np.float64) if len(layer.inputs) > 2 else 0.0
            dtype = graph.params[layer.inputs[1]].dtype
            new_w = graph.add_param(f"{layer.name}.weight.bn", _scaled_weight(layer, w, s).astype(dtype))
            new_b = graph.add_param(f"{layer.name}.bias.bn", ((b - mean) * s + beta).astype(dtype))
            layer.inputs = [layer.inputs[0], new_w, new_b]
            graph.replace_uses(bn.name, layer.name)
            graph.nodes.remove(bn)
        return graph
