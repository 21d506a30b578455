"""Batch norms during recovery: insert them where a conv lost its own, re-estimate them, fold them last.

Fine-tuning a conv whose batch norm was folded into it trains badly (the
scale of each channel is baked into its weights, and nothing renormalises
the activations as the weights move). So recovery trains with a batch norm
after every float conv2d: the graph's own batch norms (kept until the end,
trained, statistics updated) and, where a conv has none, an inserted one that
starts as the identity (its running statistics are the conv's output
statistics on the data, its scale and shift undo them). After training,
every batch norm's statistics are re-estimated on the data with the final
weights, and the inserted ones are folded back into their convs, so the
graph comes back with the structure it came in with.
"""
from __future__ import annotations

import numpy as np
import torch

from ..ir import Graph, Node
from ..reference.interpreter import IRBatchNorm, forward_with_values

EPS = 1e-5


def needs_batch_norm(graph: Graph, n: Node) -> bool:
    """A float conv2d with its weight a parameter (not a fake-quant graph's) and no batch norm of its own."""
    if n.op != "conv2d" or not graph.is_param(n.inputs[1]) or graph.params[n.inputs[1]].dtype != np.float32:
        return False
    users = graph.users(n.name)
    return not (len(users) == 1 and users[0].op == "batch_norm" and graph.use_count(n.name) == 1)


def insert_batch_norms(graph: Graph, batches: list) -> tuple[Graph, list[str]]:
    """A copy of `graph` with an identity batch norm after each conv that `needs_batch_norm`, its
    statistics measured on `batches` (lists of graph inputs); -> (graph, the inserted nodes' names)."""
    out = graph.copy()
    convs = [n for n in out.nodes if needs_batch_norm(out, n)]
    if not convs:
        return out, []
    sums: dict[str, list] = {n.name: [0.0, 0.0, 0] for n in convs}
    with torch.no_grad():
        for batch in batches:
            _, kept = forward_with_values(out, batch, {n.name for n in convs})
            for name, y in kept.items():
                y = y.double().transpose(0, 1).reshape(y.shape[1], -1)
                acc = sums[name]
                acc[0], acc[1], acc[2] = acc[0] + y.sum(1), acc[1] + (y * y).sum(1), acc[2] + y.shape[1]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for acc in sums.values():  # every process inserts the same batch norms: the global statistics
            flat = torch.cat([acc[0], acc[1], torch.tensor([float(acc[2])], dtype=torch.float64)])
            dist.all_reduce(flat)
            c = len(acc[0])
            acc[0], acc[1], acc[2] = flat[:c], flat[c:2 * c], float(flat[-1])
    inserted = []
    for conv in convs:
        s, s2, count = sums[conv.name]
        mean = (s / count).numpy()
        std = np.sqrt(np.maximum((s2 / count).numpy() - mean ** 2, 0.0) + EPS)
        # the conv rescaled to outputs of unit variance (Adam's steps are then of the size they are
        # in a network trained with batch norm), and a batch norm that restores its scale and shift
        w, has_bias = conv.inputs[1], len(conv.inputs) > 2 and out.is_param(conv.inputs[2])
        if out.use_count(w) == 1 and (len(conv.inputs) == 2 or (has_bias and out.use_count(conv.inputs[2]) == 1)):
            weight = out.params[w].astype(np.float64) / std.reshape(-1, *([1] * (out.params[w].ndim - 1)))
            bias = out.params[conv.inputs[2]].astype(np.float64) if has_bias else np.zeros_like(mean)
            conv.inputs = [conv.inputs[0], out.add_param(f"{conv.name}.weight", weight.astype(np.float32)),
                           out.add_param(f"{conv.name}.bias", (bias / std).astype(np.float32))]
            stats = (mean / std, np.ones_like(std) - EPS)
        else:
            stats = (mean, std ** 2 - EPS)
        params = [out.add_param(f"{conv.name}.recovery_bn.{k}", a.astype(np.float32))
                  for k, a in (("mean", stats[0]), ("var", stats[1]), ("weight", std), ("bias", mean))]
        bn = Node(out.fresh_name(f"{conv.name}_recovery_bn"), "batch_norm", [conv.name] + params,
                  {"eps": EPS}, conv.type, conv.source)
        out.replace_uses(conv.name, bn.name)
        out.insert_after(conv, bn)
        inserted.append(bn.name)
    return out, inserted


def recalibrate(module: torch.nn.Module, batches, call) -> None:
    """Re-estimate every IRBatchNorm's running statistics on `batches` (a cumulative average over
    all of them, computed with the module's current weights); `call(module, batch)` runs one."""
    norms = [m for m in module.modules() if isinstance(m, IRBatchNorm)]
    if not norms:
        return
    was_training = module.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    with torch.no_grad():
        for batch in batches:
            call(module, batch)
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    module.train(was_training)


def recalibrate_batch_norms(graph: Graph, data, batches: int = 50) -> Graph:
    """A copy of `graph` with its batch norms' statistics re-estimated on up to `batches` batches of
    `data` (example inputs, as calibration takes them), the weights unchanged: the cheapest repair
    after pruning, whose removed channels leave the statistics of the layers after them stale."""
    from ..passes.calibration import calibration_batches
    from ..reference.interpreter import from_torch, to_torch

    items = calibration_batches(data, "batch-norm recalibration", graph)[:batches]
    module = to_torch(graph, trainable=False)
    recalibrate(module, items, lambda m, b: m(*b))
    return from_torch(module, graph)
