"""Calibration data, one normalisation for every pass that takes data (Prune's data criteria,
Decompose's and the rewrites' refits, Quantize's ranges, ShareWeights' evaluation).

`data` is an iterable of example inputs: each item one tensor (or array) for a one-input
graph, or a tuple / list of them. One batched tensor alone is one batch, not an iterable of
its samples. Items become tuples of torch tensors; with the graph, each is checked against
its inputs (count, shape but the batch, finite values) and cast to its dtypes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import PassError
from ..ir import Graph


def calibration_batches(data, who: str = "calibration", graph: Graph | None = None) -> list[tuple[torch.Tensor, ...]]:
    """The data as a list of input tuples; `who` names the pass and its use of the data in errors
    ("Quantize calibration", "Prune(criterion='taylor') calibration", ...)."""
    if data is None:
        raise PassError(f"{who} needs data: an iterable of example inputs")
    if isinstance(data, (torch.Tensor, np.ndarray)) and (
            graph is None or (len(graph.inputs) == 1 and data.ndim == len(graph.inputs[0][1].shape))):
        data = [data]  # one batched tensor is one batch
    try:
        items = list(data)
    except TypeError:
        raise PassError(f"{who} data must be an iterable of example inputs, got {type(data).__name__}") from None
    if not items:
        raise PassError(f"{who} data is empty: give at least one example input")
    batches = []
    for i, item in enumerate(items):
        item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        item = tuple(x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)) for x in item)
        if graph is not None:
            item = check_item(graph, item, i, who)
        batches.append(item)
    return batches


def check_batches(graph: Graph, batches, who: str) -> list[tuple[torch.Tensor, ...]]:
    """Batches normalised without the graph (a pass given data when it was made), checked against it."""
    return [check_item(graph, item, i, who) for i, item in enumerate(batches)]


def check_item(graph: Graph, item: tuple, i: int, who: str) -> tuple:
    """One item (a tuple of tensors) checked against the graph's inputs and cast to their dtypes."""
    if len(item) != len(graph.inputs):
        raise PassError(f"{who} item {i} has {len(item)} inputs; the graph takes {len(graph.inputs)}")
    batch = []
    for x, (name, t) in zip(item, graph.inputs):
        if x.ndim != len(t.shape) or tuple(x.shape[1:]) != tuple(t.shape[1:]):
            want = "(N, " + ", ".join(str(d) for d in t.shape[1:]) + ")"
            raise PassError(f"{who} item {i}: input {name!r} has shape {tuple(x.shape)}, the graph wants {want}")
        x = x.to(getattr(torch, t.dtype))
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise PassError(f"{who} item {i}: input {name!r} has NaN or infinite values; "
                            f"{who.split()[0]} needs finite data")
        batch.append(x)
    return tuple(batch)
