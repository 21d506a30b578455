"""DepthwiseSeparable: a d x d conv -> depthwise d x d conv + 1x1 conv (MobileNet blocks).

    DepthwiseSeparable(multiplier=1, layers=None, exclude=(), data=None)

For each input channel c, the slice W[:, c] of the kernel (N filters x d^2
positions) is approximated by its best rank-`multiplier` factorisation
(truncated SVD): rank 1 gives one depthwise d x d filter v_c and one column
u_c of the 1x1 conv, W[o, c] ~ u_c[o] v_c. The singular values are split
evenly between the two factors. `multiplier=m` keeps m depthwise filters per
channel (a depth multiplier); m = min(N, d^2) is exact, and so is a kernel
whose every W[:, c] already has rank <= m. The depthwise conv keeps the
layer's stride, padding and dilation; the 1x1 conv takes the bias. With
`data`, the 1x1 conv is refitted by least squares to the layer's output.
Grouped convs and 1x1 convs are skipped with the reason.
"""
from __future__ import annotations

import numpy as np

from ...errors import PassError
from ..layers import Layer
from ...ir import Graph, Node
from ..base import register_pass
from .base import Block, ConvRewrite, new_node


@register_pass("depthwise_separable", contract="lossy")
class DepthwiseSeparable(ConvRewrite):
    def __init__(self, multiplier: int = 1, layers=None, exclude=(), data=None, target=None, min_speedup: float = 1.0,
                 timer=None):
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, np.integer)) or multiplier < 1:
            raise PassError(f"DepthwiseSeparable multiplier must be a positive int (depthwise filters per input "
                            f"channel), got {multiplier!r}")
        super().__init__(layers, exclude, data, target, min_speedup, timer)
        self.multiplier = int(multiplier)

    def why_not(self, graph: Graph, node: Node, layer: Layer) -> str | None:
        if layer.groups != 1:
            return f"is a grouped conv (groups={layer.groups})"
        if layer.kh == 1 and layer.kw == 1:
            return "is 1x1: there is no spatial filter to separate"
        if self.multiplier > min(layer.n, layer.kh * layer.kw):
            return (f"has rank at most {min(layer.n, layer.kh * layer.kw)} per input channel, "
                    f"below multiplier={self.multiplier}")
        return None

    def macs_after(self, layer: Layer) -> int:
        cm = layer.c * self.multiplier
        return layer.batch * layer.out_hw[0] * layer.out_hw[1] * cm * (layer.kh * layer.kw + layer.n)

    def build(self, graph: Graph, node: Node, layer: Layer) -> Block:
        w = np.asarray(graph.params[node.inputs[1]])
        m, k = self.multiplier, layer.kh * layer.kw
        u, s, vt = np.linalg.svd(w.astype(np.float64).transpose(1, 0, 2, 3).reshape(layer.c, layer.n, k),
                                 full_matrices=False)  # per channel: [n, r] [r] [r, k]
        root = np.sqrt(s[:, :m])
        dw = (vt[:, :m] * root[:, :, None]).reshape(layer.c * m, 1, layer.kh, layer.kw)
        pw = (u[:, :, :m] * root[:, None, :]).transpose(1, 0, 2).reshape(layer.n, layer.c * m, 1, 1)
        dropped = float((s[:, m:] ** 2).sum()) / max(float((s ** 2).sum()), 1e-300)
        dw_name = graph.add_param(f"{node.name}.depthwise.weight", dw.astype(w.dtype))
        pw_name = graph.add_param(f"{node.name}.pointwise.weight", pw.astype(w.dtype))
        a = node.attrs
        depthwise = new_node(graph, f"{node.name}.depthwise", "conv2d", [node.inputs[0], dw_name],
                             {"stride": a["stride"], "padding": a["padding"], "dilation": a["dilation"],
                              "groups": layer.c}, node.source, node)
        conv = new_node(graph, f"{node.name}.pointwise", "conv2d", [depthwise.name, pw_name] + node.inputs[2:],
                        {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}, node.source, node)
        graph.nodes.remove(node)
        graph.replace_uses(node.name, conv.name)
        return Block(conv.name, float(np.sqrt(dropped)))
