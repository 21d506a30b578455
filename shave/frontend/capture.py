"""torch model -> shave IR.

torch.export is tried first. If it cannot trace the model, torch.fx's
symbolic tracer is the fallback; its graph is then re-traced to aten ops with
make_fx so that both paths share one set of converters (frontend/aten.py).
The user's model is never modified: a model in training mode is copied and
the copy is put in eval mode.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import operator
import warnings

import numpy as np
import torch

from ..errors import CaptureError, IRError, UnsupportedOpError
from ..ir import Graph, Node, TensorType, get_op, verify
from .aten import CONVERTERS, IGNORED
from .canonical import canonicalize
from .source import user_source


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _normalise_inputs(example_inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise CaptureError("example_inputs must be a tensor or a non-empty tuple of tensors")
    out = []
    for i, x in enumerate(example_inputs):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise CaptureError(f"example input {i} is a {type(x).__name__}, not a tensor")
        out.append(x.detach())
    return tuple(out)


class _Converter:
    """Walks one aten-level fx graph and builds the IR graph."""

    def __init__(self, what: str):
        self.what = what
        self.graph = Graph()
        self.values: dict[torch.fx.Node, object] = {}

    # --- helpers used by converters -------------------------------------
    def val(self, arg) -> str:
        if isinstance(arg, torch.fx.Node):
            v = self.values[arg]
            if not isinstance(v, str):
                raise CaptureError(f"{self.what}: value of node {arg.name!r} is not a single tensor")
            return v
        if isinstance(arg, (int, float, bool)):
            return self.const(np.float32(arg), "const")
        raise CaptureError(f"{self.what}: cannot use {type(arg).__name__} {arg!r} as a tensor")

    def const(self, array, base: str) -> str:
        return self.graph.add_param(base, np.asarray(array))

    def source(self, n: torch.fx.Node) -> str:
        return user_source(n.meta.get("stack_trace"))

    def unsupported(self, n: torch.fx.Node, why: str):
        src = self.source(n)
        raise UnsupportedOpError(f"{self.what}: unsupported {why} in {_target_name(n)}"
                                 + (f" at {src}" if src else f" (node {n.name})"))

    def node_name(self, n: torch.fx.Node, suffix: str = "") -> str:
        stack = n.meta.get("nn_module_stack") or {}
        base = n.name
        if stack:
            path, cls = list(stack.values())[-1]
            cls = cls if isinstance(cls, str) else getattr(cls, "__module__", "") + "." + cls.__qualname__
            if path and cls.startswith("torch.nn.modules."):
                base = path  # a leaf torch.nn module: name the node after it, e.g. "layer1.0.conv1"
            elif path:
                base = f"{path}.{n.name}"
        return self.graph.fresh_name(f"{base}.{suffix}" if suffix else base)

    def emit(self, op: str, inputs: list[str], attrs: dict, n: torch.fx.Node, suffix: str = "") -> str:
        opdef = get_op(op)
        src = self.source(n)
        node = Node(self.node_name(n, suffix), op, inputs, attrs, None, src)
        try:
            node.type = opdef.infer([self.graph.type_of(v) for v in inputs], attrs)
        except (IRError, RuntimeError, ValueError, TypeError) as e:
            raise CaptureError(f"{self.what}: {op} at {src or n.name}: {_first_line(e)}") from None
        self.graph.nodes.append(node)
        return node.name

    # --- the walk --------------------------------------------------------
    def convert(self, gm: torch.fx.GraphModule, params: dict[str, str], param_values: dict[str, torch.Tensor]):
        """params: placeholder/get_attr name -> state_dict name."""
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if n.name in params:
                    self.values[n] = self._param(params[n.name], param_values[params[n.name]])
                else:
                    t = n.meta["val"]
                    self.graph.inputs.append((n.name, TensorType(tuple(t.shape), str(t.dtype).replace("torch.", ""))))
                    self.values[n] = n.name
            elif n.op == "get_attr":
                self.values[n] = self._param(n.target, _fetch_attr(gm, n.target))
            elif n.op == "call_function":
                if n.target in IGNORED:
                    continue
                functional = _functional_form(n.target)
                conv = CONVERTERS.get(functional if functional is not None else n.target)
                if conv is None:
                    src = self.source(n)
                    layer = _torch_layer(n)
                    what = (f"layer {layer} (its op {_target_name(n)} has no IR form)" if layer
                            else f"op {_target_name(n)}")
                    raise UnsupportedOpError(
                        f"{self.what}: unsupported {what}" + (f" at {src}" if src else f" (node {n.name})")
                        + "; see shave.ir.registered_ops() for what the IR has")
                self.values[n] = conv(self, n)
                if functional is not None:
                    self._mutate(n)
            elif n.op == "output":
                outs = torch.utils._pytree.tree_leaves(n.args[0])
                for o in outs:
                    if not isinstance(o, torch.fx.Node):
                        raise CaptureError(f"{self.what}: the model returns a non-tensor output {o!r}")
                names = [self.val(o) for o in outs]
                # a graph output must be a node value: pass inputs/params through an identity reshape
                self.graph.outputs = [self._as_node(v) for v in names]
            else:
                raise CaptureError(f"{self.what}: unexpected fx node kind {n.op!r} ({n.name})")
        self.graph.remove_dead()
        return self.graph

    def _mutate(self, n: torch.fx.Node) -> None:
        """After an in-place op (relu_, add_, ...), later reads of the mutated
        tensor see the op's result. Mutating a view would also change its base
        tensor, and mutating an input or weight changes the caller's data: both
        are refused rather than silently mis-compiled."""
        target = n.args[0]
        if self.values[n] == self.values.get(target):
            return  # a no-op here (e.g. in-place dropout in eval mode): nothing changes
        if target.op != "call_function" or target.target in _VIEW_OPS:
            what = "a model input or weight" if target.op != "call_function" else "a view of another tensor"
            src = self.source(n)
            raise UnsupportedOpError(f"{self.what}: in-place {_target_name(n)} on {what}"
                                     + (f" at {src}" if src else f" (node {n.name})") + "; write it out of place")
        self.values[target] = self.values[n]

    def _param(self, name: str, tensor: torch.Tensor) -> str:
        arr = tensor.detach().cpu().numpy()
        if name in self.graph.params:
            return name
        self.graph.set_param(name, arr)
        return name

    def _as_node(self, v: str) -> str:
        if self.graph.producer(v) is not None:
            return v
        t = self.graph.type_of(v)
        node = Node(self.graph.fresh_name(f"{v}.out"), "reshape", [v], {"shape": t.shape}, t)
        self.graph.nodes.append(node)
        return node.name


_aten = torch.ops.aten
_VIEW_OPS = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.slice.Tensor,
             _aten.select.int, _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.unsqueeze.default,
             _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.expand.default, _aten.narrow.default,
             _aten.flatten.using_ints, _aten.alias.default, _aten.unflatten.int, operator.getitem,
             # these return their input itself in some cases (already contiguous, same dtype, eval mode)
             _aten.contiguous.default, _aten.detach.default, _aten.to.dtype, _aten.to.dtype_layout,
             _aten.dropout.default}


def _functional_form(target):
    """aten.relu_.default -> aten.relu.default; None for ops that are not in-place."""
    if not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(_aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _target_name(n: torch.fx.Node) -> str:
    t = n.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _fetch_attr(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _torch_layer(n: torch.fx.Node) -> str | None:
    """'nn.LSTM (l)' when the node was traced inside a torch.nn layer (not a container), else None:
    an unsupported layer is named as the user wrote it, not by the first aten op inside it."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    cls = cls if isinstance(cls, str) else getattr(cls, "__module__", "") + "." + cls.__qualname__
    if not cls.startswith("torch.nn.modules.") or cls.startswith("torch.nn.modules.container."):
        return None
    return f"nn.{cls.rsplit('.', 1)[-1]}" + (f" ({path})" if path else "")


