"""Which float layers become one scheduled conv kernel with their epilogue, and in which layout
the values between those kernels are kept: decided on shave's IR, before lowering.

A kernel computes `layer -> [add of a residual] -> [activation]` (Graph.epilogue; an activation
qualifies when its op has an `epilogue` trait in the registry, the expression conv_spec._act
evaluates). The layer is a float32 conv2d with constant weights (dense; grouped where the groups
fill vector blocks; groups narrower than a vector with as many input as output channels, e.g.
ResNeXt's and RegNet's, group by group inside the vector: lane_groups.py; other narrow groups
merged; depthwise), or a 2-d linear layer with constant
weights, computed as a 1x1 conv with the batch along the width (the weights are then read once
per call; TVM's legalized matmul reads them strided, once per output). A `shift` read only by
the conv is folded into the kernel's input packing.

Layout: a kernel's output that only other kernels read (as their input or residual) stays
blocked ([N, C/v, H, W, v]) and both transposes between the kernels go. Channel counts that
are not a multiple of v are rounded up to whole blocks for the kernels that can (ragged_blocks:
dense and depthwise direct convs, lane-groups convs), so MobileNetV3's 72 / 88 / 120 channels
stay blocked on 16-lane AVX-512 as they do on 8-lane AVX2.
Global average pools and per-channel gate multiplies (the squeeze-and-excitation blocks of
MobileNetV3, EfficientNet, RegNetY) also read the blocked layout, and a gate multiply whose
product only kernels read writes it blocked: the depthwise conv before an SE block and the
projection after it then keep the blocked layout too (EfficientNet-B0 17.9 -> 15.7 ms).

lower.py emits each planned kernel as one call_tir in place of its nodes; the int8 layers
(qconv2d / qlinear) carry their fused activation in their attributes (Quantize decides it) and
are lowered to call_tir the same way (lower_quant.py).
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ....ir import Graph, Node, get_op
from .conv import ConvSpec, build_primfunc, pack_weight
from . import lane_groups
from .kernels import choose, kernel_of

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ConvKernel:
    """One planned kernel: `nodes` (the layer first, the tail last) computed by one call_tir."""
    spec: ConvSpec  # with its layouts and tile
    nodes: tuple[str, ...]
    x: str  # the value the kernel reads (a folded shift's input)
    residual: str | None
    weight: np.ndarray  # [OC, C/groups, KH, KW] as the kernel's groups see it
    bias: np.ndarray
    shifts: tuple = ()  # (DY, DX) int32 [C] of a folded shift
    shift_node: str | None = None
    linear: bool = False  # a linear layer computed as a 1x1 conv on x laid out [1, K, 1, N]
    lead: tuple = ()  # an N-d linear layer's leading axes (x[*lead, K] is computed as [prod(lead), K])
    prim: object = None  # the built PrimFunc
    packed: np.ndarray | None = None  # the weights in the kernel's layout

    @property
    def tail(self) -> str:
        return self.nodes[-1]


@dataclasses.dataclass
class ConvPlan:
    kernels: dict[str, ConvKernel]  # by tail
    blocked: set[str]  # values produced and read in the blocked layout
    pools: set = dataclasses.field(default_factory=set)  # global average pools reading a blocked value
    gates: dict = dataclasses.field(default_factory=dict)  # per-channel multiply on the blocked layout -> (data, gate)
    passthrough: dict = dataclasses.field(default_factory=dict)  # node -> kind (passthrough_kind), blocked in and out

    def covered(self) -> set[str]:
        """Nodes computed inside a kernel without being its tail (lower.py skips them)."""
        out = set()
        for k in self.kernels.values():
            out.update(k.nodes[:-1])
            if k.shift_node is not None:
                out.add(k.shift_node)
        return out


def kernel_groups(c: int, oc: int, groups: int, vec: int) -> int:
    """How many groups the packed kernel runs a grouped conv as: the most (dividing
    `groups`) whose output channels fill whole vector blocks and whose input channels
    fill whole blocks or fewer than one. Groups narrower than that are merged with their
    neighbours (zero weights between them): the kernel computes up to vec/(oc/groups)
    times the conv's MACs, still far faster than TVM's unscheduled grouped conv."""
    for g in range(groups, 0, -1):
        if groups % g == 0 and (g == 1 or ((oc // g) % vec == 0 and ((c // g) % vec == 0 or c // g < vec))):
            return g
    return 1


def grouped_lanes(c: int, oc: int, groups: int, vec: int) -> tuple[int, int]:
    """(vector lanes, kernel groups) for a grouped conv the lane-groups kernel does not take, on a
    CPU with `vec` fp32 lanes: the full width, unless merging groups narrower than a vector would
    compute more than twice the conv's multiply-adds where half-width vectors (ymm on AVX-512,
    xmm on AVX2) would merge fewer, at half the lanes per instruction (5 groups of 8 input and 4
    output channels on 8 lanes: one dense conv, 5x the work; on 4 lanes the groups as they are).
    Such half-width kernels read and write NCHW."""
    g = kernel_groups(c, oc, groups, vec)
    while vec >= 8:
        half = vec // 2
        g_half = kernel_groups(c, oc, groups, half)
        if groups / g <= 2 * groups / g_half:
            break
        vec, g = half, g_half
    return vec, g


def narrow_lanes(oc: int, vec: int) -> int:
    """Vector lanes for a dense conv with `oc` output channels on a CPU with `vec` fp32 lanes: the
    full width, unless the output channels fill at most half a vector, then the narrowest width
    (>= 4) that holds them. LeNet-5's 6-channel first conv used 6 of 16 lanes: on 8 it uses 6 of
    8, twice the useful multiply-adds per instruction where a half-width FMA issues at the same
    rate per lane (Zen 4's 512-bit FMAs are two 256-bit halves), the same where it issues at
    half the rate. Such a kernel reads and writes NCHW (as `grouped_lanes`' half-width ones)."""
    while vec > 4 and 2 * oc <= vec:
        vec //= 2
    return vec


def merge_groups(w: np.ndarray, groups: int, kernel_groups: int) -> np.ndarray:
    """[OC, C/groups, KH, KW] -> [OC, C/kernel_groups, KH, KW]: each output channel's
    weights at its group's place inside the merged group, zeros elsewhere."""
    if groups == kernel_groups:
        return w
    oc, icg = w.shape[:2]
    m = groups // kernel_groups
    out = np.zeros((oc, icg * m) + w.shape[2:], w.dtype)
    for o in range(oc):
        p = (o // (oc // groups)) % m
        out[o, p * icg:(p + 1) * icg] = w[o]
    return out


def _f32_param(graph: Graph, value: str) -> np.ndarray | None:
    a = graph.params.get(value)
    return a if a is not None and a.dtype == np.float32 else None


def _conv_kernel(graph: Graph, node: Node, isa) -> ConvKernel | None:
    """The kernel for a conv2d / linear layer alone (no epilogue yet), or None. A linear layer on
    x[..., K] (channels-last blocks, ConvNeXt) is one on the [prod(...), K] view."""
    vec = isa.fp32_lanes
    xt = graph.type_of(node.inputs[0])
    w = _f32_param(graph, node.inputs[1])
    b = _f32_param(graph, node.inputs[2]) if len(node.inputs) > 2 else None
    if w is None or xt.dtype != "float32" or node.type.dtype != "float32" or (len(node.inputs) > 2 and b is None):
        return None
    if node.op == "linear":
        if len(xt.shape) < 2 or w.ndim != 2:
            return None
        n, k, j = int(np.prod(xt.shape[:-1])), xt.shape[-1], w.shape[0]
        spec = ConvSpec(1, k, 1, n, j, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), False, None, False, vec,
                        regs=isa.vector_registers, fma_pipes=isa.fma_pipes)
        return ConvKernel(spec, (node.name,), node.inputs[0], None, w.reshape(j, k, 1, 1),
                          np.zeros(j, np.float32) if b is None else b.reshape(-1), linear=True,
                          lead=tuple(xt.shape[:-1]) if len(xt.shape) > 2 else ())
    if node.op != "conv2d" or len(xt.shape) != 4:
        return None
    a = node.attrs
    n, c, h, wd = xt.shape
    oc, icg = w.shape[:2]
    groups = int(a["groups"])
    if groups == c and icg == 1 and oc == c:
        depthwise, kgroups = True, 1
    elif icg * groups == c and oc % groups == 0:
        depthwise = False
        if groups > 1 and lane_groups.supports_groups(c, oc, groups, vec):
            # group by group inside the vector, at full width (ResNeXt-50 at batch 8: 0.95x the
            # time of its 4- and 8-channel groups merged into 16-lane blocks; RegNetY-400MF 0.92x
            # that of its 8-lane NCHW kernels; docs/tvm-notes.md)
            kgroups = groups
        else:
            vec, kgroups = grouped_lanes(c, oc, groups, vec) if groups > 1 else (narrow_lanes(oc, vec), 1)
    else:
        return None
    pad = tuple(int(p) for p in a["padding"])
    pad = pad * 2 if len(pad) == 2 else pad
    stride, dilation = tuple(int(s) for s in a["stride"]), tuple(int(d) for d in a["dilation"])
    spec = ConvSpec(n, c, h, wd, oc, w.shape[2], w.shape[3], stride, pad, dilation, depthwise, None, False, vec,
                    groups=kgroups, regs=isa.vector_registers, fma_pipes=isa.fma_pipes)
    if spec.oh < 1 or spec.ow < 1 or (n, oc, spec.oh, spec.ow) != node.type.shape:
        return None
    w, spec = _trim_padding_taps(w, spec)
    spec = dataclasses.replace(spec, kernel=choose(spec))
    weight = w if depthwise else merge_groups(w, groups, kgroups)
    return ConvKernel(spec, (node.name,), node.inputs[0], None, weight,
                      np.zeros(oc, np.float32) if b is None else b.reshape(-1))


def _live_taps(size: int, k: int, stride: int, pad_lo: int, dil: int, out: int) -> tuple[int, int]:
    """First and last kernel tap (along one axis) that reads a real input position for some output."""
    live = [t for t in range(k) if any(0 <= o * stride - pad_lo + t * dil < size for o in range(out))]
    return (live[0], live[-1]) if live else (k // 2, k // 2)


def _trim_padding_taps(w: np.ndarray, spec: ConvSpec) -> tuple[np.ndarray, ConvSpec]:
    """Drop the kernel's outer rows/columns that read only zero padding at every output position
    (dilated convs on small maps: DeepLabV3's rates 24 and 36 on a 14x14 map are 1x1 convs): exact,
    the same output, fewer multiplies. The padding shrinks by what the dropped taps covered."""
    (t0, t1), (l0, l1) = (_live_taps(spec.h, spec.kh, spec.stride[0], spec.pad[0], spec.dilation[0], spec.oh),
                          _live_taps(spec.w, spec.kw, spec.stride[1], spec.pad[1], spec.dilation[1], spec.ow))
    dh, dw = spec.dilation
    pad = (spec.pad[0] - t0 * dh, spec.pad[1] - l0 * dw,
           spec.pad[2] - (spec.kh - 1 - t1) * dh, spec.pad[3] - (spec.kw - 1 - l1) * dw)
    if (t1 - t0 + 1, l1 - l0 + 1) == (spec.kh, spec.kw) or min(pad) < 0:
        return w, spec
    kh, kw = t1 - t0 + 1, l1 - l0 + 1
    trimmed = dataclasses.replace(spec, kh=kh, kw=kw, pad=pad, dilation=(dh if kh > 1 else 1, dw if kw > 1 else 1))
    assert (trimmed.oh, trimmed.ow) == (spec.oh, spec.ow)
    return np.ascontiguousarray(w[:, :, t0:t1 + 1, l0:l1 + 1]), trimmed


def _with_epilogue(graph: Graph, k: ConvKernel, taken: set) -> ConvKernel:
    """`k` extended by its layer's residual add and activation, and by a shift feeding it."""
    layer = graph.producer(k.nodes[0])
    shape = layer.type.shape

    def residual(v):
        t = graph.type_of(v)
        return not k.linear and t.shape == shape and t.dtype == "float32"

    ep = graph.epilogue(layer, residual=residual, act=lambda n: get_op(n.op).epilogue is not None)
    nodes, spec = [layer.name], k.spec
    if ep.add is not None and ep.add.name in taken:  # the sum of two layers: the first one's epilogue
        ep.add = ep.act = None
    if ep.add is not None:
        nodes.append(ep.add.name)
        k.residual, spec = ep.residual, dataclasses.replace(spec, residual=True)
    if ep.act is not None:
        nodes.append(ep.act.name)
        spec = dataclasses.replace(spec, act=get_op(ep.act.op).epilogue(ep.act.attrs))
    src = graph.producer(k.x)
    if (src is not None and src.op == "shift" and not k.linear and src.name not in taken
            and graph.use_count(src.name) == 1 and graph.type_of(src.inputs[0]).dtype == "float32"):
        k.x, k.shift_node = src.inputs[0], src.name
        k.shifts = tuple(np.asarray([s[i] for s in src.attrs["shifts"]], dtype="int32") for i in (0, 1))
        spec = dataclasses.replace(spec, shift=True)
        spec = dataclasses.replace(spec, kernel=choose(spec))
    k.nodes, k.spec = tuple(nodes), spec
    return k


def global_pool(graph: Graph, n: Node) -> bool:
    """A mean of a 4-d value over its whole H x W (adaptive_avg_pool2d to 1x1, or mean over axes 2, 3)."""
    if n.op == "adaptive_avg_pool2d":
        return tuple(n.attrs["output_size"]) == (1, 1) and len(graph.type_of(n.inputs[0]).shape) == 4
    if n.op == "mean" and len(graph.type_of(n.inputs[0]).shape) == 4:
        return sorted(a % 4 for a in n.attrs["axes"]) == [2, 3]
    return False


def gate_of(graph: Graph, n: Node) -> tuple[str, str] | None:
    """(data, gate) of a multiply of a 4-d float value by a per-channel [N, C, 1, 1] value (an SE
    block's scale), else None."""
    if n.op != "mul" or len(n.inputs) != 2 or n.inputs[0] == n.inputs[1] or any(graph.is_param(v) for v in n.inputs):
        return None
    for data, gate in (n.inputs, n.inputs[::-1]):
        d, g = graph.type_of(data), graph.type_of(gate)
        if (len(d.shape) == 4 and d.shape == n.type.shape and g.shape == (d.shape[0], d.shape[1], 1, 1)
                and d.dtype == g.dtype == "float32"):
            return data, gate
    return None


def passthrough_kind(graph: Graph, n: Node, vec: int) -> str | None:
    """How node `n` computes on the blocked layout ([N, C/v, H, W, v] in and out) when its tensor
    inputs are blocked: "concat" (along channels, every part whole channel blocks: the blocks are
    concatenated), "max_pool" or "avg_pool" (a window on H x W, vectorised over the v lanes; an
    average only where torch divides by the whole window), "activation" (per
    element: the ops a conv epilogue can apply) or "batch_norm" (constant statistics: a
    per-channel scale and shift); None when it needs NCHW. Between conv kernels these keep the
    blocked layout through SqueezeNet's and Inception's concats and pools and DenseNet's
    concat -> batch norm -> relu, instead of a transpose on each side and a scalar loop. Pools
    and activations also take channels that do not fill the last block (ShuffleNetV2's 24-channel
    stem -> max pool): they compute the padding lanes from finite values into finite values, which
    no reader takes into a real channel (conv_spec.blocked_shape); a concat or a batch norm needs
    whole blocks."""
    t = n.type
    if len(t.shape) != 4 or t.dtype != "float32":
        return None
    whole = t.shape[1] % vec == 0
    ins = [graph.type_of(v) for v in n.inputs]
    if n.op == "concat":
        ok = (n.attrs["axis"] % 4 == 1 and len(set(n.inputs)) == len(n.inputs)
              and not any(graph.is_param(v) for v in n.inputs)
              and all(len(i.shape) == 4 and i.shape[1] % vec == 0 and i.dtype == "float32" for i in ins))
        return "concat" if ok else None
    if graph.is_param(n.inputs[0]) or ins[0].shape[1] != t.shape[1]:
        return None
    if n.op == "max_pool2d":
        return "max_pool"
    if n.op == "avg_pool2d":  # only where torch divides every window by its whole size
        from ..lower_float import pool_padding

        a = n.attrs
        pad = pool_padding(n, ins[0].shape, a)
        exact = pad[2:] == list(a["padding"])  # no padding added for ceil_mode
        return "avg_pool" if exact and (a["count_include_pad"] or not any(a["padding"])) else None
    if n.op == "batch_norm" and whole and all(graph.is_param(v) for v in n.inputs[1:]):
        return "batch_norm"
    if len(n.inputs) == 1 and get_op(n.op).epilogue is not None and ins[0].shape == t.shape:
        return "activation"
    return None


def ragged_blocks(k: ConvKernel) -> bool:
    """Whether kernel `k` reads and writes the blocked layout also where its channels do not fill
    whole blocks (conv_spec.blocked_shape's padding lanes), as its kernel class says
    (kernels.py, `ragged`): dense and depthwise direct convs and lane-groups convs do; the direct
    kernel's grouped convs (whose blocks must not straddle groups), Winograd's and linear layers
    need whole blocks."""
    return not k.linear and kernel_of(k.spec).ragged(k.spec)


def _blocked(graph: Graph, kernels: list[ConvKernel], vec: int) -> tuple[set, set, dict, dict]:
    """(values kept blocked, global pools reading them, gate multiplies making them with their
    (data, gate) operands, pass-through nodes making them with their kind): a kernel output, a
    gate multiply's output or a pass-through node's (passthrough_kind) whose every reader can
    read the blocked layout: a conv kernel (as its input or residual), a global pool, or a gate
    multiply or pass-through node that is itself blocked (whose blocked inputs are all blocked).
    Found as a fixpoint: candidates are dropped until every reader of every one qualifies."""
    reader_kernel = {}  # node computed by a kernel -> the kernel
    for k in kernels:
        for v in k.nodes + ((k.shift_node,) if k.shift_node else ()):
            reader_kernel[v] = k
    narrow = {id(k) for k in kernels if k.spec.vec != vec}  # narrower vectors (grouped_lanes, narrow_lanes): NCHW
    ragged = {id(k) for k in kernels if ragged_blocks(k)}
    unreadable = {k.x for k in kernels
                  if not k.linear and (k.spec.c // k.spec.groups) % k.spec.vec and id(k) not in ragged}
    # kernels whose output channels (and so residual's) can be blocked
    blocks_out = {id(k) for k in kernels
                  if not k.linear and id(k) not in narrow and (k.spec.oc % vec == 0 or id(k) in ragged)}
    gates = {n.name: gate_of(graph, n) for n in graph.nodes}
    gates = {name: dg for name, dg in gates.items() if dg is not None}
    through = {n.name: passthrough_kind(graph, n, vec) for n in graph.nodes if n.name not in reader_kernel}
    through = {name: kind for name, kind in through.items() if kind is not None}
    blocked = {k.tail for k in kernels if id(k) in blocks_out} | set(gates) | set(through)
    users = {v: graph.users(v) for v in blocked}
    changed = True
    while changed:
        changed = False
        for v in sorted(blocked):
            if v in gates and gates[v][0] not in blocked:
                ok = False
            elif v in through and any(u not in blocked for u in graph.node(v).inputs if not graph.is_param(u)):
                ok = False
            else:
                ok = v not in graph.outputs and bool(users[v])
                for r in users[v]:
                    if r.inputs.count(v) != 1:
                        ok = False
                    elif r.name in reader_kernel:
                        k = reader_kernel[r.name]
                        ok &= (not k.linear and id(k) not in narrow
                               and ((k.x == v and v not in unreadable) or (k.residual == v and id(k) in blocks_out)))
                    elif global_pool(graph, r):
                        pass
                    elif r.name in gates and gates[r.name][0] == v:
                        ok &= r.name in blocked
                    elif r.name in through:
                        ok &= r.name in blocked
                    else:
                        ok = False
            if not ok:
                blocked.discard(v)
                changed = True
    pools = {r.name for v in blocked for r in users[v] if r.name not in reader_kernel and global_pool(graph, r)}
    return (blocked, pools, {name: dg for name, dg in gates.items() if name in blocked},
            {name: kind for name, kind in through.items() if name in blocked})


def plan_convs(graph: Graph, isa, tiles: dict | None = None) -> ConvPlan:
    """The kernels for `graph` on a CPU with `isa` (shave.isa.ISA), built; `tiles` maps a
    ConvSpec (layouts unset, tile None) to the register tile to use instead of the default.
    A kernel that fails to build leaves its nodes to the generic lowering, with a logged
    warning (and, when layouts were blocked, the plan is made again with every value in NCHW)."""
    tiles = tiles or {}
    kernels: list[ConvKernel] = []
    taken: set = set()
    for n in graph.nodes:
        if n.op in ("conv2d", "linear") and n.name not in taken:
            k = _conv_kernel(graph, n, isa)
            if k is not None:
                k = _with_epilogue(graph, k, taken)
                taken.update(k.nodes)
                if k.shift_node:
                    taken.add(k.shift_node)
                kernels.append(k)
    blocked, pools, gates, through = _blocked(graph, kernels, isa.fp32_lanes)
    built = _build(kernels, blocked, tiles)
    if built is None:
        (blocked, pools, gates, through), built = (set(), set(), {}, {}), _build(kernels, set(), tiles)
    return ConvPlan({k.tail: k for k in built}, blocked, pools, gates, through)


def _build(kernels: list[ConvKernel], blocked: set, tiles: dict) -> list[ConvKernel] | None:
    """The kernels with their layouts set and their PrimFuncs built (those that fail dropped);
    None when one fails while some layout is blocked."""
    out, cache = [], {}
    for k in kernels:
        if k.linear:  # x[N, K] -> [1, K/v, 1, N, v] and back: vector-wide chunks moved, not single values
            wide = k.spec.w > 1
            spec = dataclasses.replace(k.spec, in_blocked=wide and k.spec.c % k.spec.vec == 0,
                                       out_blocked=wide and k.spec.oc % k.spec.vec == 0)
        else:
            spec = dataclasses.replace(k.spec, in_blocked=k.x in blocked, out_blocked=k.tail in blocked,
                                       res_blocked=k.residual is not None and k.residual in blocked)
        tile = tiles.get(spec, tiles.get(k.spec))
        if tile is not None:
            spec = dataclasses.replace(spec, tile=tuple(tile))
        try:
            if spec not in cache:
                cache[spec] = build_primfunc(spec)
            packed = pack_weight(spec, k.weight)
        except Exception as e:
            if blocked:
                return None
            log.warning("conv kernel for node %r not built (%s: %s); TVM's generic conv computes it, slower",
                        k.nodes[0], type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
            continue
        out.append(dataclasses.replace(k, spec=spec, prim=cache[spec], packed=packed))
    return out
