"""The least-squares refit every pass uses: `ridge_solve` (normal equations with a tiny ridge),
and `refit_last_factor`, which refits a layer so that the layers replacing one reproduce its
outputs on calibration data (Decompose's factors, the conv rewrites' blocks).

This is the asymmetric reconstruction of Zhang et al. ("Accelerating Very
Deep Convolutional Networks for Classification and Detection"): the target
is the original layer's output in the *original* network, while the factors'
input comes from the network as decomposed so far, so each refit also absorbs
the error of the layers decomposed before it. Layers are refitted in graph
order. With the earlier factors fixed, the last factor (a 1x1 or 1xd conv,
or a linear) is linear in its weights, so the fit is an ordinary least
squares over every output position, solved from accumulated normal
equations (with a tiny ridge), and it also fits a bias.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..reference.interpreter import forward_with_values
from ..ir import Graph

RIDGE = 1e-6  # relative to the mean diagonal of the normal equations


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """argmin_W ||A W - Y||^2 + ridge ||W||^2 from the normal equations gram = A^T A, cross = A^T Y
    (the ridge: RIDGE times gram's mean diagonal), in gram's dtype."""
    ridge = RIDGE * float(torch.diagonal(gram).mean()) + 1e-12
    return torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), cross)


def _prefix(graph: Graph, value: str) -> Graph:
    """The part of `graph` that computes `value`."""
    g = graph.copy()
    g.outputs = [value]
    return g.remove_dead()


def _features(node, kernel: tuple, z: torch.Tensor, group: int) -> torch.Tensor:
    """(positions, features) the last factor multiplies its weights with, for one group."""
    if node.op == "linear":
        return z.reshape(-1, z.shape[-1])
    a = node.attrs
    k_g = z.shape[1] // a["groups"]
    zg = z[:, group * k_g:(group + 1) * k_g]
    cols = F.unfold(zg, kernel_size=kernel, dilation=a["dilation"], padding=a["padding"], stride=a["stride"])
    return cols.permute(0, 2, 1).reshape(-1, cols.shape[1])


def _targets(node, y: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    if node.op == "linear":
        return y.reshape(-1, y.shape[-1])
    n_g = y.shape[1] // groups
    return y[:, group * n_g:(group + 1) * n_g].permute(0, 2, 3, 1).reshape(-1, n_g)


def refit_last_factor(original: Graph, graph: Graph, original_name: str, last_name: str, batches) -> None:
    """Refit node `last_name` of `graph` (in place) to reproduce `original_name` of `original`."""
    node = graph.node(last_name)
    w = np.asarray(graph.params[node.inputs[1]], np.float64)
    groups = node.attrs.get("groups", 1) if node.op == "conv2d" else 1
    src, dst = _prefix(original, original_name), _prefix(graph, node.inputs[0])
    n_g = w.shape[0] // groups
    gram = [0.0] * groups
    cross = [0.0] * groups
    with torch.no_grad():
        for batch in batches:
            y = forward_with_values(src, batch, ())[0][0].double()
            z = forward_with_values(dst, batch, ())[0][0].double()
            for g in range(groups):
                x = _features(node, w.shape[2:], z, g)
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                gram[g] = gram[g] + x.T @ x
                cross[g] = cross[g] + x.T @ _targets(node, y, g, groups)
    new_w, new_b = np.empty_like(w), np.empty(w.shape[0])
    for g in range(groups):
        sol = ridge_solve(gram[g], cross[g]).numpy()  # (F + 1, N_g)
        new_w[g * n_g:(g + 1) * n_g] = sol[:-1].T.reshape((n_g,) + w.shape[1:])
        new_b[g * n_g:(g + 1) * n_g] = sol[-1]
    dtype = graph.params[node.inputs[1]].dtype
    node.inputs = [node.inputs[0], graph.add_param(f"{node.name}.weight.refit", new_w.astype(dtype)),
                   graph.add_param(f"{node.name}.bias.refit", new_b.astype(dtype))]
