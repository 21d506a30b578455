"""IR -> torch.fx.GraphModule, and trained weights back into the IR.

Each IR node becomes a call of its op's reference kernel; each parameter
becomes an nn.Parameter (statistics the op registry calls buffers become
buffers), so the module trains like any other. A batch norm whose statistics
and affine weights are its own becomes an `IRBatchNorm` submodule (a torch
`_BatchNorm`): in `.train()` it normalises with batch statistics and updates
its running ones (under torch.distributed, those of the global batch, on any
device: no SyncBatchNorm conversion is needed), and in `.eval()` (the mode
`to_torch` returns) it is the IR's inference batch norm. `from_torch(module, graph)` writes a trained
module's weights and statistics back into a copy of the graph.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx

from ..ir import Graph, get_op


class _Kernel:
    """A picklable, readable callable for one op (fx prints its name)."""

    def __init__(self, op: str):
        self.op = op
        self.__name__ = op

    def __call__(self, *args, **kwargs):
        return get_op(self.op).kernel(*args, **kwargs)


def _batch_reshape(x, *, tail):
    return torch.reshape(x, (x.shape[0],) + tuple(tail))


def _call(graph: Graph, n):
    """(callable, attrs) for one node. The IR's shapes are static, but a reshape
    that keeps dim 0 (the batch) keeps the run-time batch here, so the reference
    module also trains and evaluates on batches of another size."""
    if n.op == "reshape" and graph.type_of(n.inputs[0]).shape[:1] == tuple(n.attrs["shape"][:1]):
        return _batch_reshape, {"tail": tuple(n.attrs["shape"][1:])}
    return _Kernel(n.op), dict(n.attrs)


def _attr_name(param: str, taken: set[str]) -> str:
    base = "p_" + "".join(c if c.isalnum() else "_" for c in param)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes, differentiable: every process's loss reads the sum, so each
    input's gradient is the sum of the processes' gradients of the sum."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class IRBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """An IR batch_norm node as a module owning its weight, bias and running statistics.

    Training under torch.distributed with several processes, it normalises with the statistics
    of the global batch (sums all-reduced with autograd), as SyncBatchNorm does on GPUs, on any
    device and backend (gloo on CPUs included)."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"batch norm wants at least 2-d input, got {x.dim()}-d")

    def forward(self, x):
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = x.new_full((1,), x.numel() / x.shape[1])
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        c = self.num_features
        n = sums[2 * c]
        mean = sums[:c] / n
        var = (sums[c:2 * c] / n - mean * mean).clamp_min(0)
        shape = (1, c) + (1,) * (x.dim() - 2)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(float(n) - 1, 1.0))
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


def _own_batch_norm(graph: Graph, n, used: dict[str, int]) -> bool:
    """Whether batch_norm `n`'s four inputs are float parameters no other node reads."""
    return (n.op == "batch_norm" and all(graph.is_param(v) and used[v] == 1 for v in n.inputs[1:])
            and len(set(n.inputs[1:])) == 4
            and all(np.asarray(graph.params[v]).dtype == np.float32 for v in n.inputs[1:]))


def _grad_scaled(t: torch.Tensor, g: float) -> torch.Tensor:
    """t in the forward pass, its gradient times g in the backward pass."""
    return (t - t * g).detach() + t * g


def _lsq(x: torch.Tensor, s: torch.Tensor, zp: float, qmin: float, qmax: float, n: int) -> torch.Tensor:
    """LSQ fake quantisation (Esser et al., "Learned Step Size Quantization"): the rounding passes the
    gradient straight through, the clamp stops it, and the step size s gets its own gradient,
    scaled by 1/sqrt(n * qmax) (n: elements per step size)."""
    s = _grad_scaled(s, 1.0 / math.sqrt(max(1, n) * max(qmax, 1)))
    v = x / s
    v = v + (torch.round(v) - v).detach()
    return (torch.clamp(v + zp, qmin, qmax) - zp) * s


