"""Passes: Graph -> Graph rewrites with a declared numerical contract.

A pass is a `Pass` subclass (override `run`) or a plain function registered
with `register_pass`. Calling a pass object on a graph never changes that
graph: the pass works on a copy, and the result is verified before it is
returned. The pass manager (manager.py) adds the numerical check.

    @shave.register_pass("drop_relu6", contract="lossy")
    def drop_relu6(graph):
        for n in graph.nodes:
            if n.op == "relu6":
                n.op = "relu"
        return graph
"""
from __future__ import annotations

import sys
from typing import Callable

from ..errors import PassError
from ..ir import Graph, verify

CONTRACTS = ("exact", "lossy")


class Pass:
    name: str = "pass"
    contract: str = "exact"  # "exact": outputs must match within `tolerance`; "lossy": error is measured
    tolerance: float = 1e-4  # relative to the output scale, for exact passes

    def run(self, graph: Graph) -> Graph:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, graph: Graph) -> Graph:
        out = self.run(graph.copy())
        if not isinstance(out, Graph):
            raise PassError(f"pass {self.name!r} returned {type(out).__name__}, not a Graph")
        return verify(out.remove_dead())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.contract})"


class FunctionPass(Pass):
    def __init__(self, fn: Callable[[Graph], Graph], name: str, contract: str, tolerance: float):
        self.fn, self.name, self.contract, self.tolerance = fn, name, contract, tolerance

    def run(self, graph: Graph) -> Graph:
        return self.fn(graph)


_REGISTRY: dict[str, Callable[[], Pass]] = {}


def register_pass(name: str, contract: str = "exact", tolerance: float = 1e-4):
    """Register a pass by name. Decorates a Pass subclass (made with no
    arguments when asked for by name) or a function Graph -> Graph."""
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
            _REGISTRY[name] = lambda: FunctionPass(obj, name, contract, tolerance)
            return _REGISTRY[name]()
        raise TypeError(f"register_pass decorates a Pass subclass or a function, not {type(obj).__name__}")

    return deco


def get_pass(spec) -> Pass:
    """A pass from a registered name, a Pass object or class, or a plain callable (treated as lossy)."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, type) and issubclass(spec, Pass):  # the class itself: made with its defaults
        try:
            return spec()
        except TypeError as e:
            raise PassError(f"pass class {spec.__name__} cannot be made without arguments ({e}); "
                            f"pass an object: {spec.__name__}(...)") from None
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise PassError(f"unknown pass {spec!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
        return _REGISTRY[spec]()
    if callable(spec):
        return FunctionPass(spec, getattr(spec, "__name__", "pass"), "lossy", 0.0)
    raise PassError(f"a pass must be a name, a Pass or a callable, got {type(spec).__name__}")


def registered_passes() -> list[str]:
    return sorted(_REGISTRY)


def pass_list(passes) -> list:
    """`passes=` as a list: one name, Pass or function alone counts as a list of one."""
    if isinstance(passes, (str, Pass, type)) or (callable(passes) and not hasattr(passes, "__iter__")):
        return [passes]
    try:
        return list(passes)
    except TypeError:
        raise PassError(f"passes must be a list of pass names, Pass objects or functions, "
                        f"got {type(passes).__name__}") from None