# ----------------------------------------------------------------------- paths
def _via_export(model, args, what) -> Graph:
    ep = torch.export.export(model, args, strict=False)
    sig = ep.graph_signature
    params = {}
    values = {}
    for spec in sig.input_specs:
        if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            params[spec.arg.name] = spec.target
            values[spec.target] = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
        elif spec.kind.name != "USER_INPUT":
            raise CaptureError(f"{what}: unsupported export input kind {spec.kind.name} ({spec.target})")
    return _Converter(what).convert(ep.graph_module, params, values)


def _via_fx(model, args, what) -> Graph:
    from torch.fx.experimental.proxy_tensor import make_fx

    traced = torch.fx.symbolic_trace(model)
    gm = make_fx(traced, tracing_mode="real", pre_dispatch=True)(*args)
    _annotate_shapes(gm, args)
    # make_fx calls weights _param_constantN; give them back their state_dict names
    by_storage = {t.data_ptr(): name for name, t in [*model.named_parameters(), *model.named_buffers()]}
    params, values = {}, {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = _fetch_attr(gm, n.target)
            name = by_storage.get(t.data_ptr(), n.target) if isinstance(t, torch.Tensor) else n.target
            n.op, params[n.name], values[name] = "placeholder", name, t
    return _Converter(what).convert(gm, params, values)


def _annotate_shapes(gm, args):
    """make_fx(real) records no tensor metadata; run the graph once to fill meta['val']."""

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)