class LearnedFakeQuant(torch.nn.Module):
    """An IR fake_quant (per tensor) whose scale trains (LSQ); from_torch writes it back into the
    node's attributes."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        self.zero_point, self.qmin, self.qmax = zero_point, qmin, qmax

    def forward(self, x):
        if not self.training:
            return get_op("fake_quant").kernel(x, scale=abs(float(self.scale.detach())), zero_point=self.zero_point,
                                               qmin=self.qmin, qmax=self.qmax)
        s = self.scale.abs() + 1e-12
        return _lsq(x, s, self.zero_point, self.qmin, self.qmax, x[0].numel())


class LearnedFakeQuantChannel(torch.nn.Module):
    """An IR fake_quant_channel (per output channel, symmetric) whose scales train (LSQ)."""

    def __init__(self, qmax: int):
        super().__init__()
        self.qmax = qmax

    def forward(self, w, scales):
        if not self.training:
            return get_op("fake_quant_channel").kernel(w, scales, qmax=self.qmax)
        s = scales.abs().reshape(-1, *([1] * (w.ndim - 1))) + 1e-12
        return _lsq(w, s, 0, -self.qmax, self.qmax, w[0].numel())


class IRModule(fx.GraphModule):
    """A GraphModule that also remembers which attribute holds which IR parameter."""

    param_names: dict[str, str]  # IR parameter name -> attribute name
    scale_attrs: dict[str, str]  # fake_quant node name -> the LearnedFakeQuant attribute holding its scale


def to_torch(graph: Graph, trainable: bool = True, learn_scales: bool = False) -> IRModule:
    """The graph as an nn.Module taking and returning tensors (a tuple when several outputs),
    in eval mode. `param_names` maps each IR parameter to its (dotted) attribute name. With
    `learn_scales`, the quantisation step sizes of a fake-quant graph train too (LSQ); otherwise
    per-channel weight scales are fixed buffers."""
    root = torch.nn.Module()
    # inputs the op registry calls statistics (e.g. a batch norm's running mean and var) are not trained
    buffers = {n.inputs[i] for n in graph.nodes for i in get_op(n.op).buffers if i < len(n.inputs)}
    taken: set[str] = set()
    attr_of: dict[str, str] = {}
    used: dict[str, int] = {}
    for n in graph.nodes:
        for v in n.inputs:
            used[v] = used.get(v, 0) + 1
    norms = {n.name for n in graph.nodes if _own_batch_norm(graph, n, used)}
    fq_scales = {n.inputs[1] for n in graph.nodes if n.op == "fake_quant_channel"}
    if not (trainable and learn_scales):
        buffers |= fq_scales
    learned = {}
    if trainable and learn_scales:
        for n in graph.nodes:
            if n.op in ("fake_quant", "fake_quant_channel"):
                a = n.attrs
                mod = (LearnedFakeQuant(a["scale"], a["zero_point"], a["qmin"], a["qmax"]) if n.op == "fake_quant"
                       else LearnedFakeQuantChannel(a["qmax"]))
                learned[n.name] = _attr_name(n.name, taken)
                root.add_module(learned[n.name], mod)
    for n in graph.nodes:
        if n.name in norms:
            mean, var, w, b = (graph.params[v] for v in n.inputs[1:])
            bn = IRBatchNorm(len(mean), eps=n.attrs["eps"])
            with torch.no_grad():
                for t, arr in zip((bn.running_mean, bn.running_var, bn.weight, bn.bias), (mean, var, w, b)):
                    t.copy_(torch.from_numpy(np.array(arr)))
            bn.weight.requires_grad_(trainable)
            bn.bias.requires_grad_(trainable)
            attr = _attr_name(n.name, taken)
            root.add_module(attr, bn)
            for v, field in zip(n.inputs[1:], ("running_mean", "running_var", "weight", "bias")):
                attr_of[v] = f"{attr}.{field}"
    for name, arr in graph.params.items():
        if name not in used or name in attr_of:
            continue
        attr = _attr_name(name, taken)
        t = torch.from_numpy(np.array(arr))
        if name in buffers or not t.is_floating_point() or t.ndim == 0:
            root.register_buffer(attr, t)
        else:
            root.register_parameter(attr, torch.nn.Parameter(t, requires_grad=trainable))
        attr_of[name] = attr

    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name, _ in graph.inputs:
        env[name] = g.placeholder("".join(c if c.isalnum() else "_" for c in name))
    for name, attr in attr_of.items():
        if "." not in attr:
            env[name] = g.get_attr(attr)
    for n in graph.nodes:
        if n.name in norms:
            node = g.call_module(attr_of[n.inputs[1]].split(".")[0], (env[n.inputs[0]],))
        elif n.name in learned:
            node = g.call_module(learned[n.name], tuple(env[v] for v in n.inputs))
        else:
            fn, attrs = _call(graph, n)
            node = g.call_function(fn, tuple(env[v] for v in n.inputs), attrs)
        node.name = "".join(c if c.isalnum() else "_" for c in n.name)
        env[n.name] = node
    outs = [env[v] for v in graph.outputs]
    g.output(outs[0] if len(outs) == 1 else tuple(outs))
    m = IRModule(root, g)
    m.param_names = attr_of
    m.scale_attrs = {name: attr for name, attr in learned.items() if graph.node(name).op == "fake_quant"}
    return m.eval()


def from_torch(module: torch.nn.Module, graph: Graph) -> Graph:
    """A copy of `graph` with the weights and statistics of `module`, a module `to_torch(graph)`
    made and trained (also wrapped, e.g. in DistributedDataParallel, or with its batch norms
    converted to SyncBatchNorm). The graph's dtypes are kept."""
    inner = getattr(module, "module", module)
    names = getattr(inner, "param_names", None)
    if names is None:
        raise TypeError(f"from_torch wants the module shave.to_torch made, got {type(module).__name__}")
    state = dict(inner.named_parameters()) | dict(inner.named_buffers())
    scale_params = {n.inputs[1] for n in graph.nodes if n.op == "fake_quant_channel"}
    out = graph.copy()
    for name, attr in names.items():
        if name not in graph.params:
            raise KeyError(f"the module has a weight for {name!r}, which the graph does not have: "
                           "was it made from another graph?")
        t = state[attr].detach()
        if tuple(t.shape) != graph.params[name].shape:
            raise ValueError(f"weight {name!r} is {tuple(t.shape)} in the module, "
                             f"{graph.params[name].shape} in the graph")
        arr = t.cpu().numpy().astype(graph.params[name].dtype)
        if name in scale_params:
            arr = np.abs(arr)
        out.set_param(name, arr)
    for node, attr in getattr(inner, "scale_attrs", {}).items():
        n = out.node(node)
        n.attrs = dict(n.attrs, scale=abs(float(state[f"{attr}.scale"].detach())))
    return out


def run_graph(graph: Graph, inputs) -> list[np.ndarray]:
    """Run the graph on numpy/torch inputs with the reference kernels; numpy outputs."""
    with torch.no_grad():
        outs, _ = forward_with_values(graph, inputs, ())
    return [o.detach().cpu().numpy() for o in outs]


def forward_with_values(graph: Graph, inputs, keep, params: dict | None = None):
    """Run the graph op by op in torch (autograd works) and also return the
    tensors of the values named in `keep`. `params` may supply torch tensors
    for some parameters (e.g. ones being optimised); the rest are constants."""
    env: dict = {name: torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
                 for (name, _), x in zip(graph.inputs, inputs)}
    params = params or {}
    kept = {}
    for n in graph.nodes:
        args = []
        for v in n.inputs:
            if v in env:
                args.append(env[v])
            elif v in params:
                args.append(params[v])
            else:
                args.append(torch.from_numpy(np.array(graph.params[v])))
        fn, attrs = _call(graph, n)
        env[n.name] = fn(*args, **attrs)
        if n.name in keep:
            kept[n.name] = env[n.name]
    return [env[v] for v in graph.outputs], kept
