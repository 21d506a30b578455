"""Layer services shared by the passes: which layers a pass works on, and cutting layers out.

Every pass that takes ``layers=`` / ``exclude=`` selects through
``select_layers``, so the patterns mean the same everywhere (node names or
fnmatch patterns, case-sensitive) and a bad one fails the same way: a
pattern that matches nothing, a name that is not in the graph, or a named
layer the pass cannot apply to is a PassError naming the pass and the node.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..errors import PassError
from ..ir import Graph, Node, get_op


@dataclass(frozen=True)
class Layer:
    """The shape facts of one conv2d / linear node (everything but the weight values)."""
    op: str
    n: int  # output channels / features
    c: int  # input channels / features
    kh: int = 1
    kw: int = 1
    groups: int = 1
    batch: int = 1
    in_hw: tuple = (1, 1)
    out_hw: tuple = (1, 1)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    positions: int = 1  # linear: rows the weight is applied to (product of the leading dims)

    @classmethod
    def of(cls, graph, node) -> "Layer":
        w = graph.type_of(node.inputs[1]).shape
        x = graph.type_of(node.inputs[0]).shape
        if node.op == "linear":
            return cls("linear", w[0], w[1], positions=int(np.prod(x[:-1])))
        a = node.attrs
        return cls("conv2d", w[0], x[1], w[2], w[3], a["groups"], x[0], tuple(x[2:]), tuple(node.type.shape[2:]),
                   tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]))

    @property
    def n_g(self) -> int:
        return self.n // self.groups

    @property
    def c_g(self) -> int:
        return self.c // self.groups

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the layer."""
        if self.op == "linear":
            return self.positions * self.n * self.c
        return self.batch * self.out_hw[0] * self.out_hw[1] * self.n * self.c_g * self.kh * self.kw

    def describe(self) -> str:
        if self.op == "linear":
            return f"linear {self.c}->{self.n}"
        g = f", groups={self.groups}" if self.groups > 1 else ""
        return f"conv2d {self.kh}x{self.kw} {self.c}->{self.n}{g}"


def is_pattern(p: str) -> bool:
    return any(c in p for c in "*?[")


def matches(name: str, patterns: Iterable[str] | str | None) -> bool:
    """Whether a node name matches any of the names / fnmatch patterns (one string: one pattern)."""
    patterns = (patterns,) if isinstance(patterns, str) else patterns
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def weighted_layers(graph: Graph, ops: Iterable[str] | None = None) -> list[Node]:
    """Layer nodes (ops with a weight slot, see ir/ops.py) whose weight is a constant, in graph order;
    `ops` narrows them to those op names."""
    out = []
    for n in graph.nodes:
        op = get_op(n.op)
        if op.weight is not None and (ops is None or n.op in ops) and graph.is_param(n.inputs[op.weight]):
            out.append(n)
    return out


def select_layers(graph: Graph, candidates: list[Node], layers, exclude, *, pass_name: str, what: str,
                  why_not: Callable[[Node], str | None] = lambda n: None,
                  keep_inapplicable: bool = False) -> list[tuple[Node, bool]]:
    """[(node, named exactly)] in graph order.

    `candidates`: the nodes the pass can handle at all (described by `what`, e.g. "conv2d or linear
    node with a constant weight"); `layers`: None for all of them, else names and patterns; `exclude`:
    names and patterns to leave alone; `why_not(node)`: why the pass cannot apply to one candidate
    (None when it can). Candidates a pattern reaches but the pass cannot apply to are skipped (kept
    with `keep_inapplicable`, for a pass that reports why); a node named exactly that it cannot apply
    to is an error."""
    layers = (layers,) if isinstance(layers, str) else layers
    exclude = (exclude,) if isinstance(exclude, str) else exclude
    exact: set[str] = set()
    for pat in layers or ():
        if is_pattern(pat):
            if not any(fnmatch.fnmatchcase(n.name, pat) for n in candidates):
                raise PassError(f"{pass_name}: layers pattern {pat!r} matches no {what}")
            continue
        try:
            node = graph.node(pat)
        except KeyError:
            raise PassError(f"{pass_name}: layers names {pat!r}, but the graph has no node of that name") from None
        if node not in candidates:
            raise PassError(f"{pass_name}: node {pat!r} is {node.op}, not a {what}")
        why = why_not(node)
        if why:
            raise PassError(f"{pass_name} cannot apply to node {pat!r}: {why}")
        exact.add(pat)
    out = []
    for n in candidates:
        if n.name in exact:
            out.append((n, True))
        elif (not matches(n.name, exclude) and (layers is None or matches(n.name, [p for p in layers if is_pattern(p)]))
              and (keep_inapplicable or why_not(n) is None)):
            out.append((n, False))
    return out


def cut_out(graph: Graph, names) -> Graph:
    """The nodes `names` alone (in graph order), as a graph to time: the first value they read from
    outside becomes the input "x", other values from outside (a residual) become zero constants,
    parameters stay, and the last node is the output."""
    wanted = set(names)
    nodes = [n for n in graph.nodes if n.name in wanted]
    if not nodes:
        raise PassError(f"cut_out: none of {sorted(wanted)} is a node of the graph")
    made = {n.name for n in nodes}
    outside = list(dict.fromkeys(v for n in nodes for v in n.inputs if v not in made and not graph.is_param(v)))
    g = Graph(inputs=[("x", graph.type_of(outside[0]))] if outside else [])
    env = {outside[0]: "x"} if outside else {}
    for v in outside[1:]:
        t = graph.type_of(v)
        env[v] = g.add_param(v, np.zeros(t.shape, t.dtype))
    for n in nodes:
        inputs = [env[v] if v in env else (g.add_param(v, graph.params[v]) if graph.is_param(v) else v)
                  for v in n.inputs]
        g.nodes.append(Node(n.name, n.op, inputs, dict(n.attrs), n.type, n.source))
    g.outputs = [nodes[-1].name]
    return g
