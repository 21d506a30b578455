"""The shave IR: a Graph of single-output Nodes over named values.

A value is named by a string and is one of: a graph input, a parameter (a
constant numpy array held in `Graph.params`), or the output of a node (the
node's own name). Nodes are kept in topological order. Parameters are treated
as immutable: they are stored read-only, and a pass that changes a weight
stores a new array under a new or the same name.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from .types import TensorType


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    type: TensorType | None = None
    source: str = ""  # where it came from in the user's code ("file.py:12 in forward")

    def copy(self) -> "Node":
        return Node(self.name, self.op, list(self.inputs), dict(self.attrs), self.type, self.source)

    @property
    def where(self) -> str:
        """The node as errors name it: "node 'conv' (conv2d) from net.py:12 in forward: ..."."""
        return f"node {self.name!r} ({self.op})" + (f" from {self.source}" if self.source else "")


@dataclass
class Epilogue:
    """A layer with what its epilogue computes: [residual add] then [activation] (Graph.epilogue)."""
    layer: Node
    add: Node | None = None
    residual: str | None = None  # the add's other input
    act: Node | None = None

    @property
    def nodes(self) -> list[Node]:
        return [n for n in (self.layer, self.add, self.act) if n is not None]

    @property
    def out(self) -> str:
        return self.nodes[-1].name


@dataclass
class Graph:
    inputs: list[tuple[str, TensorType]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    params: dict[str, np.ndarray] = field(default_factory=dict)

    # ------------------------------------------------------------------ lookup
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node named {name!r}")

    def producer(self, value: str) -> Node | None:
        """The node computing `value`, or None for inputs and parameters."""
        return self._producers().get(value)

    def _producers(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def type_of(self, value: str) -> TensorType:
        for name, t in self.inputs:
            if name == value:
                return t
        if value in self.params:
            return TensorType.of(self.params[value])
        n = self._producers().get(value)
        if n is None:
            raise KeyError(f"unknown value {value!r}")
        return n.type

    def users(self, value: str) -> list[Node]:
        return [n for n in self.nodes if value in n.inputs]

    def use_count(self, value: str) -> int:
        return sum(n.inputs.count(value) for n in self.nodes) + self.outputs.count(value)

    def is_param(self, value: str) -> bool:
        return value in self.params

    # ---------------------------------------------------------------- building
    def fresh_name(self, base: str) -> str:
        taken = self._names()
        if base not in taken:
            return base
        for i in itertools.count(1):
            cand = f"{base}_{i}"
            if cand not in taken:
                return cand
        raise AssertionError

    def _names(self) -> set[str]:
        return {n for n, _ in self.inputs} | set(self.params) | {n.name for n in self.nodes}

    def add_param(self, base: str, array: np.ndarray) -> str:
        """Store a constant under a fresh name derived from `base`; returns the name."""
        name = self.fresh_name(base)
        self.set_param(name, array)
        return name

    def set_param(self, name: str, array) -> None:
        arr = np.array(array, copy=True)
        arr.setflags(write=False)
        self.params[name] = arr

    def insert_after(self, anchor: Node | None, node: Node) -> Node:
        """Insert `node` right after `anchor` (at the front when anchor is None)."""
        idx = 0 if anchor is None else self.nodes.index(anchor) + 1
        self.nodes.insert(idx, node)
        return node

    def replace_uses(self, old: str, new: str) -> None:
        """Make every consumer of value `old` (and the graph outputs) read `new`."""
        for n in self.nodes:
            n.inputs = [new if v == old else v for v in n.inputs]
        self.outputs = [new if v == old else v for v in self.outputs]

    def remove_dead(self) -> "Graph":
        """Drop nodes and parameters that no output depends on."""
        live = set(self.outputs)
        kept = []
        for n in reversed(self.nodes):
            if n.name in live:
                kept.append(n)
                live.update(n.inputs)
        self.nodes = kept[::-1]
        self.params = {k: v for k, v in self.params.items() if k in live}
        return self

    # -------------------------------------------------------------- patterns
    def chains(self, *ops: str) -> Iterator[list[Node]]:
        """Yield node chains n0 -> n1 -> ... whose ops are `ops`, where each
        link feeds only the next node (so the chain can be rewritten as one).
        Chains are yielded for the graph as it is when the generator starts."""
        producers = self._producers()
        for last in list(self.nodes):
            if last.op != ops[-1]:
                continue
            chain = [last]
            ok = True
            for op in reversed(ops[:-1]):
                prev = producers.get(chain[0].inputs[0]) if chain[0].inputs else None
                if prev is None or prev.op != op or self.use_count(prev.name) != 1:
                    ok = False
                    break
                chain.insert(0, prev)
            if ok:
                yield chain

    def epilogue(self, layer: Node, residual=lambda value: True, act=lambda node: True) -> "Epilogue":
        """What can be computed in `layer`'s epilogue: layer -> [add of one other value] ->
        [activation], each link taken only where the value before it feeds nothing else.
        `residual(value)` and `act(node)` say which residual inputs and activations qualify
        (activation means role "activation" in the op registry)."""
        from .ops import get_op

        out = Epilogue(layer)
        cur = layer
        users = self.users(cur.name)
        if len(users) == 1 and self.use_count(cur.name) == 1 and users[0].op == "add":
            other = [v for v in users[0].inputs if v != cur.name]
            if len(other) == 1 and not self.is_param(other[0]) and residual(other[0]):
                out.add, out.residual, cur = users[0], other[0], users[0]
        users = self.users(cur.name)
        if (len(users) == 1 and self.use_count(cur.name) == 1 and get_op(users[0].op).role == "activation"
                and act(users[0])):
            out.act = users[0]
        return out

    # ------------------------------------------------------------------ misc
    def copy(self) -> "Graph":
        """A copy whose node list, nodes and param table can be edited freely.
        Parameter arrays are shared: they are read-only."""
        return Graph(list(self.inputs), [n.copy() for n in self.nodes], list(self.outputs), dict(self.params))

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def flops_of(self, node: Node) -> int:
        """FLOPs of one node (multiply and add counted separately)."""
        from .ops import get_op

        return int(get_op(node.op).flops([self.type_of(v) for v in node.inputs], node.type, node.attrs))

    def stats(self) -> dict[str, int]:
        """FLOPs (multiply and add counted separately), parameter count and bytes of constants.
        Parameters are weights and biases, as PyTorch counts them: constants that only fill an
        op's `buffers` slots (batch-norm statistics, int8 requantisation scales) are not counted,
        but their bytes are."""
        from .ops import get_op

        flops = 0
        weights = set()
        for n in self.nodes:
            op = get_op(n.op)
            flops += self.flops_of(n)
            weights.update(v for i, v in enumerate(n.inputs) if i not in op.buffers)
        used = {v for n in self.nodes for v in n.inputs}
        params = sum(int(a.size) for k, a in self.params.items() if k in weights)
        nbytes = sum(int(a.nbytes) for k, a in self.params.items() if k in used)
        return {"flops": int(flops), "params": params, "bytes": nbytes, "nodes": len(self.nodes)}

    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)

    def __iter__(self) -> Iterable[Node]:
        return iter(self.nodes)
