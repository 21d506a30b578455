"""Pruning criteria that look at data: first-order Taylor and reconstruction.

taylor (Molchanov et al., 2017): the first-order change of the loss when a
channel's activation is zeroed, |mean(a * dL/da)|, summed over the producing
layers' outputs in the unit and averaged over the calibration batches. The
loss is cross-entropy against the model's own predictions (no labels needed).

reconstruction (ThiNet, Luo et al. 2017; He et al. 2017): for a group whose
channels are read by one dense conv or linear, greedily remove the channels
whose summed contribution to that layer's output is smallest, then refit the
layer's remaining input weights by least squares so that it reproduces its
original output on the calibration data.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ...reference.interpreter import forward_with_values
from ...errors import PassError
from ...ir import Graph, is_layer
from ..refit import ridge_solve

MAX_POSITIONS = 4096  # output positions sampled per consumer for selection and refit
CONTRIB_BYTES = 2 << 30  # at most this much for one consumer's per-channel contributions (C x P x O doubles)


def taylor_scores(graph: Graph, groups, batches) -> list[np.ndarray]:
    acts = {d[0] for g in groups for d in g.dims
            if (n := graph.producer(d[0])) is not None and is_layer(n)}
    sums = {v: None for v in acts}
    for batch in batches:
        batch = tuple(x.float().requires_grad_(True) for x in batch)  # so every activation has a gradient
        outs, kept = forward_with_values(graph, batch, acts)
        for t in kept.values():
            t.retain_grad()
        y = outs[0]
        loss = F.cross_entropy(y, y.argmax(1).detach()) if y.ndim == 2 else 0.5 * (y ** 2).mean()
        loss.backward()
        for v, t in kept.items():
            axes = [a for a in range(t.ndim) if a != _channel_axis(groups, v)]
            s = (t * t.grad).mean(dim=axes).abs().detach().numpy()
            sums[v] = s if sums[v] is None else sums[v] + s
    scores = []
    for g in groups:
        sc = np.zeros(g.size)
        for k, unit in enumerate(g.units):
            for (v, axis), idx in unit.indices.items():
                if v in acts and sums[v] is not None:
                    sc[k] += sums[v][idx].sum()
        scores.append(sc / len(batches))
    return scores


def _channel_axis(groups, value) -> int:
    for g in groups:
        for v, axis in g.dims:
            if v == value:
                return axis
    raise AssertionError(value)


def _consumer(graph: Graph, group, reduces):
    """The single dense conv2d/linear reading this group's channels, or None."""
    read = [(v, a) for v, a in group.dims if (v, a) in reduces]
    if len(read) != 1 or any(len(i) != 1 for u in group.units for i in u.indices.values()):
        return None
    w = read[0][0]
    users = graph.users(w)
    if len(users) != 1:
        return None
    node = users[0]
    if node.op == "conv2d" and node.attrs["groups"] == 1 and (node.inputs[0], 1) in group.dims:
        return node
    if node.op == "linear" and graph.type_of(node.inputs[0]).ndim == 2 and (node.inputs[0], 1) in group.dims:
        return node
    return None


def _patches(node, x: torch.Tensor, positions: np.ndarray, kernel) -> torch.Tensor:
    """(positions, C, k*k): the input patch each sampled output position reads."""
    if node.op == "linear":
        return x[positions].unsqueeze(-1)
    a = node.attrs
    cols = F.unfold(x, kernel_size=kernel, dilation=a["dilation"], padding=a["padding"], stride=a["stride"])
    n, ckk, length = cols.shape
    c = x.shape[1]
    cols = cols.permute(0, 2, 1).reshape(n * length, c, ckk // c)
    return cols[positions]


def reconstruct(graph: Graph, groups, reduces, batches, keep_counts, seed: int = 0):
    """For each eligible group: choose the channels to drop (ThiNet greedy) and
    refit its consumer's weights in `graph`. Returns {group index: unit indices
    to drop}; ineligible groups are left out."""
    chosen = {}
    consumers = {gi: _consumer(graph, g, reduces) for gi, g in enumerate(groups)}
    wanted = {n.inputs[0] for n in consumers.values() if n is not None}
    if not wanted:
        return chosen
    inputs: dict = {v: [] for v in wanted}
    with torch.no_grad():
        for batch in batches:
            _, kept = forward_with_values(graph, batch, wanted)
            for v in wanted:
                inputs[v].append(kept[v])
    rng = np.random.default_rng(seed)
    for gi, node in consumers.items():
        if node is None:
            continue
        g = groups[gi]
        x = torch.cat(inputs[node.inputs[0]])
        w = torch.from_numpy(np.array(graph.params[node.inputs[1]], dtype=np.float64))
        total = x.shape[0] * (int(np.prod(node.type.shape[2:])) if node.op == "conv2d" else 1)
        fits = max(256, CONTRIB_BYTES // (8 * w.shape[0] * w.shape[1]))  # wide layers: fewer positions
        pos = rng.choice(total, size=min(total, MAX_POSITIONS, fits), replace=False)
        patches = _patches(node, x, pos, tuple(w.shape[2:])).double()  # (P, C, kk)
        wf = w.reshape(w.shape[0], w.shape[1], -1)  # (O, C, kk)
        contrib = torch.einsum("pck,ock->cpo", patches, wf).reshape(w.shape[1], -1)  # per-channel contribution
        chan = [int(u.indices[(node.inputs[0], 1)][0]) for u in g.units]
        n_drop = g.size - keep_counts[gi]
        # greedy: drop the unit whose contribution, added to the dropped ones' sum `acc`, changes the
        # output least; |acc + c_i|^2 = |acc|^2 + 2 acc.c_i + |c_i|^2, with acc.c_i kept up to date
        idx = torch.tensor(chan)  # contrib's row of each unit (contrib is large: no copy of it is made)
        norms = torch.linalg.vector_norm(contrib, dim=1)[idx] ** 2
        dots = torch.zeros(g.size, dtype=torch.float64)
        left = torch.ones(g.size, dtype=torch.bool)
        dropped = []
        for _ in range(n_drop):
            costs = torch.where(left, 2 * dots + norms, torch.tensor(float("inf"), dtype=torch.float64))
            best = int(torch.argmin(costs))
            dropped.append(best)
            dots += (contrib @ contrib[chan[best]])[idx]
            left[best] = False
        left = [i for i in range(g.size) if left[i]]
        chosen[gi] = dropped
        kept_c = sorted(chan[i] for i in left)
        target = contrib.sum(0).reshape(len(pos), -1)  # the layer's original output (no bias)
        a = patches[:, kept_c, :].reshape(len(pos), -1)
        sol = ridge_solve(a.T @ a, a.T @ target)  # (|S|*kk, O)
        new_w = w.clone()
        new_w[:, kept_c] = sol.T.reshape(w.shape[0], len(kept_c), *w.shape[2:])
        graph.set_param(node.inputs[1], new_w.numpy().astype(graph.params[node.inputs[1]].dtype))
    return chosen
