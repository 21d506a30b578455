"""IR -> torch.fx.GraphModule.

Each IR node becomes a call of its op's reference kernel; each parameter
becomes an nn.Parameter (batch-norm statistics become buffers), so the module
trains like any other and its state_dict keys are the IR parameter names.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..ir import Graph, get_op


class _Kernel:
    """A picklable, readable callable for one op (fx prints its name)."""

    def __init__(self, op: str):
        self.op = op
        self.__name__ = op

    def __call__(self, *args, **kwargs):
        return get_op(self.op).kernel(*args, **kwargs)


def _batch_reshape(x, *, tail):
    return torch.reshape(x, (x.shape[0],) + tuple(tail))


def _call(graph: Graph, n):
    """(callable, attrs) for one node. The IR's shapes are static, but a reshape
    that keeps dim 0 (the batch) keeps the run-time batch here, so the reference
    module also trains and evaluates on batches of another size."""
    if n.op == "reshape" and graph.type_of(n.inputs[0]).shape[:1] == tuple(n.attrs["shape"][:1]):
        return _batch_reshape, {"tail": tuple(n.attrs["shape"][1:])}
    return _Kernel(n.op), dict(n.attrs)


def _attr_name(param: str, taken: set[str]) -> str:
    base = "p_" + "".join(c if c.isalnum() else "_" for c in param)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


class IRModule(fx.GraphModule):
    """A GraphModule that also remembers which attribute holds which IR parameter."""

    param_names: dict[str, str]  # IR parameter name -> attribute name


def to_torch(graph: Graph, trainable: bool = True) -> IRModule:
    """The graph as an nn.Module taking and returning tensors (a tuple when several outputs)."""
    root = torch.nn.Module()
    # inputs the op registry calls statistics (e.g. a batch norm's running mean and var) are not trained
    buffers = {n.inputs[i] for n in graph.nodes for i in get_op(n.op).buffers if i < len(n.inputs)}
    taken: set[str] = set()
    attr_of: dict[str, str] = {}
    used = {v for n in graph.nodes for v in n.inputs}
    for name, arr in graph.params.items():
        if name not in used:
            continue
        attr = _attr_name(name, taken)
        t = torch.from_numpy(np.array(arr))
        if name in buffers or not t.is_floating_point() or t.ndim == 0:
            root.register_buffer(attr, t)
        else:
            root.register_parameter(attr, torch.nn.Parameter(t, requires_grad=trainable))
        attr_of[name] = attr

    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name, _ in graph.inputs:
        env[name] = g.placeholder("".join(c if c.isalnum() else "_" for c in name))
    for name, attr in attr_of.items():
        env[name] = g.get_attr(attr)
    for n in graph.nodes:
        fn, attrs = _call(graph, n)
        node = g.call_function(fn, tuple(env[v] for v in n.inputs), attrs)
        node.name = "".join(c if c.isalnum() else "_" for c in n.name)
        env[n.name] = node
    outs = [env[v] for v in graph.outputs]
    g.output(outs[0] if len(outs) == 1 else tuple(outs))
    m = IRModule(root, g)
    m.param_names = attr_of
    return m


def run_graph(graph: Graph, inputs) -> list[np.ndarray]:
    """Run the graph on numpy/torch inputs with the reference kernels; numpy outputs."""
    with torch.no_grad():
        outs, _ = forward_with_values(graph, inputs, ())
    return [o.detach().cpu().numpy() for o in outs]


def forward_with_values(graph: Graph, inputs, keep, params: dict | None = None):
    """Run the graph op by op in torch (autograd works) and also return the
    tensors of the values named in `keep`. `params` may supply torch tensors
    for some parameters (e.g. ones being optimised); the rest are constants."""
    env: dict = {name: torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
                 for (name, _), x in zip(graph.inputs, inputs)}
    params = params or {}
    kept = {}
    for n in graph.nodes:
        args = []
        for v in n.inputs:
            if v in env:
                args.append(env[v])
            elif v in params:
                args.append(params[v])
            else:
                args.append(torch.from_numpy(np.array(graph.params[v])))
        fn, attrs = _call(graph, n)
        env[n.name] = fn(*args, **attrs)
        if n.name in keep:
            kept[n.name] = env[n.name]
    return [env[v] for v in graph.outputs], kept
