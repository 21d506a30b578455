"""GroupRewrite: a dense conv -> grouped conv + channel permutations (ShuffleNet-style blocks).

    GroupRewrite(groups=2, layers=None, exclude=(), data=None, restarts=4, seed=0)

The weight's mass per (output, input) channel pair, M[o, c] = sum W[o, c]^2
over the kernel, is co-clustered into `groups` balanced blocks: output and
input channels are each split into equal groups so that as much mass as
possible falls in the diagonal blocks (alternating balanced assignments,
solved exactly with scipy's linear_sum_assignment, from a start given by the
connected components of M's nonzeros, the contiguous split and `restarts`
random ones; the best is kept). The off-diagonal blocks are dropped, so a
weight that is block diagonal after some permutation is rewritten exactly.

The grouped conv reads its input channels in block order and writes its
output channels in block order. Where it can, the pass folds those
permutations into the neighbours, for free: the input order into the rows of
the conv that produces the input (through batch norm and activations, each
used once), the output order into the columns of the conv that reads the
output (likewise). Where it cannot (an input read by other layers too, an
output going into a residual add), an explicit channel_permute does it.
With `data`, each group of the grouped conv is refitted by least squares to
the layer's output.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import bmat, coo_matrix
from scipy.sparse.csgraph import connected_components

from ...errors import PassError
from ..layers import Layer
from ...ir import Graph, Node, get_op
from ..base import register_pass
from .base import Block, ConvRewrite, new_node



def _onehot(labels: np.ndarray, g: int) -> np.ndarray:
    return np.eye(g)[labels]


def _assign(score: np.ndarray, cap: int) -> np.ndarray:
    """Labels (items -> g groups of `cap` items each) maximising the summed score[item, group]."""
    rows, slots = linear_sum_assignment(np.repeat(score, cap, axis=1), maximize=True)
    labels = np.empty(len(score), dtype=np.int64)
    labels[rows] = slots // cap
    return labels


def _component_start(mass: np.ndarray, g: int) -> np.ndarray | None:
    """Input-channel groups from the connected components of M's nonzeros, packed into g
    balanced groups (None when they do not pack exactly)."""
    n, c = mass.shape
    a = coo_matrix(mass > 1e-9 * max(float(mass.max()), 1e-300))
    _, lab = connected_components(bmat([[None, a], [a.T, None]]), directed=False)
    room = np.array([[n // g, c // g]] * g)
    group_of = {}
    comps = sorted(set(lab), key=lambda k: -(lab == k).sum())
    for k in comps:
        need = np.array([(lab[:n] == k).sum(), (lab[n:] == k).sum()])
        fits = np.flatnonzero(np.all(room >= need, axis=1))
        if not len(fits):
            return None
        group_of[k] = fits[0]
        room[fits[0]] -= need
    return np.array([group_of[k] for k in lab[n:]], dtype=np.int64)


def balanced_blocks(mass: np.ndarray, g: int, restarts: int = 4, seed: int = 0, iters: int = 50):
    """(output labels, input labels): each channel's group, g equal groups per side,
    maximising the mass inside the diagonal blocks."""
    n, c = mass.shape
    rng = np.random.default_rng(seed)
    contiguous = np.arange(c) * g // c
    starts = [s for s in [_component_start(mass, g)] if s is not None]
    starts += [contiguous] + [rng.permutation(contiguous) for _ in range(restarts)]
    best = None
    for cols in starts:
        for _ in range(iters):
            new = _assign(mass.T @ _onehot(_assign(mass @ _onehot(cols, g), n // g), g), c // g)
            if np.array_equal(new, cols):
                break
            cols = new
        rows = _assign(mass @ _onehot(cols, g), n // g)
        score = float(sum(mass[rows == k][:, cols == k].sum() for k in range(g)))
        if best is None or score > best[0] * (1 + 1e-12):
            best = (score, rows, cols)
    return best[1], best[2]


def _permuted(graph: Graph, value: str, perm, axis: int = 0) -> str:
    """A new parameter: `value` with its indices along `axis` taken in the order `perm`."""
    return graph.add_param(value, np.take(graph.params[value], perm, axis=axis))


def _is_dense_conv(graph: Graph, n: Node) -> bool:
    return n.op == "conv2d" and n.attrs["groups"] == 1 and graph.is_param(n.inputs[1]) and all(
        graph.is_param(v) for v in n.inputs[2:])


def _per_channel(graph: Graph, n: Node) -> bool:
    return get_op(n.op).role == "activation" or (n.op == "batch_norm" and all(graph.is_param(v) for v in n.inputs[1:]))


def _permute_chain(graph: Graph, chain, perm) -> None:
    for n in chain:
        if n.op == "batch_norm":
            n.inputs = [n.inputs[0]] + [_permuted(graph, v, perm) for v in n.inputs[1:]]


def feed_permuted(graph: Graph, value: str, perm, before: Node) -> str:
    """A value v with v[:, i] = value[:, perm[i]] for `before` to read: `value` itself when
    its producer (through per-channel ops, each read once) can emit its channels in that order."""
    if np.array_equal(perm, np.arange(len(perm))):
        return value
    chain, cur = [], value
    while graph.use_count(cur) == 1 and cur not in graph.outputs and graph.producer(cur) is not None:
        p = graph.producer(cur)
        if _per_channel(graph, p):
            chain.append(p)
            cur = p.inputs[0]
            continue
        if _is_dense_conv(graph, p):
            p.inputs = [p.inputs[0]] + [_permuted(graph, v, perm) for v in p.inputs[1:]]
        elif p.op == "channel_permute":
            p.attrs = dict(p.attrs, indices=tuple(int(i) for i in np.asarray(p.attrs["indices"])[perm]))
        else:
            break
        _permute_chain(graph, chain, perm)
        return value
    return new_node(graph, f"{before.name}.permute_in", "channel_permute", [value],
                    {"indices": tuple(int(i) for i in perm)}, before.source, before).name


def emit_permuted(graph: Graph, old: str, new: str, perm) -> None:
    """Make the readers of `old` read `new`, where new[:, i] = old[:, perm[i]]: the readers that
    can (through per-channel ops, each read once) take their input channels in that order."""
    graph.replace_uses(old, new)
    if np.array_equal(perm, np.arange(len(perm))):
        return
    inverse = np.argsort(perm)
    chain, cur = [], new
    while graph.use_count(cur) == 1 and cur not in graph.outputs:
        u = graph.users(cur)[0]
        if _per_channel(graph, u) and u.inputs[0] == cur:
            chain.append(u)
            cur = u.name
            continue
        if _is_dense_conv(graph, u) and u.inputs[0] == cur:
            u.inputs = [cur, _permuted(graph, u.inputs[1], perm, axis=1)] + u.inputs[2:]
        elif u.op == "channel_permute":
            u.attrs = dict(u.attrs, indices=tuple(int(inverse[i]) for i in u.attrs["indices"]))
        else:
            break
        _permute_chain(graph, chain, perm)
        return
    _permute_chain(graph, chain, perm)
    at = graph.nodes.index(graph.node(cur)) + 1
    after = graph.nodes[at] if at < len(graph.nodes) else None
    src = graph.node(cur).source
    fix = new_node(graph, f"{old}.permute_out", "channel_permute", [cur], {"indices": tuple(int(i) for i in inverse)},
                   src, after)
    for n in graph.nodes:
        if n is not fix:
            n.inputs = [fix.name if v == cur else v for v in n.inputs]
    graph.outputs = [fix.name if v == cur else v for v in graph.outputs]


@register_pass("group_rewrite", contract="lossy")
class GroupRewrite(ConvRewrite):
    def __init__(self, groups: int = 2, layers=None, exclude=(), data=None, target=None, min_speedup: float = 1.0, restarts: int = 4, seed: int = 0,
                 timer=None):
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 2:
            raise PassError(f"GroupRewrite groups must be an int >= 2, got {groups!r}")
        super().__init__(layers, exclude, data, target, min_speedup, timer)
        self.groups, self.restarts, self.seed = int(groups), restarts, seed

    def why_not(self, graph: Graph, node: Node, layer: Layer) -> str | None:
        if layer.groups != 1:
            return f"is already grouped (groups={layer.groups})"
        if layer.c % self.groups or layer.n % self.groups:
            return f"has {layer.c} input and {layer.n} output channels, not both divisible by groups={self.groups}"
        return None

    def macs_after(self, layer: Layer) -> int:
        return layer.batch * layer.out_hw[0] * layer.out_hw[1] * layer.n * layer.c * layer.kh * layer.kw // self.groups

    def build(self, graph: Graph, node: Node, layer: Layer) -> Block:
        g = self.groups
        w = np.asarray(graph.params[node.inputs[1]])
        mass = (w.astype(np.float64) ** 2).sum((2, 3))
        rows, cols = balanced_blocks(mass, g, self.restarts, self.seed)
        out_order, in_order = np.argsort(rows, kind="stable"), np.argsort(cols, kind="stable")
        ng, cg = layer.n // g, layer.c // g
        blocks = [w[out_order[k * ng:(k + 1) * ng]][:, in_order[k * cg:(k + 1) * cg]] for k in range(g)]
        kept = sum(float((b.astype(np.float64) ** 2).sum()) for b in blocks)
        weight = graph.add_param(f"{node.name}.grouped.weight", np.concatenate(blocks))
        bias = [_permuted(graph, node.inputs[2], out_order)] if len(node.inputs) > 2 else []
        src = feed_permuted(graph, node.inputs[0], in_order, node)
        conv = new_node(graph, f"{node.name}.grouped", "conv2d", [src, weight] + bias, dict(node.attrs, groups=g),
                        node.source, node)
        graph.nodes.remove(node)
        emit_permuted(graph, node.name, conv.name, out_order)
        identity = np.array_equal(out_order, np.arange(layer.n))
        return Block(conv.name, float(np.sqrt(max(0.0, 1 - kept / max(float(mass.sum()), 1e-300)))),
                     None if identity else tuple(int(i) for i in out_order))
