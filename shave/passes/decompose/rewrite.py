"""Replace one conv2d / linear node by its chain of factor layers, in place.

The new nodes are ordinary conv2d / linear nodes (depthwise factors are
conv2d with groups), named after the original (`layer1.0.conv1.v`,
`layer1.0.conv1.u`, ...) and keeping its `source`, so an error in a factor
still points at the user's line. Only the last factor takes the original
bias: a batch norm after the layer then folds into it as before.
"""
from __future__ import annotations

import numpy as np

from ...ir import Graph, Node, get_op
from .methods import Layer, factor_layers


def replace_with_factors(graph: Graph, node: Node, method: str, layer: Layer, rank,
                         weights: list[np.ndarray]) -> list[Node]:
    """Put the factor layers (weights from methods.factor_weights) where `node` was; returns them."""
    dtype = graph.params[node.inputs[1]].dtype
    bias = node.inputs[2:3]
    prev, made = node.inputs[0], []
    specs = factor_layers(method, layer, rank)
    at = graph.nodes.index(node)
    for i, ((suffix, attrs), w) in enumerate(zip(specs, weights)):
        last = i == len(specs) - 1
        w_name = graph.add_param(f"{node.name}.{suffix}.weight", w.astype(dtype))
        inputs = [prev, w_name] + (bias if last else [])
        attrs = dict(attrs) if attrs is not None else {}
        new = Node(graph.fresh_name(f"{node.name}.{suffix}"), node.op, inputs, attrs, None, node.source)
        new.type = get_op(new.op).infer([graph.type_of(v) for v in inputs], attrs)
        graph.nodes.insert(at + i, new)
        made.append(new)
        prev = new.name
    graph.nodes.remove(node)
    graph.replace_uses(node.name, prev)
    return made
