"""Per-layer speed check of Quantize: keep a layer int8 only where its compiled kernel is faster.

For each quantized layer, the float32 layer alone (its conv2d / linear node) and the int8
layer alone (its qconv2d / qlinear node, with the fused epilogue) are each built into a
one-layer graph and timed by a LayerTimer (shave/timing.py: built for the target, timed
in interleaved rounds, cached by shape and target like every speed guard's measurements). A layer whose speedup fp32 / int8 is below
`min_speedup` goes back to float32. The comparison is per kernel: the quantize /
dequantize a float32 layer adds between int8 neighbours is not counted.
"""
from __future__ import annotations

from ...ir import Graph
from tqdm import tqdm

from ...timing import LayerTimer
from ..layers import cut_out


def measure(float_graph: Graph, int_graph: Graph, pairs: list[tuple[str, str]], target: dict,
            timer: LayerTimer) -> dict[str, tuple[float, float]]:
    """{float layer name: (float32 seconds, int8 seconds)} for (float layer, int8 node) name pairs."""
    out = {}
    for fname, qname in tqdm(pairs, desc="timing int8 layers", unit="layer", leave=False, disable=None):
        graphs = [cut_out(float_graph, [fname]), cut_out(int_graph, [qname])]
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
