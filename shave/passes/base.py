"""Passes: Graph -> Graph rewrites with a declared numerical contract.

A pass is a `Pass` subclass (override `run`) or a plain function registered
with `register_pass`. Calling a pass object on a graph never changes that
graph: the pass works on a copy, the result is verified, and the pass runs
under its instruments (instruments.py: by default the numerical check, so an
exact pass that changes the outputs fails here too, not only in compile).

    @shave.register_pass("drop_relu6", contract="lossy")
    def drop_relu6(graph):
        for n in graph.nodes:
            if n.op == "relu6":
                n.op = "relu"
        return graph

`pass.apply(graph)` returns a PassResult: the graph, whether it changed, the
measured error and the pass's per-layer plan (`plan`, as dicts in `records`,
which also land in the compile report and the artifact's manifest; `summary()`
renders it); `pass(graph)` returns the graph alone. A pass's `run(graph)`
returns the graph, or (graph, plan): the plan travels with the result and
nothing of a run stays on the pass object, so one pass object can run on
several graphs, from several threads. A pass names the ops it needs in `required_ops()` (e.g. Prune's
bn_gamma criterion needs batch norms): a graph without them is a PassError,
not a silent fallback. In `passes=`, a registered pass takes arguments as
"prune(ratio=0.3)" or ("prune", {"ratio": 0.3}).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import PassError
from ..ir import Graph, verify

CONTRACTS = ("exact", "lossy")


@dataclass
class PassResult:
    graph: Graph
    modified: bool  # the graph's nodes, attributes or parameters differ from the input's
    plan: list = field(default_factory=list)  # the pass's per-layer plan (its own entry type)
    error: float | None = None  # measured by the NumericCheck instrument
    seconds: float = 0.0
    pass_: "Pass | None" = None

    @property
    def records(self) -> list[dict]:
        """The plan as JSON-ready dicts (what the report and the manifest keep)."""
        return [_record(e) for e in self.plan]

    def summary(self) -> str:
        """The plan as text, one line per layer, as the pass renders it."""
        return self.pass_.summarize(self.plan) if self.pass_ is not None else ""


def _fingerprint(graph: Graph) -> tuple:
    return (tuple((n.name, n.op, tuple(n.inputs), repr(sorted(n.attrs.items()))) for n in graph.nodes),
            tuple(graph.outputs), tuple((k, id(v)) for k, v in graph.params.items()))


def _plain(v):
    """JSON-ready: numpy scalars and arrays, tuples -> Python numbers and lists."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _record(entry) -> dict:
    if dataclasses.is_dataclass(entry):
        entry = dataclasses.asdict(entry)
    elif hasattr(entry, "_asdict"):  # a NamedTuple
        entry = entry._asdict()
    return _plain(entry) if isinstance(entry, dict) else {"entry": _plain(entry)}


class Pass:
    name: str = "pass"
    contract: str = "exact"  # "exact": outputs must match within `tolerance`; "lossy": error is measured
    tolerance: float = 1e-4  # relative to the output scale, for exact passes

    def run(self, graph: Graph) -> "Graph | tuple[Graph, list]":  # pragma: no cover - abstract
        """The rewritten graph (the pass may edit `graph`: it is a copy), or (graph, plan)."""
        raise NotImplementedError

    def required_ops(self) -> dict[str, str]:
        """{op: why} for ops the input graph must contain (none by default)."""
        return {}

    def summarize(self, plan: list) -> str:
        """A run's plan as text (default: one line of fields per entry)."""
        return "\n".join(", ".join(f"{k}={v}" for k, v in _record(e).items()) for e in plan)

    def apply(self, graph: Graph, instruments=None) -> PassResult:
        """Run the pass on a copy of `graph` under `instruments` (default: instruments.default_instruments())."""
        from .instruments import default_instruments

        counts = graph.op_counts()
        for op, why in self.required_ops().items():
            if not counts.get(op):
                raise PassError(f"pass {self.name!r} needs {op} nodes, and the graph has none: {why}")
        instruments = default_instruments() if instruments is None else list(instruments)
        for i in instruments:
            i.before(self, graph)
        t0 = time.perf_counter()
        out, plan = self.run(graph.copy()), []
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Graph):
            out, plan = out
        if not isinstance(out, Graph):
            raise PassError(f"pass {self.name!r} returned {type(out).__name__}, not a Graph or (Graph, plan)")
        out = verify(out.remove_dead())
        result = PassResult(out, _fingerprint(out) != _fingerprint(graph), plan if isinstance(plan, list) else list(plan),
                            seconds=time.perf_counter() - t0, pass_=self)
        for i in instruments:
            i.after(self, graph, result)
        return result

    def __call__(self, graph: Graph) -> Graph:
        return self.apply(graph).graph

    def __repr__(self) -> str:
        """The class with its plain settings (numbers, strings, names), e.g. Prune(ratio=0.25, ...);
        data, timers and other objects are left out."""
        def plain(v):
            return v is None or isinstance(v, (bool, int, float, str)) or (
                isinstance(v, (tuple, list, frozenset)) and all(isinstance(x, (str, int, float)) for x in v)) or (
                isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, (int, float)) for k, x in v.items()))
        args = ", ".join(f"{k}={sorted(v) if isinstance(v, frozenset) else v!r}" for k, v in vars(self).items()
                         if not k.startswith("_") and plain(v) and k not in ("name", "contract", "tolerance"))
        return f"{type(self).__name__}({args})"


