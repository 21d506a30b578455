"""ONNX export of a shave graph: the rewritten model (pruned, decomposed, rewritten, int8) leaves
shave for ONNX Runtime, TensorRT or OpenVINO.

    shave.export_onnx(graph_or_compiled_model, "model.onnx")        # checked in ONNX Runtime

Every IR op has an emitter here (`EMITTERS`, keyed by op name, like the TVM lowerings): a
function that appends ONNX nodes computing the op from its input names. Float ops map to their
ONNX counterparts (opset 17). Int8 graphs are written in QDQ form, the form ONNX Runtime,
TensorRT and OpenVINO read as int8:

* `quantize` / `dequantize` are QuantizeLinear / DequantizeLinear with the op's scale and zero point;
* a `qconv2d` / `qlinear` reads its uint8 input through DequantizeLinear(scale 1, its zero point),
  its int8 weight through DequantizeLinear(the per-channel requantisation multiplier, axis 0)
  and its int32 bias through DequantizeLinear(the same, axis 0), runs the float Conv / MatMul
  (ONNX Runtime fuses such groups into QLinearConv / QGemm), adds a uint8 residual through
  its DequantizeLinear, applies a fused activation and the output clamps, and writes a uint8
  output through QuantizeLinear(scale 1, its zero point). The IR keeps only the product
  x_scale * w_scale / out_scale per channel (not the three scales), so the activations between
  int8 layers carry scale 1 in units of their own quantization step: the same function.

With `check=True` (default) the written file runs in ONNX Runtime (graph optimizations off: the
file as written) on two seeded random inputs and its outputs are compared with the IR's
reference interpreter: within 1e-4 of the output scale for float graphs, within
INT8_BOUNDARY_TOLERANCE for graphs that round floats to int8 (a code may land one step away). A
mismatch or a model ONNX Runtime refuses is an ExportError naming it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .errors import ExportError
from .ir import Graph
from .ir.opset_rewrites import shuffle_indices
from .ir.opset_quant import float_acts

OPSET = 17
FLOAT_TOLERANCE = 1e-4

_ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7}


class _Builder:
    """Collects ONNX nodes and initializers, with fresh names."""

    def __init__(self, graph: Graph):
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.graph = graph
        self.nodes, self.initializers = [], []
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}__{self._count}"

    def const(self, array, base: str = "const") -> str:
        name = self.fresh(base)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs, out: str | None = None, base: str = "t", **attrs) -> str:
        out = out or self.fresh(base)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [out], name=self.fresh(op_type), **attrs))
        return out


EMITTERS: dict = {}


def emits(*ops):
    """Register an emitter: fn(builder, node, input names, out name) appends the ONNX nodes writing `out`."""
    def deco(fn):
        for op in ops:
            EMITTERS[op] = fn
        return fn
    return deco


def _pads4(padding) -> list[int]:
    """IR conv/pool padding (ph, pw) or (top, left, bottom, right) -> ONNX [top, left, bottom, right]."""
    p = [int(v) for v in padding]
    return p * 2 if len(p) == 2 else p


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, (int, np.integer)) else [int(x) for x in v]


# ------------------------------------------------------------------ layers
@emits("conv2d")
def _conv(b, n, ins, out):
    a = n.attrs
    b.op("Conv", ins, out, strides=_pair(a["stride"]), pads=_pads4(a["padding"]), dilations=_pair(a["dilation"]),
         group=int(a["groups"]))


@emits("conv_transpose2d")
def _conv_t(b, n, ins, out):
    a = n.attrs
    b.op("ConvTranspose", ins, out, strides=_pair(a["stride"]), pads=_pads4(a["padding"]),
         output_padding=_pair(a["output_padding"]), dilations=_pair(a["dilation"]), group=int(a["groups"]))


def _matmul_weight(b, n, w_name: str) -> str:
    """The transposed [K, J] copy of a linear layer's [J, K] weight."""
    return b.const(np.ascontiguousarray(b.graph.params[w_name].T), f"{w_name}_t")


@emits("linear")
def _linear(b, n, ins, out):
    if not b.graph.is_param(n.inputs[1]):
        raise ExportError(f"linear {n.name}: only constant weights are exported")
    y = b.op("MatMul", [ins[0], _matmul_weight(b, n, n.inputs[1])], None if len(ins) > 2 else out)
    if len(ins) > 2:
        b.op("Add", [y, ins[2]], out)


