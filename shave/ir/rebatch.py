"""The same graph at another batch size (dynamic batch: shave.compile(dynamic_batch=...)).

A graph is captured at the example inputs' batch size, and ops that fix a shape in their
attributes (reshape, repeat) hold that size. `rebatch(graph, n)` is a copy with every input's
axis 0 set to n and those attributes rescaled, its types inferred again. It refuses a graph in
which some value computed from the inputs does not keep the batch on axis 0 (a permute or
reshape that moves it, a slice or reduction over it), naming the node and its source line.
Ops that mix the samples of a batch while keeping the shapes are found numerically by
`shave.api.check_sample_independent`, not here.
"""
from __future__ import annotations

from ..errors import CompileError
from .graph import Graph
from .verify import infer_types


def batch_of(graph: Graph) -> int:
    """The batch size of a graph: axis 0 of its inputs, which must agree."""
    sizes = {t.shape[0] if t.ndim else None for _, t in graph.inputs}
    if len(sizes) != 1 or None in sizes:
        shapes = ", ".join(f"{n}{list(t.shape)}" for n, t in graph.inputs)
        raise CompileError(f"dynamic batch needs every input to have the batch on axis 0 with one size; "
                           f"the inputs are {shapes}")
    return sizes.pop()


def rebatch(graph: Graph, n: int) -> Graph:
    """A copy of `graph` whose inputs (and every value computed from them) have batch size `n`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise CompileError(f"a batch size must be a positive int, got {n!r}")
    old = batch_of(graph)
    g = graph.copy()
    if n == old:
        return g
    g.inputs = [(name, type(t)((n,) + tuple(t.shape[1:]), t.dtype)) for name, t in g.inputs]
    batched = {name for name, _ in graph.inputs}  # values that carry the batch
    for node in g.nodes:
        if not any(v in batched for v in node.inputs):
            reps = node.attrs.get("repeats") if node.op == "repeat" else None
            if reps and old > 1 and reps[0] == old and graph.type_of(node.inputs[0]).shape[:1] == (1,):
                node.attrs["repeats"] = (n, *reps[1:])  # a constant broadcast to the batch (ViT's class token)
                batched.add(node.name)
            continue  # otherwise computed from parameters only
        batched.add(node.name)
        if node.op == "reshape":
            shape = list(node.attrs["shape"])
            if shape and shape[0] == old:
                node.attrs["shape"] = (n, *shape[1:])
        elif node.op == "repeat" and node.attrs["repeats"] and node.attrs["repeats"][0] != 1:
            raise CompileError(f"dynamic batch: {node.where} repeats the batch axis")
    try:
        infer_types(g)
    except Exception as e:
        hint = " (a constant broadcast to the batch is recognised when the graph is captured at batch 2 or more)" \
            if old == 1 else ""
        raise CompileError(f"dynamic batch: the graph does not run at batch {n}: {e}{hint}") from None
    before = {nd.name: nd.type for nd in graph.nodes}
    for node in g.nodes:
        if node.name not in batched:
            continue
        t0, t = before[node.name], node.type
        if not (t0.ndim and t0.shape[0] == old and t.shape == (n,) + tuple(t0.shape[1:])):
            raise CompileError(f"dynamic batch: {node.where} does not keep the batch on axis 0 "
                               f"(batch {old}: {list(t0.shape)}; batch {n}: {list(t.shape)})")
    for v in g.outputs:
        if v not in batched:
            raise CompileError(f"dynamic batch: output {v!r} does not depend on the inputs, so it has no batch axis")
    return g
