"""Fine-tune an IR graph as PyTorch, optionally distilling from a teacher.

    g2 = shave.finetune(pruned, data, steps=300, teacher=original_graph_or_model)

`data` yields (inputs, labels) batches. With a teacher, the loss mixes the
label cross-entropy with the KL divergence to the teacher's soft outputs
(Hinton et al.); without one it is the cross-entropy alone. Batch-norm
statistics stay frozen (the IR holds inference batch norm). Returns a new
graph with the trained weights; the input graph is not changed.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .reference import to_torch
from .errors import PassError
from .ir import Graph


def finetune(graph: Graph, data, steps: int = 200, lr: float = 1e-3, teacher=None, temperature: float = 4.0,
             alpha: float = 0.5) -> Graph:
    """`graph` trained for `steps` Adam steps (`lr`) on `data`, an iterable of (inputs, labels)
    batches, cycled; with a `teacher` (a graph or module) the loss is alpha * cross-entropy +
    (1 - alpha) * temperature^2 * KL to the teacher's softened outputs. Returns a new graph."""
    student = to_torch(graph, trainable=True).train()
    if isinstance(teacher, Graph):
        teacher = to_torch(teacher, trainable=False)
    if teacher is not None:
        teacher.eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    steps_bar = tqdm(range(steps), desc="fine-tuning", unit="step", leave=False, disable=None)
    for step, batch in zip(steps_bar, itertools.cycle(data)):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise PassError(f"finetune data item {step} is a {type(batch).__name__}"
                            + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                            + ": it must yield (inputs, labels) pairs")
        x, y = batch
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                soft = F.softmax(teacher(x) / temperature, 1)
            kd = F.kl_div(F.log_softmax(logits / temperature, 1), soft, reduction="batchmean") * temperature ** 2
            loss = alpha * loss + (1 - alpha) * kd
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = graph.copy()
    state = dict(student.named_parameters())
    for name, attr in student.param_names.items():
        if attr in state:
            out.set_param(name, state[attr].detach().numpy().astype(np.asarray(graph.params[name]).dtype))
    return out