@emits("batch_norm")
def _bn(b, n, ins, out):
    x, mean, var, w, bias = ins
    b.op("BatchNormalization", [x, w, bias, mean, var], out, epsilon=float(n.attrs["eps"]))


@emits("layer_norm")
def _ln(b, n, ins, out):
    b.op("LayerNormalization", ins, out, axis=-len(n.attrs["normalized_shape"]), epsilon=float(n.attrs["eps"]))


# ------------------------------------------------------------- activations
def _act(b, op: str, attrs: dict, x: str, out: str | None = None) -> str:
    """The activation `op` of x (IR semantics), written to `out` (a fresh name when None)."""
    if op == "relu":
        return b.op("Relu", [x], out)
    if op in ("relu6", "clamp"):
        lo, hi = (0.0, 6.0) if op == "relu6" else (attrs["min"], attrs["max"])
        return _clip(b, x, lo, hi, out)
    if op == "sigmoid":
        return b.op("Sigmoid", [x], out)
    if op == "tanh":
        return b.op("Tanh", [x], out)
    if op == "hardsigmoid":  # clamp(x + 3, 0, 6) / 6, as the IR writes it
        return b.op("Div", [_clip(b, b.op("Add", [x, b.const(np.float32(3.0))]), 0.0, 6.0),
                            b.const(np.float32(6.0))], out)
    if op == "hardswish":
        return b.op("Mul", [x, _act(b, "hardsigmoid", {}, x)], out)
    if op == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x])], out)
    if op == "leaky_relu":
        return b.op("LeakyRelu", [x], out, alpha=float(attrs["negative_slope"]))
    if op == "gelu":
        if attrs.get("approximate", "none") == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            cube = b.op("Mul", [b.op("Mul", [x, x]), x])
            inner = b.op("Mul", [b.op("Add", [x, b.op("Mul", [cube, b.const(np.float32(0.044715))])]),
                                 b.const(np.float32(math.sqrt(2 / math.pi)))])
            t = b.op("Tanh", [inner])
        else:  # 0.5 x (1 + erf(x / sqrt(2)))
            t = b.op("Erf", [b.op("Div", [x, b.const(np.float32(math.sqrt(2.0)))])])
        half = b.op("Mul", [x, b.const(np.float32(0.5))])
        return b.op("Mul", [half, b.op("Add", [t, b.const(np.float32(1.0))])], out)
    raise ExportError(f"activation {op!r} has no ONNX form")


def _clip(b, x: str, lo, hi, out: str | None = None, dtype=np.float32) -> str:
    bounds = [b.const(dtype(lo)) if lo is not None else "", b.const(dtype(hi)) if hi is not None else ""]
    while bounds and bounds[-1] == "":
        bounds.pop()
    return b.op("Clip", [x, *bounds], out)


@emits("relu", "relu6", "clamp", "sigmoid", "tanh", "hardsigmoid", "hardswish", "silu", "leaky_relu", "gelu")
def _activation(b, n, ins, out):
    _act(b, n.op, n.attrs, ins[0], out)


@emits("softmax")
def _softmax(b, n, ins, out):
    b.op("Softmax", ins, out, axis=int(n.attrs["axis"]))


@emits("attention")
def _attention(b, n, ins, out):
    q, k, v = ins
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])]),
                          b.const(np.float32(n.attrs["scale"]))])
    b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v], out)


@emits("add", "sub", "mul", "div")
def _binary(b, n, ins, out):
    b.op(n.op.capitalize(), ins, out)


# ------------------------------------------------------------------ pooling
@emits("max_pool2d")
def _max_pool(b, n, ins, out):
    a = n.attrs
    b.op("MaxPool", ins, out, kernel_shape=_pair(a["kernel"]), strides=_pair(a["stride"]),
         pads=_pads4(a["padding"]), dilations=_pair(a["dilation"]), ceil_mode=int(bool(a["ceil_mode"])))


@emits("avg_pool2d")
def _avg_pool(b, n, ins, out):
    a = n.attrs
    b.op("AveragePool", ins, out, kernel_shape=_pair(a["kernel"]), strides=_pair(a["stride"]),
         pads=_pads4(a["padding"]), ceil_mode=int(bool(a["ceil_mode"])),
         count_include_pad=int(bool(a["count_include_pad"])))