class FunctionPass(Pass):
    """A function `fn(graph, **kwargs) -> graph` as a pass."""

    def __init__(self, fn: Callable[..., Graph], name: str, contract: str, tolerance: float, **kwargs):
        if kwargs:
            inspect.signature(fn).bind(None, **kwargs)  # TypeError now, naming the argument, not at run time
        self.fn, self.name, self.contract, self.tolerance, self.kwargs = fn, name, contract, tolerance, kwargs

    def run(self, graph: Graph) -> Graph:
        return self.fn(graph, **self.kwargs)


_REGISTRY: dict[str, Callable[[], Pass]] = {}


def register_pass(name: str, contract: str = "exact", tolerance: float = 1e-4):
    """Register a pass by name. Decorates a Pass subclass or a function `fn(graph, **options) -> graph`;
    asked for by name ("name" or "name(option=value)"), it is made with those options."""
    if contract not in CONTRACTS:
        raise ValueError(f"contract must be one of {CONTRACTS}, got {contract!r}")

    def deco(obj):
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered")
        if isinstance(obj, type) and issubclass(obj, Pass):
            if not obj.__doc__:  # help(Prune) shows what the pass's module documents
                obj.__doc__ = sys.modules[obj.__module__].__doc__
            obj.name = name
            obj.contract = contract
            obj.tolerance = tolerance
            _REGISTRY[name] = obj
            return obj
        if callable(obj):
            _REGISTRY[name] = lambda **kw: FunctionPass(obj, name, contract, tolerance, **kw)
            return _REGISTRY[name]()
        raise TypeError(f"register_pass decorates a Pass subclass or a function, not {type(obj).__name__}")

    return deco


def _parse_call(spec: str) -> tuple[str, dict]:
    """"prune(ratio=0.3, criterion='l2')" -> ("prune", {"ratio": 0.3, "criterion": "l2"})."""
    try:
        call = ast.parse(spec.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)) or call.args:
            raise ValueError("not name(key=value, ...)")
        return call.func.id, {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise PassError(f"cannot read pass {spec!r}: write it as name(key=value, ...) with literal values ({e})") \
            from None


def _make(name: str, kwargs: dict) -> Pass:
    if name not in _REGISTRY:
        raise PassError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        raise PassError(f"pass {name!r} does not take these arguments {kwargs}: {e}") from None


def get_pass(spec) -> Pass:
    """A pass from a registered name ("fold_bn"), a name with arguments ("prune(ratio=0.3)" or
    ("prune", {"ratio": 0.3})), a Pass object or class, or a plain callable (treated as lossy)."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return _make(*spec)
    if isinstance(spec, type) and issubclass(spec, Pass):  # the class itself: made with its defaults
        try:
            return spec()
        except TypeError as e:
            raise PassError(f"pass class {spec.__name__} cannot be made without arguments ({e}); "
                            f"pass an object: {spec.__name__}(...)") from None
    if isinstance(spec, str):
        return _make(*_parse_call(spec)) if "(" in spec else _make(spec, {})
    if callable(spec):
        return FunctionPass(spec, getattr(spec, "__name__", "pass"), "lossy", 0.0)
    raise PassError(f"a pass must be a name, a Pass or a callable, got {type(spec).__name__}")


def registered_passes() -> list[str]:
    return sorted(_REGISTRY)


def pass_list(passes) -> list:
    """`passes=` as a list: one name, Pass or function alone counts as a list of one."""
    if isinstance(passes, (str, Pass, type)) or (callable(passes) and not hasattr(passes, "__iter__")):
        return [passes]
    if isinstance(passes, tuple) and len(passes) == 2 and isinstance(passes[0], str) and isinstance(passes[1], dict):
        return [passes]  # ("prune", {"ratio": 0.3}) alone
    try:
        return list(passes)
    except TypeError:
        raise PassError(f"passes must be a list of pass names, Pass objects or functions, "
                        f"got {type(passes).__name__}") from None
