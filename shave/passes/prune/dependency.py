"""Channel dependency analysis: which channels must be pruned together.

Every op's channel rule (shave/ir/channels.py) couples index i of one tensor
dim with index j of another. In a networkx graph whose nodes are single
channels (value, axis, index), the connected components are the smallest sets
that can be removed together while keeping the graph well-typed: a residual
add ties the channels of every branch it joins, a concat maps index ranges, a
depthwise conv ties its input and output channel, a flatten ties a channel to
its block of features, a channel shuffle to its permuted index.

A component can be pruned (a *unit*) when it contains a filter (a slice of a
producing weight: conv/linear output channels), touches neither a graph input
nor a graph output, and no op declared any of its dims frozen. Units touching
the same set of dims form a *group* (e.g. "the output channels of layer1.0.conv1",
or "the residual stream of layer1"): the natural granularity for ratios.

Safety rule: an input dim that an op neither couples to its output nor
declares as consumed (e.g. the channel axis of a mean over channels) is
frozen, so an op that mixes channels in a way its rule does not describe can
never be pruned through silently.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from ...errors import PassError
from ...ir import Graph, get_op
from ...ir.channels import OUT

Dim = tuple  # (value name, axis)


@dataclass
class Unit:
    """One removable set of channels: dim -> sorted indices."""
    indices: dict  # Dim -> np.ndarray


@dataclass
class ChannelGroup:
    name: str
    dims: frozenset
    units: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.units)


@dataclass
class ChannelAnalysis:
    groups: list
    produces: set  # dims that are filters of a producing weight
    reduces: set  # dims of weights that consume channels
    frozen: set
    rules: dict  # node name -> ChannelRule


def _node_rules(graph: Graph):
    rules = {}
    for n in graph.nodes:
        op = get_op(n.op)
        if op.channels is None:
            raise PassError(f"op {n.op!r} (node {n.name!r}) has no channel rule; pruning cannot see through it")
        rules[n.name] = op.channels([graph.type_of(v) for v in n.inputs], n.type, n.attrs)
    return rules


def _dim(node, end) -> Dim:
    slot, axis = end
    return (node.name if slot == OUT else node.inputs[slot], axis)


def analyse(graph: Graph) -> ChannelAnalysis:
    rules = _node_rules(graph)
    produces, reduces, frozen = set(), set(), set()
    dim_graph = nx.Graph()
    for n in graph.nodes:
        r = rules[n.name]
        produces.update(_dim(n, e) for e in r.produces)
        reduces.update(_dim(n, e) for e in r.reduces)
        frozen.update(_dim(n, e) for e in r.frozen)
        coupled = set()
        for a, b, _, _ in r.couplings:
            dim_graph.add_edge(_dim(n, a), _dim(n, b))
            coupled.update((a, b))
        for slot, v in enumerate(n.inputs):
            for axis in range(graph.type_of(v).ndim):
                if (slot, axis) not in coupled and (slot, axis) not in r.reduces:
                    frozen.add((v, axis))  # the op uses this dim in a way pruning cannot follow
    for v, t in graph.inputs:
        frozen.update((v, a) for a in range(t.ndim))
    for v in graph.outputs:
        frozen.update((v, a) for a in range(graph.type_of(v).ndim))

    # only dims connected to a filter can ever be pruned: build index nodes for those alone
    live = set()
    for comp in nx.connected_components(dim_graph):
        if comp & produces:
            live |= comp
    index_graph = nx.Graph()
    for n in graph.nodes:
        for a, b, ia, ib in rules[n.name].couplings:
            da, db = _dim(n, a), _dim(n, b)
            if da in live:
                index_graph.add_edges_from(zip(((da, int(i)) for i in ia), ((db, int(j)) for j in ib)))
    for d in produces:
        index_graph.add_nodes_from((d, i) for i in range(graph.type_of(d[0]).shape[d[1]]))

    by_dims: dict[frozenset, list[Unit]] = defaultdict(list)
    for comp in nx.connected_components(index_graph):
        idx: dict = defaultdict(list)
        for d, i in comp:
            idx[d].append(i)
        dims = frozenset(idx)
        if not (dims & produces) or dims & frozen:
            continue
        by_dims[dims].append(Unit({d: np.array(sorted(v), dtype=np.int64) for d, v in idx.items()}))

    order = {n.name: k for k, n in enumerate(graph.nodes)}
    groups = []
    for dims, units in by_dims.items():
        makers = sorted({d[0] for d in dims if d in produces}, key=lambda p: _producer_order(graph, p, order))
        names = [_producer_name(graph, p) for p in makers]
        units.sort(key=lambda u: min(int(v[0]) for v in u.indices.values()))
        groups.append(ChannelGroup("+".join(names), dims, units))
    groups.sort(key=lambda g: g.name)
    return ChannelAnalysis(groups, produces, reduces, frozen, rules)


def _producer_name(graph: Graph, param: str) -> str:
    users = [n.name for n in graph.users(param)]
    return users[0] if users else param


def _producer_order(graph: Graph, param: str, order: dict) -> int:
    users = graph.users(param)
    return order[users[0].name] if users else -1
