"""IR -> Relax, emitted op by op with a BlockBuilder.

Parameters become Relax constants, so TVM folds and pre-transforms weights
at compile time. Every IR op has one entry in the lowering table (lowering.py),
filled by lower_float.py (float ops) and lower_quant.py (int8 ops). For a CPU target, the
float layers that schedules/fusion.py plans as conv kernels (with their fused residual add,
activation and input shift) are emitted instead as one call_tir each, at their last node.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ...errors import CompileError
from ...ir import Graph
from . import lower_float, lower_quant  # noqa: F401  (fill the lowering table)
from .lower_float import add_opaque, batch_norm_affine, pool_padding
from .lowering import LOWERING_CPU, LOWERING_DOT, LOWERINGS, R, _shape, reshape


def to_relax(graph: Graph, target: dict | None = None, kernels: dict | None = None,
             tiles: dict | None = None, calls: list | None = None, variants: dict | None = None) -> tvm.IRModule:
    """The graph as an IRModule with one function `main(inputs...) -> tuple of outputs`
    (and one more function per entry of `variants`, {name: graph}: the same graph at other
    batch sizes, ir/rebatch.py; their weights are the same constants, stored once).
    With a CPU `target`: the conv kernels of schedules/fusion.py, sized for its vector width
    (`tiles`: register tiles from tuning, by ConvSpec; `kernels`, if given, is filled with
    {ConvSpec: GlobalVar} of the kernels made), and int8 kernels' weights packed for its dot
    product (AVX2's without a target). `calls`, if given, is filled with one
    {"kernel", "nodes", "flops"} per call of one of shave's kernels (conv kernels with their
    epilogue; int8 layers, shift and other single-node kernels), in the order main calls them."""
    calls = [] if calls is None else calls
    kernels = {} if kernels is None else kernels
    functions = {"main": (fold_channel_gathers(graph), calls),
                 **{name: (fold_channel_gathers(g), []) for name, g in (variants or {}).items()}}
    bb = relax.BlockBuilder()
    if target is None:
        for name, (g, c) in functions.items():
            _emit_function(bb, name, g, None, kernels, c)
        return bb.get()
    from ...isa import isa
    from .schedules.fusion import plan_convs

    desc = isa(target)
    cpu = target.get("kind") == "llvm"
    token, cpu_token = LOWERING_DOT.set(desc.int8_dot), LOWERING_CPU.set(desc if cpu else None)
    try:
        for name, (g, c) in functions.items():
            plan = plan_convs(g, desc, tiles) if cpu else None
            _emit_function(bb, name, g, plan, kernels, c)
        return bb.get()
    finally:
        LOWERING_DOT.reset(token)
        LOWERING_CPU.reset(cpu_token)


def fold_channel_gathers(graph: Graph) -> Graph:
    """The graph (a copy, where anything changes) with each channel slice or channel_permute of a
    channel_permute reading the first one's input directly, as one smaller gather; the first is
    dropped where nothing else reads it. ShuffleNet's split after its shuffle becomes one gather per
    branch, each lowered to injective ops that TVM fuses into the concat reading it (lower_float's
    channel_permute), instead of a gather of every channel and a copy of each half. Node names are
    kept (the manifest's kernel records name them)."""
    permutes = {n.name for n in graph.nodes if n.op == "channel_permute"}

    def reads_gather(n) -> bool:
        return (n.op == "channel_permute" or (n.op == "slice" and n.attrs["axis"] == 1)) and n.inputs[0] in permutes

    if not any(reads_gather(n) for n in graph.nodes):
        return graph
    g = graph.copy()
    made = {n.name: n for n in g.nodes}
    for n in g.nodes:
        if not reads_gather(n):
            continue
        src = made[n.inputs[0]]
        idx = tuple(src.attrs["indices"])
        idx = (tuple(idx[i] for i in n.attrs["indices"]) if n.op == "channel_permute"
               else idx[n.attrs["start"]:n.attrs["end"]:n.attrs["step"]])
        n.op, n.inputs, n.attrs = "channel_permute", [src.inputs[0]], {"indices": idx}
        permutes.add(n.name)
    return g.remove_dead()


def _emit_function(bb, fname: str, graph: Graph, plan, kernels: dict, calls: list) -> None:
    vars_ = [relax.Var(name, relax.TensorType(t.shape, t.dtype)) for name, t in graph.inputs]
    env: dict[str, relax.Expr] = {name: v for (name, _), v in zip(graph.inputs, vars_)}
    skip = plan.covered() if plan is not None else set()
    with bb.function(fname, vars_):
        with bb.dataflow():
            for name, arr in graph.params.items():
                env[name] = relax.const(np.ascontiguousarray(arr))
            for n in graph.nodes:
                if n.name in skip:
                    continue
                k = plan.kernels.get(n.name) if plan is not None else None
                if plan is not None and (n.name in plan.pools or n.name in plan.gates or n.name in plan.passthrough):
                    env[n.name] = _on_blocked(bb, n, plan, env)
                elif k is not None:
                    env[n.name] = _conv_call(bb, k, env, kernels)
                    covered = list(k.nodes) + ([k.shift_node] if k.shift_node else [])
                    layer = graph.node(k.nodes[0])  # counted at the taps the kernel computes (some may be dropped)
                    taps = k.spec.kh * k.spec.kw / (_layer_taps(graph, layer) or 1)
                    calls.append({"kernel": kernels[k.spec].name_hint, "nodes": covered,
                                  "flops": round(graph.flops_of(layer) * taps)
                                  + sum(graph.flops_of(graph.node(v)) for v in covered[1:])})
                else:
                    fn = LOWERINGS.get(n.op)
                    if fn is None:
                        raise CompileError(f"node {n.name!r}: op {n.op!r} has no TVM lowering")
                    try:
                        expr = fn(bb, [env[v] for v in n.inputs], n.attrs, n)
                        env[n.name] = bb.emit(expr)
                    except CompileError:
                        raise
                    except Exception as e:
                        raise CompileError(f"node {n.name!r} ({n.op}): TVM rejected it: "
                                           f"{str(e).strip().splitlines()[-1]}") from None
                    _record_kernel(calls, expr, graph, n)
                if plan is not None and n.name in plan.blocked:
                    continue  # the blocked layout: only kernels, pools and gates read it
                got = _shape(env[n.name])
                if got != n.type.shape:
                    raise CompileError(f"node {n.name!r} ({n.op}): Relax infers shape {got}, IR has {n.type.shape}")
            # one output: the tensor itself (indexing the VM's result tuple cost 0.5 us a call)
            out = bb.emit_output(env[graph.outputs[0]] if len(graph.outputs) == 1
                                 else relax.Tuple([env[v] for v in graph.outputs]))
        bb.emit_func_output(out)


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def _record_kernel(calls: list, expr, graph, n) -> None:
    """Add a {"kernel", "nodes", "flops"} entry for node `n` when its lowering is one call of a
    kernel of shave's own (int8 layers, attention, shift): the profile then names the node
    beside the kernel's time. FLOPs only for float ops (the profile's peak is fp32's)."""
    if not (isinstance(expr, relax.Call) and expr.op.same_as(_CALL_TIR) and isinstance(expr.args[0], tvm.ir.GlobalVar)):
        return
    name = expr.args[0].name_hint
    if name.startswith("shave_"):
        calls.append({"kernel": name, "nodes": [n.name],
                      "flops": 0 if n.op.startswith("q") else round(graph.flops_of(n))})


def follow_renames(mod, calls: list) -> None:
    """Rename `calls` entries whose kernel a later stage replaced (int8_blocked.block_qconvs gives
    each replacement a "shave.replaces" attribute with the name it takes over): the k-th call of a
    kernel in `calls` is its k-th call site in `mod`'s main, before and after."""
    main = next((f for gv, f in mod.functions.items() if gv.name_hint == "main"), None)
    if not isinstance(main, relax.Function) or not isinstance(main.body, relax.SeqExpr):
        return
    by_kernel: dict = {}
    for entry in calls:
        by_kernel.setdefault(entry["kernel"], []).append(entry)
    seen: dict = {}
    for blk in main.body.blocks:
        for bd in blk.bindings:
            v = bd.value
            if not (isinstance(v, relax.Call) and v.op.same_as(_CALL_TIR) and isinstance(v.args[0], tvm.ir.GlobalVar)):
                continue
            name = v.args[0].name_hint
            f = mod[v.args[0]]
            old = str(f.attrs["shave.replaces"]) if f.attrs is not None and "shave.replaces" in f.attrs else name
            k = seen.get(old, 0)
            seen[old] = k + 1
            if k < len(by_kernel.get(old, [])):
                by_kernel[old][k]["kernel"] = name


def _on_blocked(bb, n, plan, env: dict) -> relax.Var:
    """A global pool of a blocked value ([N, C/v, H, W, v] -> the node's NCHW-ordered shape, padding
    lanes dropped), a per-channel gate multiply of one (both schedules/pool.py's kernels), or a
    pass-through node (concat, max or average pool, activation, batch norm; blocked in, blocked
    out): schedules/fusion.py plans them."""
    kind = plan.passthrough.get(n.name)
    if kind is not None:
        return _passthrough(bb, n, kind, env)
    from .schedules.pool import blocked_gate_primfunc, blocked_global_mean_primfunc

    if n.name in plan.pools:
        x = env[n.inputs[0]]
        nb, cb, h, w, v = _shape(x)
        c = n.type.shape[1]
        gv = _kernel(bb, f"shave_global_mean_{nb}x{cb}x{h}x{w}x{v}",
                     lambda: blocked_global_mean_primfunc((nb, cb, h, w, v)))
        pooled = bb.emit(relax.call_tir(gv, [x], relax.TensorType((nb, cb, 1, 1, v), "float32")))
        if cb * v != c:  # padding lanes (conv_spec.blocked_shape) dropped
            pooled = bb.emit(R.strided_slice(R.reshape(pooled, (nb, cb * v)), [1], [0], [c]))
        return bb.emit(R.reshape(pooled, n.type.shape))
    data, gate = plan.gates[n.name]
    x = env[data]
    shape = _shape(x)
    c = n.type.shape[1]
    gv = _kernel(bb, "shave_gate_" + "x".join(map(str, shape)) + f"_c{c}", lambda: blocked_gate_primfunc(shape, c))
    g = bb.emit(R.reshape(env[gate], (shape[0], c)))
    return bb.emit(relax.call_tir(gv, [x, g], relax.TensorType(shape, "float32")))


def _kernel(bb, name: str, make) -> tvm.ir.GlobalVar:
    """The GlobalVar of shave's kernel `name` (a name that says everything the kernel is built
    from) in the module being built; `make()` builds its scheduled PrimFunc on first use only."""
    for gv in bb.get().get_global_vars():
        if gv.name_hint == name:
            return gv
    return add_opaque(bb, make(), name)


def _passthrough(bb, n, kind: str, env: dict) -> relax.Var:
    """Node `n` (fusion.passthrough_kind `kind`) on blocked inputs, giving a blocked output."""
    ins = [env[v] for v in n.inputs]
    if kind == "concat":  # whole channel blocks: concatenating channels concatenates blocks
        return bb.emit(R.concat(ins, axis=1))
    x = ins[0]
    nb, cb, h, w, v = _shape(x)
    if kind == "activation":
        return bb.emit(LOWERINGS[n.op](bb, [x], n.attrs, n))
    if kind == "batch_norm":
        scale, shift = batch_norm_affine(bb, *ins[1:], n.attrs["eps"])
        blk = lambda t: reshape(t, (1, cb, 1, 1, v))  # noqa: E731  channel c = block * v + lane
        return bb.emit(R.add(R.multiply(x, blk(scale)), blk(shift)))
    assert kind in ("max_pool", "avg_pool"), kind
    from .schedules.pool import blocked_pool_primfunc

    a = n.attrs
    oh, ow = n.type.shape[2:]
    pad = pool_padding(n, (nb, cb * v, h, w), a)
    dil = tuple(a.get("dilation", (1, 1)))
    dims = lambda *t: "x".join(str(int(d)) for d in t)  # noqa: E731  one kernel per configuration
    name = (f"shave_{kind}_{dims(nb, cb, h, w, v)}_k{dims(*a['kernel'])}_s{dims(*a['stride'])}"
            f"_p{dims(*pad)}_d{dims(*dil)}")
    gv = _kernel(bb, name, lambda: blocked_pool_primfunc(kind[:3], (nb, cb, h, w, v), (oh, ow), tuple(a["kernel"]),
                                                         tuple(a["stride"]), tuple(pad), dil))
    return bb.emit(relax.call_tir(gv, [x], relax.TensorType((nb, cb, oh, ow, v), n.type.dtype)))


def _layer_taps(graph, layer) -> int:
    """KH * KW of a conv layer's weight (1 for a linear layer)."""
    w = graph.params.get(layer.inputs[1])
    return int(w.shape[2] * w.shape[3]) if w is not None and w.ndim == 4 else 1


def _conv_call(bb, k, env: dict, kernels: dict) -> relax.Var:
    """The call_tir computing planned kernel `k` (fusion.ConvKernel)."""
    spec = k.spec
    gv = kernels.get(spec)
    if gv is None:
        gv = kernels[spec] = add_opaque(bb, k.prim, f"shave_conv{len(kernels)}")
    x = env[k.x]
    if k.lead:  # x[*lead, K] as x[N, K]
        x = bb.emit(R.reshape(x, [spec.w, spec.c]))
    v = spec.vec
    if k.linear and spec.in_blocked:  # x[N, K] as [1, K/v, 1, N, v]
        x = bb.emit(R.reshape(R.permute_dims(R.reshape(x, [spec.w, spec.c // v, v]), [1, 0, 2]),
                              [1, spec.c // v, 1, spec.w, v]))
    elif k.linear:  # x[N, K] as [1, K, 1, N]
        x = bb.emit(R.reshape(R.permute_dims(x, [1, 0]), [1, spec.c, 1, spec.w]) if spec.w > 1
                    else R.reshape(x, [1, spec.c, 1, 1]))
    bias = np.zeros(spec.bias_len, np.float32)  # padded for a blocked output (ConvSpec.bias_len)
    bias[:spec.oc] = k.bias
    args = [x, relax.const(k.packed), relax.const(bias)]
    if k.residual is not None:
        args.append(env[k.residual])
    args += [relax.const(s) for s in k.shifts]
    y = bb.emit(relax.call_tir(gv, args, relax.TensorType(spec.out_shape(), "float32")))
    if k.linear and spec.out_blocked:  # [1, J/v, 1, N, v] -> [N, J]
        y = bb.emit(R.reshape(R.permute_dims(R.reshape(y, [spec.oc // v, spec.w, v]), [1, 0, 2]), [spec.w, spec.oc]))
    elif k.linear:  # [1, J, 1, N] -> [N, J]
        y = bb.emit(R.permute_dims(R.reshape(y, [spec.oc, spec.w]), [1, 0]) if spec.w > 1
                    else R.reshape(y, [1, spec.oc]))
    if k.lead:
        y = bb.emit(R.reshape(y, [*k.lead, spec.oc]))
    return y
