"""Quantize: int8 conv/linear layers with calibrated activation ranges.

    Quantize(calibration, method="minmax", per_channel=True, exclude=(), percentile=99.99,
             reduce_range=True, simulate=False, max_layer_error=None)

A *unit* is a conv2d or linear with a constant weight, plus what follows it and
can be fused into its requantization: an `add` of another activation (the
residual) and then a relu / relu6 / clamp. Each unit's input (and residual) is
quantized to uint8 with a per-tensor scale calibrated on `calibration` (an
iterable of example inputs, run through the float graph as torch); its weight
to int8, symmetric per output channel. `reduce_range` (default) keeps weights in
[-63, 63] so that AVX2's u8 x s8 pair sums (vpmaddubsw) cannot saturate int16.

With simulate=True the result is the float graph with fake-quant ops
(fake_quant on activations, fake_quant_channel on weights): the simulation for
accuracy checks and quantization-aware fine-tuning (shave.finetune trains it;
the fake-quant ops pass gradients straight through). `convert(sim_graph)` turns
such a graph into the integer graph, which is what Quantize returns by default:
qconv2d / qlinear ops (ir/opset_quant.py) whose uint8 outputs feed the next
units directly when every consumer is a unit, and quantize / dequantize where
the graph leaves the int8 domain.

`max_layer_error`: measured sensitivity. Each unit is simulated alone on the
calibration data and the relative error of the graph's output is recorded
(`self.layers[i].sensitivity`); units above the bound stay float32.
`exclude`: node names or fnmatch patterns of layers to keep in float32.
`target` (a target name or dict; default None: off): per-layer speed check (speed.py). Each
quantized layer's int8 kernel alone is timed against its float32 kernel alone on the target;
layers with fp32 / int8 below `min_speedup` (default 1.0) stay float32 ("slower: ...").
`speed_timer(graphs, target) -> seconds` replaces the compile-and-time step (tests).

After a run, `self.layers` says, per layer, what happened and why.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np
import torch

from ...backends.torch.module import forward_with_values
from ...errors import PassError
from ...ir import Graph, Node, verify
from ...ir.types import TensorType
from ..base import Pass, register_pass
from .calibrate import activation_ranges, calibration_batches, weight_scales

LAYERS = ("conv2d", "linear")
ACTS = ("relu", "relu6", "clamp")
SENSITIVITY_BATCHES = 4


@dataclass
class Unit:
    layer: Node
    add: Node | None = None
    residual: str | None = None
    act: Node | None = None

    @property
    def nodes(self) -> list[Node]:
        return [n for n in (self.layer, self.add, self.act) if n is not None]

    @property
    def out(self) -> str:
        return self.nodes[-1].name


@dataclass
class LayerQuant:
    """What Quantize did with one layer."""
    name: str
    layer: str  # e.g. "conv2d 3x3 16->32"
    quantized: bool
    reason: str = ""
    fused: str = ""  # "add+relu", ...
    sensitivity: float | None = None  # output error with only this layer quantized
    fp32_ms: float | None = None  # the layer's compiled kernel alone (with a target: speed.py)
    int8_ms: float | None = None


def _describe(graph: Graph, n: Node) -> str:
    w = graph.params[n.inputs[1]]
    if n.op == "linear":
        return f"linear {w.shape[1]}->{w.shape[0]}"
    g = n.attrs["groups"]
    kind = "depthwise " if g > 1 and g == w.shape[0] and w.shape[1] == 1 else ("grouped " if g > 1 else "")
    return f"{kind}conv2d {w.shape[2]}x{w.shape[3]} {w.shape[1] * g}->{w.shape[0]}"


def _act_bounds(n: Node) -> tuple:
    if n.op == "relu":
        return 0.0, None
    if n.op == "relu6":
        return 0.0, 6.0
    return n.attrs["min"], n.attrs["max"]


def find_units(graph: Graph, skip=lambda n: False) -> list[Unit]:
    """The fusable layer chains of a float graph, in order."""
    units, claimed = [], set()
    for n in graph.nodes:
        if n.op not in LAYERS or skip(n) or n.type.dtype != "float32" or not graph.is_param(n.inputs[1]):
            continue
        if any(not graph.is_param(v) for v in n.inputs[2:]):
            continue
        u = Unit(n)
        cur = n
        users = graph.users(cur.name)
        if (len(users) == 1 and graph.use_count(cur.name) == 1 and users[0].op == "add"
                and users[0].name not in claimed):
            add = users[0]
            other = [v for v in add.inputs if v != cur.name]
            if (len(other) == 1 and not graph.is_param(other[0]) and graph.type_of(other[0]) == n.type):
                u.add, u.residual, cur = add, other[0], add
        users = graph.users(cur.name)
        if len(users) == 1 and graph.use_count(cur.name) == 1 and users[0].op in ACTS:
            lo, hi = _act_bounds(users[0])
            if lo is not None and lo <= 0 and (hi is None or hi > 0):
                u.act = users[0]
        claimed.update(x.name for x in u.nodes)
        units.append(u)
    return units


def simulate(graph: Graph, units: list[Unit], ranges: dict, wscales: dict, qmax: int) -> Graph:
    """The float graph with fake-quant ops on the units' inputs, residuals and weights (a copy)."""
    g = graph.copy()
    fq: dict[str, str] = {}

    def fake(v: str, anchor_value: str) -> str:
        if v not in fq:
            scale, zp = ranges[v]
            node = Node(g.fresh_name(f"{v}.fq"), "fake_quant", [v],
                        {"scale": scale, "zero_point": zp, "qmin": 0, "qmax": 255}, g.type_of(v))
            prod = g.producer(v)
            g.insert_after(prod, node) if prod is not None else g.nodes.insert(0, node)
            fq[v] = node.name
        return fq[v]

    for u in units:
        layer = g.node(u.layer.name)
        x = fake(layer.inputs[0], layer.name)
        w = layer.inputs[1]
        s = g.add_param(f"{layer.name}.wscale", wscales[layer.name])
        fw = Node(g.fresh_name(f"{layer.name}.wq"), "fake_quant_channel", [w, s], {"qmax": qmax},
                  g.type_of(w))
        g.nodes.insert(g.nodes.index(layer), fw)
        layer.inputs = [x, fw.name] + layer.inputs[2:]
        if u.add is not None:
            add = g.node(u.add.name)
            r = fake(u.residual, add.name)
            add.inputs = [r if v == u.residual else v for v in add.inputs]
    return verify(g)


