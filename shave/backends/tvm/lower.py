"""IR -> Relax, emitted op by op with a BlockBuilder.

Parameters become Relax constants, so TVM folds and pre-transforms weights
at compile time. Every IR op has one entry in the lowering table (lowering.py),
filled by lower_float.py (float ops) and lower_quant.py (int8 ops).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ...errors import CompileError
from ...ir import Graph
from . import lower_float, lower_quant  # noqa: F401  (fill the lowering table)
from .lowering import LOWERING_DOT, LOWERINGS, _shape


def to_relax(graph: Graph, target: dict | None = None) -> tvm.IRModule:
    """The graph as an IRModule with one function `main(inputs...) -> tuple of outputs`;
    int8 kernels' weights packed for `target`'s dot product (AVX2's without one)."""
    if target is None:
        return _to_relax(graph)
    from ...isa import isa

    token = LOWERING_DOT.set(isa(target).int8_dot)
    try:
        return _to_relax(graph)
    finally:
        LOWERING_DOT.reset(token)


def _to_relax(graph: Graph) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    vars_ = [relax.Var(name, relax.TensorType(t.shape, t.dtype)) for name, t in graph.inputs]
    env: dict[str, relax.Expr] = {name: v for (name, _), v in zip(graph.inputs, vars_)}
    with bb.function("main", vars_):
        with bb.dataflow():
            for name, arr in graph.params.items():
                env[name] = relax.const(np.ascontiguousarray(arr))
            for n in graph.nodes:
                fn = LOWERINGS.get(n.op)
                if fn is None:
                    raise CompileError(f"node {n.name!r}: op {n.op!r} has no TVM lowering")
                try:
                    env[n.name] = bb.emit(fn(bb, [env[v] for v in n.inputs], n.attrs, n))
                except CompileError:
                    raise
                except Exception as e:
                    raise CompileError(f"node {n.name!r} ({n.op}): TVM rejected it: "
                                       f"{str(e).strip().splitlines()[-1]}") from None
                got = _shape(env[n.name])
                if got != n.type.shape:
                    raise CompileError(f"node {n.name!r} ({n.op}): Relax infers shape {got}, IR has {n.type.shape}")
            out = bb.emit_output(relax.Tuple([env[v] for v in graph.outputs]))
        bb.emit_func_output(out)
    return bb.get()
