"""ShiftRewrite: a d x d conv -> shift + 1x1 conv (ShiftNet, Wu et al. 2018).

    ShiftRewrite(replicate=1, layers=None, exclude=(), data=None)

A d x d conv is exactly the sum of d^2 1x1 convs, one per kernel position
(ky, kx), each over the input shifted by (p - ky*dil, p - kx*dil). Keeping
one shift per input channel keeps one term of that sum per channel: the
position carrying most of the channel's kernel energy (sum over filters of
W[o, c, ky, kx]^2), with W[:, c, ky, kx] as the 1x1 weights. `replicate=r`
keeps each channel's r strongest positions instead (the channel is read r
times, each copy with its own shift; r = d^2 is exact). A kernel that is
already one-hot per input channel is rewritten exactly. With `data`, the 1x1
weights are then refitted by least squares to the conv's output on that data.

The 1x1 conv keeps the stride (a strided 1x1 conv over the shifted input
samples the same places), so stride 2 is exact in the same way. It needs
"same" padding (2 p = dil (d - 1) on each axis): the zero fill of the shift
then plays the padding's part. Other paddings, grouped convs and 1x1 convs
are skipped with the reason. The TVM backend folds the shift into the 1x1
conv's input packing (no pass over memory of its own).
"""
from __future__ import annotations

import numpy as np

from ...errors import PassError
from ..layers import Layer
from ...ir import Graph, Node
from ..base import register_pass
from .base import Block, ConvRewrite, new_node


@register_pass("shift_rewrite", contract="lossy")
class ShiftRewrite(ConvRewrite):
    def __init__(self, replicate: int = 1, layers=None, exclude=(), data=None, target=None, min_speedup: float = 1.0,
                 timer=None):
        if isinstance(replicate, bool) or not isinstance(replicate, (int, np.integer)) or replicate < 1:
            raise PassError(f"ShiftRewrite replicate must be a positive int (shifts kept per input channel), "
                            f"got {replicate!r}")
        super().__init__(layers, exclude, data, target, min_speedup, timer)
        self.replicate = int(replicate)

    def why_not(self, graph: Graph, node: Node, layer: Layer) -> str | None:
        if layer.groups != 1:
            return f"is a grouped conv (groups={layer.groups})"
        if layer.kh == 1 and layer.kw == 1:
            return "is already 1x1"
        if self.replicate > layer.kh * layer.kw:
            return f"has {layer.kh * layer.kw} kernel positions, fewer than replicate={self.replicate}"
        for p, d, k in zip(layer.padding, layer.dilation, (layer.kh, layer.kw)):
            if 2 * p != d * (k - 1):
                return (f"has padding {layer.padding} for a {layer.kh}x{layer.kw} kernel (dilation {layer.dilation});"
                        f" a shift stands in for 'same' padding only")
        return None

    def macs_after(self, layer: Layer) -> int:
        return layer.batch * layer.out_hw[0] * layer.out_hw[1] * layer.n * layer.c * self.replicate

    def build(self, graph: Graph, node: Node, layer: Layer) -> Block:
        w = np.asarray(graph.params[node.inputs[1]])
        energy = (w.astype(np.float64) ** 2).sum(0).reshape(layer.c, -1)  # [c, ky * kw + kx]
        best = np.argsort(-energy, axis=1, kind="stable")[:, :self.replicate]  # [c, r]
        (ph, pw), (dh, dw) = layer.padding, layer.dilation
        ky, kx = best // layer.kw, best % layer.kw
        shifts = tuple((int(ph - a * dh), int(pw - b * dw)) for a, b in zip(ky.reshape(-1), kx.reshape(-1)))
        chans = np.repeat(np.arange(layer.c), self.replicate)
        w1 = w[:, chans, ky.reshape(-1), kx.reshape(-1)][:, :, None, None]  # [n, c * r, 1, 1]
        kept = float(np.take_along_axis(energy, best, 1).sum())
        src = node.inputs[0]
        if self.replicate > 1:
            src = new_node(graph, f"{node.name}.replicate", "channel_permute", [src],
                           {"indices": tuple(int(c) for c in chans)}, node.source, node).name
        shift = new_node(graph, f"{node.name}.shift", "shift", [src], {"shifts": shifts}, node.source, node)
        weight = graph.add_param(f"{node.name}.pointwise.weight", w1.astype(w.dtype))
        attrs = {"stride": layer.stride, "padding": (0, 0), "dilation": (1, 1), "groups": 1}
        conv = new_node(graph, f"{node.name}.pointwise", "conv2d", [shift.name, weight] + node.inputs[2:], attrs,
                        node.source, node)
        graph.nodes.remove(node)
        graph.replace_uses(node.name, conv.name)
        return Block(conv.name, float(np.sqrt(max(0.0, 1 - kept / max(float(energy.sum()), 1e-300)))))
