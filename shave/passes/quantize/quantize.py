"""Quantize: int8 conv/linear layers with calibrated activation ranges.

    Quantize(calibration, method="minmax", per_channel=True, exclude=(), percentile=99.99,
             reduce_range="auto", simulate=False, max_layer_error=None)

A *unit* is a conv2d or linear with a constant weight, plus what follows it and
can be fused into its requantization: an `add` of another activation (the
residual) and then a relu / relu6 / clamp. Each unit's input (and residual) is
quantized to uint8 with a per-tensor scale calibrated on `calibration` (an
iterable of example inputs, run through the float graph as torch); its weight
to int8, symmetric per output channel, with 7 bits ([-63, 63]) where the target's dot
product would saturate on 8-bit weights (the dense and linear layers on AVX2, whose
vpmaddubsw sums pairs) and the full 8 bits elsewhere, depthwise layers included
(`reduce_range="auto"`).

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
(the plan's `sensitivity`); units above the bound stay float32.
`exclude`: node names or fnmatch patterns of layers to keep in float32;
`keep_ends_float=True` also keeps the graph's first and last layer in float32.

Weights: `weight_method="max"` maps each channel's largest |w| to the largest code;
"mse" clips each channel's range where its squared weight error is least.
`reduce_range`: True keeps every weight in [-63, 63], False uses [-127, 127], and "dense"
limits only the layers whose AVX2 kernels sum u8 x s8 pairs (dense and grouped convs,
linear) and gives depthwise convs the full 8 bits. On AVX2, 8-bit dense weights run on an
int16 kernel that does half the multiply-adds per instruction (schedules/int8.py); VNNI
(vpdpbusd) and Arm's sdot sum without saturating, so 8 bits cost nothing there; depthwise
kernels multiply in int32 lanes on every target, so their 8 bits cost nothing anywhere. "auto"
(the default) is "dense" where the int8 dot product saturates (shave.isa
`int8_pairs_saturate`: AVX2 without VNNI) and False elsewhere, for `target` or, without one,
the target of the shave.compile running the pass (else this machine). On the AVX2 path
MobileNetV2 compiled int8 takes the same time with "dense" as with True (1.76 ms either way,
CPUID masked to AVX2 on a Zen 5); without bias correction "dense" agrees with fp32 on more
images (README, Quantization), with it the two agreed alike (docs/tvm-notes.md, int8).

`target` (a target name or dict; default None: off): per-layer speed check (speed.py). Each
quantized layer's int8 kernel alone is timed against its float32 kernel alone on the target;
layers with fp32 / int8 below `min_speedup` (default 1.0) stay float32 ("slower: ..."). Per
kernel the check does not see the quantize / dequantize a float32 layer adds between int8
neighbours, so where it sends layers back, the whole model is timed both ways (int8
throughout, and with those layers float32) and the faster is kept: on an AVX-512 VNNI host
MobileNetV2's depthwise layers are each slower int8 alone, yet the whole model takes 0.45x
float32's time int8 throughout, against 1.04x with those layers kept float32.
`timer`: the LayerTimer that times them (shave/timing.py; default: this machine; a function
(graphs, target) -> seconds also works, e.g. a latency model).

`bias_correction`: after the weights and activations are fake-quantized, each quantized
layer's bias is corrected, in graph order, by the per-channel mean shift of its output on
the calibration data. "weights" (the default; True means the same) corrects the shift that
rounding the weights causes: the layer with int8 weights minus the same layer with float
weights, on the same quantized input. "output" corrects the whole shift (quantized graph,
earlier layers already corrected, minus the float graph). False: no correction.
The plan's `bias_shift` records each layer's largest shift. On MobileNetV2 (benchmarks/
quantize.py) "weights" raised the top-1 agreement with fp32 on perturbed images; "output" lowered it.
A run's plan (`Quantize(...).apply(graph).plan`, `cm.report["quantize"].plan`) says, per
layer, what happened and why.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ...reference.interpreter import forward_with_values
from ...errors import PassError
from ...isa import isa, pass_target
from ...timing import as_timer
from ...ir import Graph, Node, get_op, verify, weight_of
from ...ir.graph import Epilogue
from ...ir.opset_quant import float_acts
from ...ir.types import TensorType
from ..base import Pass, register_pass
from ..layers import matches
from ..calibration import calibration_batches
from .calibrate import activation_ranges, weight_scales

SENSITIVITY_BATCHES = 4

log = logging.getLogger("shave.quantize")

Unit = Epilogue  # a layer with the residual add and activation its int8 kernel computes


@dataclass
class LayerQuant:
    """What Quantize did with one layer."""
    name: str
    layer: str  # e.g. "conv2d 3x3 16->32"
    quantized: bool
    reason: str = ""
    fused: str = ""  # "add+relu", ...
    sensitivity: float | None = None  # output error with only this layer quantized
    bias_shift: float | None = None  # largest per-channel bias correction
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
    """(lo, hi) of an activation that is a clamp (the registry's `clip` trait)."""
    return get_op(n.op).clip(n.attrs)


def _fusable(n: Node) -> bool:
    """An activation an int8 layer computes: a clamp holding 0 (free, in the requantisation) or one
    of the activations it computes in float on real values (opset_quant.float_acts)."""
    return _clamps_around_zero(n) or n.op in float_acts()


def _clamps_around_zero(n: Node) -> bool:
    """An activation the int8 requantisation computes for free: a clamp whose range holds 0."""
    clip = get_op(n.op).clip
    if clip is None:
        return False
    lo, hi = clip(n.attrs)
    return lo is not None and lo <= 0 and (hi is None or hi > 0)


def _quantizable(graph: Graph, n: Node) -> bool:
    """A float layer with an int8 form (conv2d, linear) whose weight and bias are constants."""
    return (get_op(n.op).int8 is not None and n.type.dtype == "float32"
            and all(graph.is_param(v) for v in n.inputs[get_op(n.op).weight:]))


def find_units(graph: Graph, skip=lambda n: False) -> list[Unit]:
    """The fusable layer chains of a float graph, in order."""
    units, claimed = [], set()
    for n in graph.nodes:
        if not _quantizable(graph, n) or skip(n):
            continue
        u = graph.epilogue(n, residual=lambda v: graph.type_of(v) == n.type, act=_fusable)
        if u.add is not None and u.add.name in claimed:
            u = graph.epilogue(n, residual=lambda v: False, act=_fusable)
        claimed.update(x.name for x in u.nodes)
        units.append(u)
    return units


def simulate(graph: Graph, units: list[Unit], ranges: dict, wscales: dict, qmax) -> Graph:
    """The float graph with fake-quant ops on the units' inputs, residuals and weights (a copy).
    `qmax`: the weights' largest code, one int or {layer name: int}."""
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
        lq = qmax[layer.name] if isinstance(qmax, dict) else qmax
        fw = Node(g.fresh_name(f"{layer.name}.wq"), "fake_quant_channel", [w, s], {"qmax": lq},
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
    def fake_quantized(v: str) -> bool:
        return (p := g.producer(v)) is not None and p.op == "fake_quant"

    out = []
    for n in g.nodes:
        if get_op(n.op).int8 is None:
            continue
        px, pw = g.producer(n.inputs[0]), g.producer(weight_of(n))
        if px is None or pw is None or px.op != "fake_quant" or pw.op != "fake_quant_channel":
            continue
        e = g.epilogue(n, residual=fake_quantized, act=_fusable)
        out.append((n, px, pw, e.add, g.producer(e.residual) if e.add else None, e.act))
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
        float_act = act is not None and not _clamps_around_zero(act)
        lo, hi = _act_bounds(act) if act is not None and not float_act else (None, None)
        attrs = {}
        if float_act:  # computed on real values (opset_quant.float_acts), then quantized
            so, zo = out_q.get(end, (None, 0))
            mult = acc_scale
            attrs.update(out_zp=int(zo), out_dtype="uint8" if end in out_q else "float32", lo=None, hi=None,
                         act=act.op, out_inv=float(np.float32(1.0 / so)) if end in out_q else 1.0)
            rscale = None if fr is None else fr.attrs["scale"]
        elif end in out_q:
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


def _is_depthwise(graph: Graph, n: Node) -> bool:
    w = graph.params[n.inputs[1]]
    return n.op == "conv2d" and n.attrs["groups"] > 1 and n.attrs["groups"] == w.shape[0] and w.shape[1] == 1


def _out_axis(n: Node, ndim: int) -> int:
    """The axis of a layer's output channels: 1 for a conv, the last for a linear (which may run
    on channels-last activations, [N, H, W, C], as in ConvNeXt)."""
    return ndim - 1 if n.op == "linear" else 1


def _channel_mean(t: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Per-channel sums over every axis but `axis`."""
    dims = [d for d in range(t.ndim) if d != axis % t.ndim]
    return t.double().sum(dim=dims)


def bias_correct(graph: Graph, sim: Graph, layers: list[str], batches, mode: str = "output"
                 ) -> tuple[Graph, dict[str, float]]:
    """`sim` (a copy) with each listed layer's bias shifted, in graph order, so that the
    per-channel mean of its output on `batches` equals the float graph's (mode "output"), or equals
    that of the same layer with float weights on the same (quantized) input (mode "weights":
    only the weights' rounding error is corrected); {layer: max |shift|}."""
    from ...reference.interpreter import _call

    layers = set(layers)
    fsum: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for b in batches if mode == "output" else ():
            _, kept = forward_with_values(graph, b, layers)
            for v, t in kept.items():
                fsum[v] = fsum.get(v, 0) + _channel_mean(t, _out_axis(graph.node(v), t.ndim))
    g = sim.copy()
    last = {v: i for i, n in enumerate(g.nodes) for v in n.inputs}
    keep = set(g.outputs)
    envs = [{name: x for (name, _), x in zip(g.inputs, b)} for b in batches]
    shifts = {}
    with torch.no_grad():
        for i, n in enumerate(g.nodes):
            fn, attrs = _call(g, n)
            consts = {v: torch.from_numpy(np.array(g.params[v])) for v in n.inputs if g.is_param(v)}
            for env in envs:
                env[n.name] = fn(*[consts[v] if v in consts else env[v] for v in n.inputs], **attrs)
            if n.name in layers and mode == "weights":
                wq = g.producer(n.inputs[1])
                consts[n.inputs[1]] = torch.from_numpy(np.array(g.params[wq.inputs[0]]))
                fsum[n.name] = sum(_channel_mean(fn(*[consts[v] if v in consts else env[v] for v in n.inputs],
                                                    **attrs), _out_axis(n, env[n.name].ndim)) for env in envs)
            if n.name in fsum:
                axis = _out_axis(n, envs[0][n.name].ndim)
                qsum = sum(_channel_mean(env[n.name], axis) for env in envs)
                per_channel = sum(env[n.name].numel() for env in envs) / qsum.numel()
                delta = ((qsum - fsum[n.name]) / per_channel).float()
                old = np.asarray(g.params[n.inputs[2]], np.float32) if len(n.inputs) > 2 else \
                    np.zeros(delta.numel(), np.float32)
                n.inputs = n.inputs[:2] + [g.add_param(f"{n.name}.bias.corrected", old - delta.numpy())]
                shape = [1] * env[n.name].ndim
                shape[axis] = -1
                for env in envs:
                    env[n.name] = env[n.name] - delta.reshape(shape)
                shifts[n.name] = float(delta.abs().max())
            for v in n.inputs:
                if last.get(v) == i and v not in keep:
                    for env in envs:
                        env.pop(v, None)
    return verify(g.remove_dead()), shifts


@register_pass("quantize", contract="lossy")
class Quantize(Pass):
    def __init__(self, calibration=None, method: str = "minmax", per_channel: bool = True, exclude=(),
                 percentile: float = 99.99, reduce_range="auto", simulate: bool = False,
                 max_layer_error: float | None = None, weight_method: str = "max",
                 bias_correction="weights", keep_ends_float: bool = False,
                 target=None, min_speedup: float = 1.0, timer=None):
        from .calibrate import METHODS, WEIGHT_METHODS

        if method not in METHODS:
            raise PassError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
        if weight_method not in WEIGHT_METHODS:
            raise PassError(f"unknown weight method {weight_method!r}; known: {', '.join(WEIGHT_METHODS)}")
        if bias_correction not in (True, False, "output", "weights"):
            raise PassError(f"Quantize bias_correction must be True, False, 'output' or 'weights', "
                            f"got {bias_correction!r}")
        if reduce_range not in (True, False, "dense", "auto"):
            raise PassError(f"Quantize reduce_range must be 'auto', True, False or 'dense', got {reduce_range!r}")
        if not 50.0 < percentile <= 100.0:
            raise PassError(f"Quantize percentile must be in (50, 100], got {percentile}")
        self.calibration, self.method, self.per_channel = calibration, method, per_channel
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.percentile, self.reduce_range, self.simulate = percentile, reduce_range, simulate
        self.max_layer_error = max_layer_error
        self.weight_method, self.bias_correction = weight_method, bias_correction
        self.keep_ends_float = keep_ends_float
        self.target, self.min_speedup, self.timer = target, min_speedup, timer

    def weight_range(self):
        """reduce_range with "auto" resolved for the target: True, False or "dense"."""
        if self.reduce_range == "auto":
            return "dense" if isa(pass_target(self.target)).int8_pairs_saturate else False
        return self.reduce_range

    @staticmethod
    def _qmax(graph: Graph, n: Node, reduce) -> int:
        if reduce == "dense":
            return 127 if _is_depthwise(graph, n) else 63
        return 63 if reduce else 127

    def run(self, graph: Graph) -> tuple[Graph, list[LayerQuant]]:
        return self._quantize(graph, slow=frozenset(), timed=self.target is not None)

    def _quantize(self, graph: Graph, slow: frozenset, timed: bool) -> tuple[Graph, list[LayerQuant]]:
        """(the int8 graph, with the layers in `slow` (sent back by the speed check) kept float32;
        the plan); `timed`: run the speed check."""
        batches = calibration_batches(self.calibration, "Quantize calibration", graph)
        all_units = find_units(graph)
        ends = {all_units[0].layer.name, all_units[-1].layer.name} if self.keep_ends_float and all_units else set()

        def why_float(u: Unit) -> str:
            if u.layer.name in slow or matches(u.layer.name, self.exclude):
                return "excluded"
            return "first/last layer" if u.layer.name in ends else ""

        units = [u for u in all_units if not why_float(u)]
        layers = [LayerQuant(u.layer.name, _describe(graph, u.layer), not why_float(u), why_float(u),
                                  "+".join(n.op for n in u.nodes[1:])) for u in all_units]
        values = {u.layer.inputs[0] for u in units} | {u.residual for u in units if u.residual}
        ranges = activation_ranges(graph, values, batches, self.method, self.percentile)
        reduce = self.weight_range()
        qmax = {u.layer.name: self._qmax(graph, u.layer, reduce) for u in units}
        wscales = {u.layer.name: weight_scales(np.asarray(graph.params[u.layer.inputs[1]]), qmax[u.layer.name],
                                               self.per_channel, self.weight_method) for u in units}
        info = {x.name: x for x in layers}
        units = [u for u in units if self._bias_fits(graph, u, ranges[u.layer.inputs[0]][0],
                                                     wscales[u.layer.name], qmax[u.layer.name], info[u.layer.name])]
        if self.max_layer_error is not None:
            units = self._sensitivity(graph, units, ranges, wscales, qmax, batches, info)
        sim = simulate(graph, units, ranges, wscales, qmax)
        if self.bias_correction and units:
            mode = "weights" if self.bias_correction is True else self.bias_correction
            sim, shifts = bias_correct(graph, sim, [u.layer.name for u in units], batches, mode)
            for x in layers:
                x.bias_shift = shifts.get(x.name, x.bias_shift)
        if self.simulate:
            return sim, layers
        gi = convert(sim)
        return self._speed_fallback(graph, gi, units, layers) if timed and units else (gi, layers)

    def _speed_fallback(self, graph, gi, units, layers):
        """Time each int8 layer against its float32 layer on the target; rerun with the slower ones float32."""
        from ...target import resolve_target
        from .speed import measure, too_slow

        target = resolve_target(self.target)
        qnodes = {n.inputs[1]: n.name for n in gi.nodes if n.op in ("qconv2d", "qlinear")}
        pairs = [(u.layer.name, qnodes[f"{u.layer.name}.weight.q"]) for u in units
                 if f"{u.layer.name}.weight.q" in qnodes]
        timer = as_timer(self.timer)
        times = measure(graph, gi, pairs, target, timer)
        slow = too_slow(times, self.min_speedup)
        kept_int8 = {}
        if slow:
            mixed, mixed_layers = self._quantize(graph, frozenset(slow), timed=False)
            # per kernel the check misses the quantize / dequantize a float32 layer adds between int8
            # neighbours: the whole model, int8 throughout against the layers sent back, decides
            all_int8, partly = timer.time([gi, mixed], target)
            if partly <= all_int8:
                gi, layers = mixed, mixed_layers
            else:
                log.info("Quantize speed check: %d layers slower alone, but the whole model took %.3g ms int8 "
                         "throughout and %.3g ms with them float32: they stay int8", len(slow), all_int8 * 1e3,
                         partly * 1e3)
                kept_int8 = {name: f"int8 although slower alone ({why}): the whole model is faster with it, "
                                   f"{all_int8 * 1e3:.3g} ms vs {partly * 1e3:.3g} ms" for name, why in slow.items()}
                slow = {}
        for x in layers:
            if x.name in times:
                x.fp32_ms, x.int8_ms = times[x.name][0] * 1e3, times[x.name][1] * 1e3
            if x.name in slow:
                x.quantized, x.reason = False, f"slower: {slow[x.name]}"
            x.reason = kept_int8.get(x.name, x.reason)
        return gi, layers

    def _bias_fits(self, graph, u: Unit, x_scale: float, w_scale, qmax: int, info: LayerQuant) -> bool:
        """Whether the int32 accumulator holds the layer: its bias in accumulator units plus the largest
        sum of products must stay within half the int32 range (room for the bias correction). A tiny
        input scale (a nearly constant input) can push the bias past it; that layer stays float32."""
        b = graph.params[u.layer.inputs[2]] if len(u.layer.inputs) > 2 else None
        if b is None:
            return True
        w = graph.params[u.layer.inputs[1]]
        worst = float(np.max(np.abs(np.asarray(b, np.float64)) / (x_scale * np.asarray(w_scale, np.float64))))
        worst += 255.0 * qmax * (w.size // w.shape[0])
        if worst < 2 ** 30:
            return True
        info.quantized, info.reason = False, f"bias beyond int32 at input scale {x_scale:.3g}"
        return False

    def _sensitivity(self, graph, units, ranges, wscales, qmax, batches, infos: dict):
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
                info = infos[u.layer.name]
                info.sensitivity = err
                if err > self.max_layer_error:
                    info.quantized, info.reason = False, f"sensitivity {err:.3g} > {self.max_layer_error:g}"
                else:
                    kept.append(u)
        return kept

    def summarize(self, plan: list[LayerQuant]) -> str:
        """One line per layer: what was quantized, what stayed float32 and why."""
        rows = []
        for x in plan:
            sens = "" if x.sensitivity is None else f"  sensitivity {x.sensitivity:.3g}"
            state = ("int8" + (f" ({x.reason})" if x.reason else "")) if x.quantized else f"float32 ({x.reason})"
            shift = "" if x.bias_shift is None else f"  bias shift {x.bias_shift:.3g}"
            if x.int8_ms is not None:
                shift += f"  int8 {x.int8_ms:.3g} ms / fp32 {x.fp32_ms:.3g} ms"
            rows.append(f"{x.name:32s} {x.layer:28s} {state}{' +' + x.fused if x.fused else ''}{sens}{shift}")
        return "\n".join(rows)
