"""`torch.compile(model, backend="shave")`: shave as a TorchDynamo backend.

    fast = torch.compile(model, backend="shave", options={"target": "x86", "passes": ["fold_bn"]})
    with torch.no_grad():
        y = fast(x)

Dynamo hands the backend each captured graph with the model's parameters and buffers as
graph inputs. The backend binds those (their values when the graph is compiled) as the
constants of a module, compiles that module with `shave.compile` on the graph's example
inputs, and returns a function taking the remaining inputs: torch tensors in, torch tensors
out, as the graph returns them. For inference: the weights are frozen at compile time (a
later change to a parameter is not seen, as with `torch.compile`'s freezing), and nothing is
differentiable. A new input shape is a new graph, compiled again (dynamo's recompilation).
The backend is registered under the name "shave" through the `torch_dynamo_backends` entry
point, so `torch.compile` finds it without `import shave`; `register()` does it by hand.
`options`: the keyword arguments of `shave.compile` (target, passes, tune).
"""
from __future__ import annotations

import torch

_CONSTANT_MARKS = ("_parameters_", "_buffers_")


class _Bound(torch.nn.Module):
    """The dynamo graph with its parameter and buffer inputs bound as this module's buffers."""

    def __init__(self, gm: torch.fx.GraphModule, inputs: list, constant: list[int]):
        super().__init__()
        self.gm, self.n, self.constant = gm, len(inputs), constant
        for k, i in enumerate(constant):
            self.register_buffer(f"c{k}", inputs[i].detach().clone())

    def forward(self, *user):
        args, it = [None] * self.n, iter(user)
        consts = {i: getattr(self, f"c{k}") for k, i in enumerate(self.constant)}
        for i in range(self.n):
            args[i] = consts[i] if i in consts else next(it)
        out = self.gm(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else out


def shave_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """The dynamo backend: compile `gm` with shave; returns the callable dynamo runs instead."""
    import shave
    from .errors import CompileError

    options = dict(options or {}, **kwargs)
    unknown = set(options) - {"target", "passes", "tune"}
    if unknown:
        raise CompileError(f"torch.compile(backend='shave') options: unknown {sorted(unknown)}; "
                           "known: target, passes, tune")
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = list(example_inputs)
    constant = [i for i, (name, t) in enumerate(zip(names, inputs))
                if isinstance(t, torch.nn.Parameter) or any(m in name for m in _CONSTANT_MARKS)]
    user = [i for i in range(len(inputs)) if i not in constant]
    if not user:
        raise CompileError("torch.compile(backend='shave'): the graph has no input besides its weights")
    module = _Bound(gm, inputs, constant).eval()
    returns_tuple = isinstance(gm.graph.output_node().args[0], (list, tuple))
    cm = shave.compile(module, tuple(inputs[i].detach() for i in user), **options)

    def run(*args):
        out = cm(*(args[i] for i in user))
        if returns_tuple:
            return out if isinstance(out, tuple) else (out,)
        return out

    run.compiled = cm  # the CompiledModel, for its report
    return run


def register() -> None:
    """Register the backend with dynamo under the name "shave" (the entry point does it too)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if "shave" not in _COMPILER_FNS:
        register_backend(compiler_fn=shave_backend, name="shave")