@emits("adaptive_avg_pool2d", "adaptive_max_pool2d")
def _adaptive_pool(b, n, ins, out):
    h, w = b.graph.type_of(n.inputs[0]).shape[2:]
    oh, ow = n.type.shape[2:]
    avg = n.op == "adaptive_avg_pool2d"
    if (oh, ow) == (1, 1):
        b.op("GlobalAveragePool" if avg else "GlobalMaxPool", ins, out)
    elif h % oh == 0 and w % ow == 0:  # equal windows: an ordinary pool
        k = [h // oh, w // ow]
        b.op("AveragePool" if avg else "MaxPool", ins, out, kernel_shape=k, strides=k)
    else:
        raise ExportError(f"{n.op} {n.name}: {h}x{w} -> {oh}x{ow} has unequal windows, which ONNX pools cannot "
                          f"express{_where(n)}")


@emits("mean", "amax", "amin")
def _reduce(b, n, ins, out):
    kind = {"mean": "ReduceMean", "amax": "ReduceMax", "amin": "ReduceMin"}[n.op]
    b.op(kind, ins, out, axes=[int(x) for x in n.attrs["axes"]], keepdims=int(bool(n.attrs["keepdim"])))


# ------------------------------------------------------------ data movement
@emits("concat")
def _concat(b, n, ins, out):
    b.op("Concat", ins, out, axis=int(n.attrs["axis"]))


@emits("slice")
def _slice(b, n, ins, out):
    a = n.attrs
    size = b.graph.type_of(n.inputs[0]).shape[a["axis"]]
    start = 0 if a["start"] is None else int(a["start"])
    end = size if a["end"] is None else min(int(a["end"]), size)
    step = 1 if a.get("step") is None else int(a["step"])
    b.op("Slice", [ins[0], b.const(np.array([start], np.int64)), b.const(np.array([end], np.int64)),
                   b.const(np.array([int(a["axis"])], np.int64)), b.const(np.array([step], np.int64))], out)


@emits("reshape")
def _reshape(b, n, ins, out):
    b.op("Reshape", [ins[0], b.const(np.array(n.type.shape, np.int64))], out)


@emits("permute")
def _permute(b, n, ins, out):
    b.op("Transpose", ins, out, perm=[int(d) for d in n.attrs["dims"]])


@emits("repeat")
def _repeat(b, n, ins, out):
    reps = [int(r) for r in n.attrs["repeats"]]
    x = ins[0]
    nd = b.graph.type_of(n.inputs[0]).ndim
    if len(reps) > nd:  # torch's repeat adds leading axes
        x = b.op("Reshape", [x, b.const(np.array((1,) * (len(reps) - nd) + b.graph.type_of(n.inputs[0]).shape,
                                                 np.int64))])
    b.op("Tile", [x, b.const(np.array(reps, np.int64))], out)


@emits("channel_permute", "channel_shuffle")
def _channel_permute(b, n, ins, out):
    idx = (n.attrs["indices"] if n.op == "channel_permute"
           else shuffle_indices(b.graph.type_of(n.inputs[0]).shape[1], int(n.attrs["groups"])))
    b.op("Gather", [ins[0], b.const(np.array(idx, np.int64))], out, axis=1)


@emits("pixel_shuffle")
def _pixel_shuffle(b, n, ins, out):
    b.op("DepthToSpace", ins, out, blocksize=int(n.attrs["upscale"]), mode="CRD")


@emits("pad")
def _pad(b, n, ins, out):
    a = n.attrs
    nd = b.graph.type_of(n.inputs[0]).ndim
    begin, end = [0] * nd, [0] * nd
    for i, p in enumerate(a["pads"]):  # F.pad order: last axis first, (before, after) pairs
        axis = nd - 1 - i // 2
        (begin if i % 2 == 0 else end)[axis] = int(p)
    mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[a["mode"]]
    extra = [b.const(np.float32(a["value"] or 0.0))] if mode == "constant" else []
    b.op("Pad", [ins[0], b.const(np.array(begin + end, np.int64)), *extra], out, mode=mode)


@emits("resize")
def _resize(b, n, ins, out):
    a = n.attrs
    if a["mode"] == "nearest":
        kw = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    else:
        kw = dict(mode="linear", coordinate_transformation_mode="align_corners" if a["align_corners"]
                  else "pytorch_half_pixel")
    if a.get("scales") is not None:  # torch maps coordinates by the scale given, not by out/in
        scales = b.const(np.array([1.0, 1.0, *[float(s) for s in a["scales"]]], np.float32))
        b.op("Resize", [ins[0], "", scales], out, **kw)
    else:
        b.op("Resize", [ins[0], "", "", b.const(np.array(n.type.shape, np.int64))], out, **kw)


@emits("shift")
def _shift(b, n, ins, out):
    """One zero-padded slice per distinct (dy, dx), concatenated, then the channels back in order."""
    h, w = b.graph.type_of(n.inputs[0]).shape[2:]
    shifts = [(int(dy), int(dx)) for dy, dx in n.attrs["shifts"]]
    p = max(max(abs(dy), abs(dx)) for dy, dx in shifts)
    xp = b.op("Pad", [ins[0], b.const(np.array([0, 0, p, p, 0, 0, p, p], np.int64))], mode="constant")
    groups: dict = {}
    for c, s in enumerate(shifts):
        groups.setdefault(s, []).append(c)
    parts, order = [], []
    for (dy, dx), chans in groups.items():
        sel = b.op("Gather", [xp, b.const(np.array(chans, np.int64))], axis=1)
        parts.append(b.op("Slice", [sel, b.const(np.array([p - dy, p - dx], np.int64)),
                                    b.const(np.array([p - dy + h, p - dx + w], np.int64)),
                                    b.const(np.array([2, 3], np.int64))]))
        order += chans
    if order == list(range(len(order))):
        b.op("Concat", parts, out, axis=1)
    else:
        b.op("Gather", [b.op("Concat", parts, axis=1), b.const(np.argsort(order).astype(np.int64))], out, axis=1)


# --------------------------------------------------------------------- int8
@emits("quantize")
def _quantize(b, n, ins, out):
    b.op("QuantizeLinear", [ins[0], b.const(np.float32(n.attrs["scale"])),
                            b.const(np.uint8(n.attrs["zero_point"]))], out)


@emits("dequantize")
def _dequantize(b, n, ins, out):
    b.op("DequantizeLinear", [ins[0], b.const(np.float32(n.attrs["scale"])),
                              b.const(np.uint8(n.attrs["zero_point"]))], out)


def _u8_as_steps(b, x: str, zp: int, scale: float = 1.0) -> str:
    """A uint8 value as float (x - zp) * scale (QDQ's DequantizeLinear)."""
    return b.op("DequantizeLinear", [x, b.const(np.float32(scale)), b.const(np.uint8(zp))])


@emits("qconv2d", "qlinear")
def _qlayer(b, n, ins, out):
    a, g = n.attrs, b.graph
    w_name, bias_name, m_name = n.inputs[1:4]
    if not all(g.is_param(v) for v in (w_name, bias_name, m_name)):
        raise ExportError(f"{n.op} {n.name}: only constant weights, biases and multipliers are exported")
    m = g.params[m_name].astype(np.float32)
    x = _u8_as_steps(b, ins[0], int(a["x_zp"]))
    w = b.op("DequantizeLinear", [ins[1], b.const(m, f"{m_name}_w"), b.const(np.zeros(m.shape, np.int8))], axis=0)
    bias = b.op("DequantizeLinear", [ins[2], b.const(m, f"{m_name}_b"), b.const(np.zeros(m.shape, np.int32))], axis=0)
    if n.op == "qconv2d":
        y = b.op("Conv", [x, w, bias], strides=_pair(a["stride"]), pads=_pads4(a["padding"]),
                 dilations=_pair(a["dilation"]), group=int(a["groups"]))
        if len(ins) > 4:  # uint8 residual
            y = b.op("Add", [y, _u8_as_steps(b, ins[4], int(a.get("r_zp", 0)), float(a.get("r_mult", 0.0)))])
    else:
        y = b.op("Add", [b.op("MatMul", [x, b.op("Transpose", [w], perm=[1, 0])]), bias])
    act = a.get("act")
    if act is not None:
        if act not in float_acts():
            raise ExportError(f"{n.op} {n.name}: fused activation {act!r} has no ONNX form")
        y = _act(b, act, {}, y)
        if a["out_dtype"] == "uint8":
            y = b.op("Mul", [y, b.const(np.float32(a.get("out_inv", 1.0)))])
    lo, hi = a.get("lo"), a.get("hi")
    if a["out_dtype"] == "uint8":
        zp = int(a["out_zp"])
        if lo is not None or hi is not None:  # clamp(round(y) + zp, lo, hi) = round(clip(y, lo - zp, hi - zp)) + zp
            y = _clip(b, y, None if lo is None else lo - zp, None if hi is None else hi - zp)
        b.op("QuantizeLinear", [y, b.const(np.float32(1.0)), b.const(np.uint8(zp))], out)
    elif lo is not None or hi is not None:
        _clip(b, y, lo, hi, out)
    else:
        b.op("Identity", [y], out)


@emits("fake_quant")
def _fake_quant(b, n, ins, out):
    a = n.attrs
    s, zp = b.const(np.float32(a["scale"])), b.const(np.float32(a["zero_point"]))
    q = _clip(b, b.op("Add", [b.op("Round", [b.op("Div", [ins[0], s])]), zp]), a["qmin"], a["qmax"])
    b.op("Mul", [b.op("Sub", [q, zp]), s], out)


@emits("fake_quant_channel")
def _fake_quant_channel(b, n, ins, out):
    nd = b.graph.type_of(n.inputs[0]).ndim
    s = b.op("Reshape", [ins[1], b.const(np.array([-1] + [1] * (nd - 1), np.int64))])
    q = _clip(b, b.op("Round", [b.op("Div", [ins[0], s])]), -n.attrs["qmax"], n.attrs["qmax"])
    b.op("Mul", [q, s], out)


# ------------------------------------------------------------------ driver
def _where(n) -> str:
    return f" (from {n.source})" if getattr(n, "source", "") else ""


def to_onnx(graph: Graph, opset: int = OPSET):
    """The graph as an onnx.ModelProto (parameters as initializers; not checked)."""
    from onnx import helper

    missing = sorted({n.op for n in graph.nodes if n.op not in EMITTERS})
    if missing:
        first = next(n for n in graph.nodes if n.op in missing)
        raise ExportError(f"no ONNX form for op {first.op!r} (node {first.name}){_where(first)}; "
                          f"exportable ops: shave.onnx_export.EMITTERS")
    b = _Builder(graph)
    for n in graph.nodes:
        EMITTERS[n.op](b, n, list(n.inputs), n.name)
    # parameters the ONNX nodes read (a linear layer's weight is written transposed, not twice)
    used = {v for node in b.nodes for v in node.input} | set(graph.outputs)
    for name, arr in graph.params.items():
        if name in used:
            b.initializers.append(b.numpy_helper.from_array(np.ascontiguousarray(arr), name))
    value_info = lambda name, t: helper.make_tensor_value_info(name, _ONNX_DTYPES[t.dtype], list(t.shape))  # noqa: E731
    inputs = [value_info(name, t) for name, t in graph.inputs]
    outputs = []
    for i, v in enumerate(graph.outputs):
        if any(v == name for name, _ in graph.inputs) or graph.is_param(v) or v in graph.outputs[:i]:
            alias = b.op("Identity", [v])  # an ONNX graph output must be a node's own output
            outputs.append(value_info(alias, graph.type_of(v)))
        else:
            outputs.append(value_info(v, graph.type_of(v)))
    og = helper.make_graph(b.nodes, "shave", inputs, outputs, b.initializers)
    model = helper.make_model(og, opset_imports=[helper.make_opsetid("", opset)], producer_name="shave")
    model.ir_version = min(model.ir_version, 8)  # readable by older runtimes
    return model


def export_onnx(model, path, *, opset: int = OPSET, check: bool = True) -> Path:
    """Write `model` (a shave Graph, or a CompiledModel: its compiled graph) as an ONNX file.

    Int8 graphs are written in QDQ form (module docstring). With `check`, the file is run in ONNX
    Runtime on two seeded random inputs and compared with the IR (ExportError on a mismatch).
    Returns the path.

        cm = shave.compile(model, (x,), passes=["fold_bn", Prune(ratio=0.3)])
        shave.export_onnx(cm, "pruned.onnx")
    """
    import onnx

    graph = getattr(model, "graph", model)
    if not isinstance(graph, Graph):
        raise ExportError(f"export_onnx wants a shave Graph or CompiledModel, got {type(model).__name__}")
    proto = to_onnx(graph, opset)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the ONNX model is not valid: {str(e).splitlines()[0]}") from None
    path = Path(path)
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {path.parent} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(proto.SerializeToString())
        if check:
            check_onnx(graph, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_onnx(graph: Graph, path, probes=None) -> float:
    """Run the ONNX file at `path` in ONNX Runtime against the IR's reference on `probes` (two seeded
    random inputs by default); the worst relative error of the outputs, or ExportError.

    A float graph must match within FLOAT_TOLERANCE. A graph that rounds floats to int8 is checked
    node by node instead: ONNX Runtime's value of every node against the IR's op run on ONNX
    Runtime's own values of its inputs, within one code for integer values and 1e-3 of the scale
    for float ones. The QDQ form computes each int8 layer in float (a per-channel multiplier on
    the dequantized weights), so a value on a rounding boundary may take the other code; end to
    end, such one-code differences compound through a deep network (MobileNetV2 with ImageNet
    weights: 10-15 % of the logit scale), which says nothing about the export, while a wrong
    emitter shows at its own node."""
    from .runtime.report import rounds_floats_to_int8

    layerwise = rounds_floats_to_int8(graph)
    if not layerwise:
        return _compare(graph, path, probes, layerwise)
    values = _with_every_value_as_output(graph, path)
    try:
        return _compare(graph, values, probes, layerwise)
    finally:
        values.unlink(missing_ok=True)


def _compare(graph: Graph, path, probes, layerwise: bool) -> float:
    import onnxruntime as ort

    from .passes.instruments import random_probes
    from .reference import run_graph
    from .runtime.report import relative_error

    options = ort.SessionOptions()
    # the file as written (ORT's fusions replace QDQ groups by its own int8 kernels, which on AVX2 hosts
    # saturate with 8-bit weights: that is ORT's arithmetic, not the export's; see README)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT's own error, shortened
        raise ExportError(f"ONNX Runtime cannot load the export: {str(e).splitlines()[0][:300]}") from None
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    worst = 0.0
    for inputs in probes or random_probes(graph):
        got = dict(zip(out_names, sess.run(None, dict(zip(names, inputs)))))
        want = run_graph(graph, list(inputs))
        final = [got[o] for o in out_names[:len(graph.outputs)]]
        worst = max(worst, relative_error([g.astype(np.float64) for g in final], [w.astype(np.float64) for w in want]))
        if layerwise:
            _check_each_node(graph, inputs, got)
    if not layerwise and not worst <= FLOAT_TOLERANCE:
        raise ExportError(f"the ONNX export disagrees with the IR in ONNX Runtime by {worst:.3g} "
                          f"(relative; tolerance {FLOAT_TOLERANCE:g})")
    return worst


def _with_every_value_as_output(graph: Graph, path) -> Path:
    """A copy of the ONNX file beside `path` whose outputs also include every IR node's value."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    have = {o.name for o in model.graph.output}
    for n in graph.nodes:
        if n.name not in have:
            model.graph.output.append(helper.make_tensor_value_info(n.name, _ONNX_DTYPES[n.type.dtype],
                                                                    list(n.type.shape)))
    probe = Path(str(path) + ".values")
    probe.write_bytes(model.SerializeToString())
    return probe


def _check_each_node(graph: Graph, inputs, got: dict) -> None:
    """Every node's ONNX Runtime value against the IR's op on ONNX Runtime's values of its inputs."""
    import torch

    from .reference.interpreter import _call

    env = {name: x for (name, _), x in zip(graph.inputs, inputs)}
    env.update(got)
    for n in graph.nodes:
        args = [torch.from_numpy(np.array(env[v] if v in env else graph.params[v])) for v in n.inputs]
        fn, attrs = _call(graph, n)
        with torch.no_grad():
            want = fn(*args, **attrs).numpy().astype(np.float64)
        have = np.asarray(got[n.name], np.float64)
        diff = float(np.abs(have - want).max(initial=0.0)) if have.shape == want.shape else float("inf")
        if np.dtype(n.type.dtype).kind in "iu":
            if diff > 1:
                raise ExportError(f"the ONNX export of node {n.name!r} ({n.op}){_where(n)} disagrees with the IR "
                                  f"by {diff:g} codes on the same inputs (at most 1 is rounding)")
        elif diff > 1e-3 * max(float(np.abs(want).max(initial=0.0)), 1e-12):
            raise ExportError(f"the ONNX export of node {n.name!r} ({n.op}){_where(n)} disagrees with the IR by "
                              f"{diff:.3g} on the same inputs (relative {diff / max(np.abs(want).max(), 1e-12):.3g})")