# ------------------------------------------------------------------ convert
def _sim_units(g: Graph) -> list[tuple]:
    """(layer, fq_x, fq_w, add, fq_r, act) for every fake-quantized layer of a simulation graph."""
    out = []
    for n in g.nodes:
        if n.op not in LAYERS:
            continue
        px, pw = g.producer(n.inputs[0]), g.producer(n.inputs[1])
        if px is None or pw is None or px.op != "fake_quant" or pw.op != "fake_quant_channel":
            continue
        cur, add, fr, act = n, None, None, None
        users = g.users(cur.name)
        if len(users) == 1 and g.use_count(cur.name) == 1 and users[0].op == "add":
            other = [v for v in users[0].inputs if v != cur.name]
            po = g.producer(other[0]) if len(other) == 1 else None
            if po is not None and po.op == "fake_quant":
                add, fr, cur = users[0], po, users[0]
        users = g.users(cur.name)
        if len(users) == 1 and g.use_count(cur.name) == 1 and users[0].op in ACTS:
            act = users[0]
        out.append((n, px, pw, add, fr, act))
    return out


def convert(sim: Graph) -> Graph:
    """A simulation graph (fake-quant ops, perhaps fine-tuned) -> the integer graph."""
    g = sim.copy()
    units = _sim_units(g)
    slots = {}  # fake_quant node name -> number of uses by unit slots
    for layer, fx, fw, add, fr, act in units:
        slots[fx.name] = slots.get(fx.name, 0) + 1
        if fr is not None:
            slots[fr.name] = slots.get(fr.name, 0) + 1
    # every fake_quant a unit reads becomes a uint8 value (name + ".q"); one read only by units goes away
    stored = {name for name, k in slots.items() if g.use_count(name) == k}
    ends = {(act or add or layer).name: (layer, fx, fw, add, fr, act) for layer, fx, fw, add, fr, act in units}
    out_q = {}  # unit end -> (scale, zp) when the unit writes uint8
    for end in ends:
        users = g.users(end)
        if (users and end not in g.outputs and all(u.op == "fake_quant" and u.name in stored for u in users)
                and len(users) == 1):
            out_q[end] = (users[0].attrs["scale"], users[0].attrs["zero_point"])
    # rewrite: units first (in order), then the boundary fake_quants
    for end, (layer, fx, fw, add, fr, act) in ends.items():
        sx, zx = fx.attrs["scale"], fx.attrs["zero_point"]
        w = np.asarray(g.params[fw.inputs[0]], np.float64)
        sw = np.asarray(g.params[fw.inputs[1]], np.float64)
        qmax = fw.attrs["qmax"]
        wq = np.clip(np.round(w / sw.reshape(-1, *([1] * (w.ndim - 1)))), -qmax, qmax).astype(np.int8)
        b = np.asarray(g.params[layer.inputs[2]], np.float64) if len(layer.inputs) > 2 else np.zeros(len(sw))
        acc_scale = sx * sw
        bq = np.clip(np.round(b / acc_scale), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        lo, hi = _act_bounds(act) if act is not None else (None, None)
        attrs = {}
        if end in out_q:
            so, zo = out_q[end]
            mult = acc_scale / so
            qlo = 0 if lo is None else int(np.clip(np.round(lo / so) + zo, 0, 255))
            qhi = 255 if hi is None else int(np.clip(np.round(hi / so) + zo, 0, 255))
            attrs.update(out_zp=int(zo), out_dtype="uint8", lo=None if qlo <= 0 else qlo,
                         hi=None if qhi >= 255 else qhi)
            rscale = None if fr is None else fr.attrs["scale"] / so
        else:
            mult = acc_scale
            attrs.update(out_zp=0, out_dtype="float32", lo=lo, hi=hi)
            rscale = None if fr is None else fr.attrs["scale"]
        names = [fx.name + ".q",
                 g.add_param(f"{layer.name}.weight.q", wq), g.add_param(f"{layer.name}.bias.q", bq),
                 g.add_param(f"{layer.name}.mult", mult.astype(np.float32))]
        attrs["x_zp"] = int(zx)
        if layer.op == "conv2d":
            attrs.update({k: layer.attrs[k] for k in ("stride", "padding", "dilation", "groups")})
            op = "qconv2d"
            if fr is not None:
                names.append(fr.name + ".q")
                attrs.update(r_zp=int(fr.attrs["zero_point"]), r_mult=float(np.float32(rscale)))
        else:
            op = "qlinear"
        tail = g.node(end)
        dtype = attrs["out_dtype"]
        q = Node(end, op, names, attrs, TensorType(tail.type.shape, dtype), layer.source)
        idx = g.nodes.index(tail)
        for n in (layer, fw, add, act):
            if n is not None and n in g.nodes:
                g.nodes.remove(n)
        g.nodes.insert(min(idx, len(g.nodes)), q)
    # boundaries: the uint8 input of a unit comes from a uint8 unit output, or a quantize of a float value
    for name in slots:
        fq = g.node(name)
        src = fq.inputs[0]
        if src in out_q:
            g.replace_uses(name + ".q", src)
        else:
            qn = Node(name + ".q", "quantize", [src], {"scale": fq.attrs["scale"], "zero_point": fq.attrs["zero_point"]},
                      TensorType(fq.type.shape, "uint8"), fq.source)
            g.nodes.insert(g.nodes.index(fq), qn)
        if name in stored:
            g.nodes.remove(fq)
    g = _reorder(g)
    return verify(g.remove_dead())


def _reorder(g: Graph) -> Graph:
    """Restore topological order after nodes moved (a unit's node sits where its tail was)."""
    produced = {n for n, _ in g.inputs} | set(g.params)
    pending, order = list(g.nodes), []
    while pending:
        for i, n in enumerate(pending):
            if all(v in produced for v in n.inputs):
                order.append(n)
                produced.add(n.name)
                del pending[i]
                break
        else:
            raise PassError(f"quantized graph has a cycle at {pending[0].name!r}")
    g.nodes = order
    return g


@register_pass("quantize", contract="lossy")
class Quantize(Pass):
    def __init__(self, calibration=None, method: str = "minmax", per_channel: bool = True, exclude=(),
                 percentile: float = 99.99, reduce_range: bool = True, simulate: bool = False,
                 max_layer_error: float | None = None, target=None, min_speedup: float = 1.0, speed_timer=None):
        from .calibrate import METHODS

        if method not in METHODS:
            raise PassError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
        if not 50.0 < percentile <= 100.0:
            raise PassError(f"Quantize percentile must be in (50, 100], got {percentile}")
        self.calibration, self.method, self.per_channel = calibration, method, per_channel
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.percentile, self.reduce_range, self.simulate = percentile, reduce_range, simulate
        self.max_layer_error = max_layer_error
        self.target, self.min_speedup, self.speed_timer = target, min_speedup, speed_timer
        self._slow: set = set()  # layers the speed check sent back to float32
        self.layers: list[LayerQuant] = []

    def _excluded(self, n: Node) -> bool:
        return n.name in self._slow or any(fnmatch.fnmatchcase(n.name, p) for p in self.exclude)

    def run(self, graph: Graph) -> Graph:
        batches = calibration_batches(graph, self.calibration)
        qmax = 63 if self.reduce_range else 127
        all_units = find_units(graph)
        units = [u for u in all_units if not self._excluded(u.layer)]
        self.layers = [LayerQuant(u.layer.name, _describe(graph, u.layer), not self._excluded(u.layer),
                                  "" if not self._excluded(u.layer) else "excluded",
                                  "+".join(n.op for n in u.nodes[1:])) for u in all_units]
        values = {u.layer.inputs[0] for u in units} | {u.residual for u in units if u.residual}
        ranges = activation_ranges(graph, values, batches, self.method, self.percentile)
        wscales = {u.layer.name: weight_scales(np.asarray(graph.params[u.layer.inputs[1]]), qmax, self.per_channel)
                   for u in units}
        if self.max_layer_error is not None:
            units = self._sensitivity(graph, units, ranges, wscales, qmax, batches)
        sim = simulate(graph, units, ranges, wscales, qmax)
        if self.simulate:
            return sim
        gi = convert(sim)
        return self._speed_fallback(graph, gi, units) if self.target is not None and units else gi

    def _speed_fallback(self, graph, gi, units):
        """Time each int8 layer against its float32 layer on the target; rerun with the slower ones float32."""
        from ...backends.tvm.target import resolve_target
        from .speed import measure, too_slow

        target = resolve_target(self.target)
        qnodes = {n.inputs[1]: n.name for n in gi.nodes if n.op in ("qconv2d", "qlinear")}
        pairs = [(u.layer.name, qnodes[f"{u.layer.name}.weight.q"]) for u in units
                 if f"{u.layer.name}.weight.q" in qnodes]
        times = measure(graph, gi, pairs, target, self.speed_timer)
        slow = too_slow(times, self.min_speedup)
        if slow:
            saved, self.target, self._slow = self.target, None, self._slow | set(slow)
            try:
                gi = self.run(graph)
            finally:
                self.target, self._slow = saved, set()
        for x in self.layers:
            if x.name in times:
                x.fp32_ms, x.int8_ms = times[x.name][0] * 1e3, times[x.name][1] * 1e3
            if x.name in slow:
                x.quantized, x.reason = False, f"slower: {slow[x.name]}"
        return gi

    def _sensitivity(self, graph, units, ranges, wscales, qmax, batches):
        """Simulate each unit alone; keep float the ones whose output error exceeds the bound."""
        batches = batches[:SENSITIVITY_BATCHES]
        with torch.no_grad():
            ref = [forward_with_values(graph, b, ())[0] for b in batches]
            kept = []
            for u in units:
                sim = simulate(graph, [u], ranges, wscales, qmax)
                err = 0.0
                for b, r in zip(batches, ref):
                    outs = forward_with_values(sim, b, ())[0]
                    for o, ro in zip(outs, r):
                        err = max(err, float((o - ro).abs().max() / ro.abs().max().clamp_min(1e-12)))
                info = next(x for x in self.layers if x.name == u.layer.name)
                info.sensitivity = err
                if err > self.max_layer_error:
                    info.quantized, info.reason = False, f"sensitivity {err:.3g} > {self.max_layer_error:g}"
                else:
                    kept.append(u)
        return kept

    def summary(self) -> str:
        """One line per layer: what was quantized, what stayed float32 and why."""
        rows = []
        for x in self.layers:
            sens = "" if x.sensitivity is None else f"  sensitivity {x.sensitivity:.3g}"
            state = "int8" if x.quantized else f"float32 ({x.reason})"
            if x.int8_ms is not None:
                sens += f"  int8 {x.int8_ms:.3g} ms / fp32 {x.fp32_ms:.3g} ms"
            rows.append(f"{x.name:32s} {x.layer:28s} {state}{' +' + x.fused if x.fused else ''}{sens}")
        return "\n".join(rows)