def eval_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` if it is in eval mode, else an eval-mode copy (the user's model is never changed)."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"shave wants a torch.nn.Module, got {type(model).__name__}")
    if not model.training:
        return model
    mode_dependent = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd,
                      torch.nn.modules.instancenorm._InstanceNorm)
    if any(isinstance(m, mode_dependent) for m in model.modules()):
        warnings.warn(f"{type(model).__name__} is in training mode; shave uses an eval-mode copy "
                      "(your model is unchanged)", stacklevel=3)
    return copy.deepcopy(model).eval()


@contextlib.contextmanager
def _torch_logs_quiet():
    """A failed torch.export prints the partial graph to stderr (twice, on data-dependent control
    flow) and torch logs warnings about it; shave's CaptureError already says why, in one line.
    While shave traces, torch's loggers are off and what torch prints to stderr is dropped."""
    names = [n for n in logging.root.manager.loggerDict if n == "torch" or n.startswith("torch.")]
    loggers = [logging.getLogger(n) for n in names]
    was = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, d in zip(loggers, was):
            lg.disabled = d


def capture(model: torch.nn.Module, example_inputs) -> Graph:
    """Trace `model` on `example_inputs` into a verified shave IR graph."""
    model = eval_model(model)
    args = _normalise_inputs(example_inputs)
    what = type(model).__name__
    try:
        with torch.no_grad(), _torch_logs_quiet():
            graph = _via_export(model, args, what)
    except UnsupportedOpError:
        raise
    except CaptureError:
        raise
    except Exception as export_error:
        try:
            with torch.no_grad(), _torch_logs_quiet():
                graph = _via_fx(model, args, what)
        except (UnsupportedOpError, CaptureError):
            raise
        except Exception as fx_error:
            try:
                with torch.no_grad():
                    model(*args)
            except Exception as run_error:  # the model itself rejects these inputs
                raise CaptureError(f"{what} fails on the example inputs: {_first_line(run_error)}") from None
            raise CaptureError(f"cannot trace {what}: torch.export: {_first_line(export_error)}; "
                               f"torch.fx: {_first_line(fx_error)}") from None
        warnings.warn(f"torch.export could not trace {what} ({_first_line(export_error)}); "
                      "captured it with torch.fx instead", stacklevel=2)
    return verify(canonicalize(graph))
