"""Layer services shared by the passes: which layers a pass works on.

Every pass that takes ``layers=`` / ``exclude=`` selects through
``select_layers``, so the patterns mean the same everywhere (node names or
fnmatch patterns, case-sensitive) and a bad one fails the same way: a
pattern that matches nothing, a name that is not in the graph, or a named
layer the pass cannot apply to is a PassError naming the pass and the node.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

from ..errors import PassError
from ..ir import Graph, Node, get_op


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
