"""LayerTimer: how passes learn what a rewrite costs on the target, without knowing the backend.

A speed guard (Decompose's rank="auto", Quantize's and the conv rewrites' min_speedup) cuts
the layer or block it is deciding about out of the graph as a small graph of its own, and
asks a LayerTimer for the seconds per call of each candidate, built for the target and timed
in interleaved rounds (so a passing disturbance hits every candidate alike). The timer caches
by what decides latency (ops, shapes, attributes, target; not weight values), in memory and,
with `cache=`, in one JSON file that every guard shares, so a layer repeated in a network or
met again in the next run is measured once.

Backends implement `measure`; the TVM backend (backends/tvm/timer.py) times here, or on a
device registered with a TVM RPC tracker:

    timer = shave.layer_timer(rpc="tracker-host:9190/rpi4", cache="latency.json")
    shave.passes.Decompose(rank="auto", target="rpi4", timer=timer)

`layer_timer` loads the default backend by name, so passes (which only receive a timer)
never import one.
"""
from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path
from typing import Callable, Sequence

from .ir import Graph

DEFAULT_BACKEND = "shave.backends.tvm.timer"
_FACTORIES: dict[str, Callable[..., "LayerTimer"]] = {}
_SHARED: dict[tuple, dict[str, list[float]]] = {}  # (timer class, where) -> key -> seconds, for this process


def graph_key(graph: Graph) -> list:
    """What a small graph's latency depends on: its input, node and output types and attributes
    (weights by shape only)."""
    return [[list(t.shape) + [t.dtype] for _, t in graph.inputs],
            [[n.op, [str(graph.type_of(v)) for v in n.inputs], sorted((k, str(v)) for k, v in n.attrs.items())]
             for n in graph.nodes],
            [str(graph.type_of(v)) for v in graph.outputs]]


class LayerTimer:
    """Seconds per call of small graphs built for a target; cached. Subclasses implement `measure`.

    `where`: where measure() runs ("here", "rpc tracker-host:9190/rpi4"), part of every cache key;
    `shared`: timers of one class and place share one in-memory cache in the process (what one pass
    measured, the next one reuses)."""

    def __init__(self, cache=None, where: str = "here", shared: bool = False):
        self.path = Path(cache) if cache else None
        self.where = where
        self.measured = 0  # groups measured (not served from the cache) by this timer
        self._memory = _SHARED.setdefault((type(self).__name__, where), {}) if shared else {}
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            self._memory.update(json.loads(self.path.read_text()))

    def measure(self, graphs: Sequence[Graph], target: dict) -> list[float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def key(self, graphs: Sequence[Graph], target: dict) -> str:
        return self._key([graph_key(g) for g in graphs], target)

    def _key(self, graph_keys: list, target: dict) -> str:
        return json.dumps([self.where, sorted((k, str(v)) for k, v in target.items()), graph_keys])

    def time(self, graphs: Sequence[Graph], target: dict, cached: bool = True) -> list[float]:
        """Median seconds per call of each graph, measured together (graphs with the same key once);
        from the cache unless `cached` is False (then measured again and stored)."""
        graph_keys = [graph_key(g) for g in graphs]
        ids = [json.dumps(k) for k in graph_keys]
        if len(set(ids)) < len(ids):  # graphs alike in all that decides latency are measured once
            first = {}
            for g, i in zip(graphs, ids):
                first.setdefault(i, g)
            got = dict(zip(first, self.time(list(first.values()), target, cached)))
            return [got[i] for i in ids]
        key = self._key(graph_keys, target)
        with self._lock:
            hit = self._memory.get(key) if cached else None
        if hit is not None:
            return list(hit)
        got = [float(t) for t in self.measure(graphs, target)]
        if len(got) != len(graphs):
            raise ValueError(f"{type(self).__name__}.measure returned {len(got)} times for {len(graphs)} graphs")
        with self._lock:
            self._memory[key] = got
            self.measured += 1
            if self.path is not None:
                stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
                stored[key] = got
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(self.path.suffix + ".tmp")
                tmp.write_text(json.dumps(stored, indent=0))
                tmp.replace(self.path)
        return got


class FunctionTimer(LayerTimer):
    """A LayerTimer around a plain function `(graphs, target) -> seconds per graph` (e.g. a model
    of the device's latency, or a stand-in in tests)."""

    def __init__(self, fn: Callable, cache=None):
        super().__init__(cache, where=f"function {getattr(fn, '__name__', type(fn).__name__)}")
        self.fn = fn

    def measure(self, graphs, target):
        return self.fn(list(graphs), target)


def register_timer(backend: str, factory: Callable[..., LayerTimer]) -> None:
    """Make `factory(cache=..., rpc=..., **options)` the LayerTimer of `backend` (a module name)."""
    _FACTORIES[backend] = factory


def layer_timer(cache=None, rpc: str | None = None, backend: str = DEFAULT_BACKEND, **options) -> LayerTimer:
    """The backend's LayerTimer. `cache`: a JSON file of measured times; `rpc`: "host:port/key" of a
    TVM RPC tracker whose device `key` runs the measurements (default: this machine)."""
    if backend not in _FACTORIES:
        importlib.import_module(backend)  # registers itself
    return _FACTORIES[backend](cache=cache, rpc=rpc, **options)


def as_timer(timer, cache=None) -> LayerTimer:
    """What passes accept as `timer=`: a LayerTimer, a function (graphs, target) -> seconds, or None
    for the default backend's timer here."""
    if timer is None:
        return layer_timer(cache=cache)
    if isinstance(timer, LayerTimer):
        return timer
    if callable(timer):
        return FunctionTimer(timer, cache)
    from .errors import PassError

    raise PassError(f"timer must be a LayerTimer (shave.layer_timer(...)) or a function (graphs, target) -> "
                    f"seconds, got {type(timer).__name__}")
