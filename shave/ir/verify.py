"""Well-formedness check of a Graph; passes run it after every rewrite."""
from __future__ import annotations

from ..errors import IRError
from .graph import Graph
from .ops import get_op


def verify(graph: Graph) -> Graph:
    """Raise IRError naming the first problem: an unknown op, a use before
    definition, a missing attribute, a duplicate name, or a stored node type
    that no longer matches what its op infers from its inputs."""
    types = {name: t for name, t in graph.inputs}
    for name, arr in graph.params.items():
        if name in types:
            raise IRError(f"name {name!r} is both an input and a parameter")
        from .types import TensorType

        types[name] = TensorType.of(arr)
    for n in graph.nodes:
        where = n.where
        if n.name in types:
            raise IRError(f"{where}: name is defined twice")
        op = get_op(n.op)
        lo, hi = op.num_inputs
        if len(n.inputs) < lo or (hi >= 0 and len(n.inputs) > hi):
            raise IRError(f"{where}: takes {lo}..{hi if hi >= 0 else 'n'} inputs, has {len(n.inputs)}")
        for v in n.inputs:
            if v not in types:
                raise IRError(f"{where}: input {v!r} is not defined before it")
        missing = [a for a in op.attrs if a not in n.attrs]
        if missing:
            raise IRError(f"{where}: missing attribute(s) {', '.join(missing)}")
        try:
            inferred = op.infer([types[v] for v in n.inputs], n.attrs)
        except IRError as e:
            raise IRError(f"{where}: {e}") from None
        except Exception as e:  # the reference kernel rejected the shapes
            raise IRError(f"{where}: {str(e).splitlines()[0]}") from None
        if n.type is not None and n.type != inferred:
            raise IRError(f"{where}: stored type {n.type} but inputs give {inferred}")
        types[n.name] = inferred
    for v in graph.outputs:
        if v not in types:
            raise IRError(f"graph output {v!r} is not defined")
    return graph


def infer_types(graph: Graph) -> Graph:
    """Recompute every node's type from its inputs (after a pass edited shapes)."""
    for n in graph.nodes:
        n.type = None
    types = {name: t for name, t in graph.inputs}
    for n in graph.nodes:
        ins = [types[v] if v in types else graph.type_of(v) for v in n.inputs]
        try:
            n.type = get_op(n.op).infer(ins, n.attrs)
        except Exception as e:
            raise IRError(f"node {n.name!r} ({n.op}): {str(e).splitlines()[0]}") from None
        types[n.name] = n.type
    return graph
