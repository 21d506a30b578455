"""Per-layer speed check of Quantize: keep a layer int8 only where its compiled kernel is faster.

For each quantized layer, the float32 layer alone (its conv2d / linear node) and the int8
layer alone (its qconv2d / qlinear node, with the fused epilogue) are each built into a
one-layer graph and timed by a LayerTimer (shave/timing.py: built for the target, timed
in interleaved rounds, cached by shape and target like every speed guard's measurements). A layer whose speedup fp32 / int8 is below
`min_speedup` goes back to float32. The comparison is per kernel: the quantize /
dequantize a float32 layer adds between int8 neighbours is not counted.
"""
from __future__ import annotations

import numpy as np

from ...ir import Graph, Node
from tqdm import tqdm

from ...timing import LayerTimer


def one_layer(graph: Graph, node: Node) -> Graph:
    """`node` alone: its first input is the graph input; other activation inputs (a residual) become zero params."""
    g = Graph(inputs=[("x", graph.type_of(node.inputs[0]))])
    inputs = ["x"]
    for v in node.inputs[1:]:
        if v in graph.params:
            inputs.append(g.add_param(v, graph.params[v]))
        else:
            t = graph.type_of(v)
            inputs.append(g.add_param(v, np.zeros(t.shape, t.dtype)))
    g.nodes.append(Node(node.name, node.op, inputs, dict(node.attrs), node.type, node.source))
    g.outputs = [node.name]
    return g


def measure(float_graph: Graph, int_graph: Graph, pairs: list[tuple[str, str]], target: dict,
            timer: LayerTimer) -> dict[str, tuple[float, float]]:
    """{float layer name: (float32 seconds, int8 seconds)} for (float layer, int8 node) name pairs."""
    out = {}
    for fname, qname in tqdm(pairs, desc="timing int8 layers", unit="layer", leave=False, disable=None):
        graphs = [one_layer(float_graph, float_graph.node(fname)), one_layer(int_graph, int_graph.node(qname))]
        f, q = timer.time(graphs, target)
        out[fname] = (f, q)
    return out


def too_slow(times: dict[str, tuple[float, float]], min_speedup: float) -> dict[str, str]:
    """{layer: reason} for the layers whose int8 kernel is not at least `min_speedup` times faster."""
    slow = {}
    for name, (f, q) in times.items():
        if q <= 0 or f / q < min_speedup:
            slow[name] = f"int8 {q * 1e3:.3g} ms vs float32 {f * 1e3:.3g} ms"
    return slow
