"""`finetune` as a pass, so that a recipe (a pass list) can hold its recoveries and replay them."""
from __future__ import annotations

from ..errors import PassError
from ..ir import Graph
from ..passes.base import Pass, register_pass
from .loop import finetune


@register_pass("finetune", contract="lossy")
class Finetune(Pass):
    """shave.finetune as a lossy pass: `Finetune(data, **finetune_arguments)` runs
    `shave.finetune(graph, data, **finetune_arguments)` on the graph it is given (seeded, so a
    pass list holding it replays to the same weights). shave.compress writes its recipes with it:
    `shave.compile(model, x, passes=result.recipe)` replays every step, recoveries included.
    Its error is measured against the graph before it, like every lossy pass's."""

    def __init__(self, data=None, **kwargs):
        if data is None:
            raise PassError("the finetune pass needs data: Finetune(data, steps=..., teacher=...)")
        self.data, self.kwargs = data, dict(kwargs)

    def run(self, graph: Graph) -> Graph:
        return finetune(graph, self.data, **self.kwargs)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={'<Graph>' if isinstance(v, Graph) else v!r}" for k, v in self.kwargs.items()
                         if k != "progress")
        return f"Finetune(data, {args})"
