"""rank="auto": keep a decomposition only where the compiled layer gets faster.

For a layer and a candidate rank, the layer alone and its factors alone are
each built into a one-layer graph (rewrite.layer_graph), compiled with
shave's TVM backend for the target, and timed with TVM's runtime in
interleaved rounds (so a passing disturbance hits both alike); the result is
the median per-call time of each. Results are cached by (layer shape, method,
rank, target): in memory for the process, and in a JSON file when a path is
given. Latency depends on shapes only, so a layer repeated in a network is
measured once.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ...ir import Graph

_MEMORY: dict[str, list[float]] = {}  # key -> [original s, decomposed s]


class LatencyCache:
    def __init__(self, path=None):
        self.path = Path(path) if path else None
        self.measured = 0  # pairs measured (not served from the cache) by this object
        if self.path is not None and self.path.is_file():
            _MEMORY.update(json.loads(self.path.read_text()))

    @staticmethod
    def key(layer, method: str, rank, target: dict) -> str:
        return json.dumps([dataclasses.asdict(layer), method, rank, sorted(target.items())], default=str)

    def get(self, key: str):
        return _MEMORY.get(key)

    def put(self, key: str, value: list[float]) -> None:
        _MEMORY[key] = value
        self.measured += 1
        if self.path is not None:
            stored = json.loads(self.path.read_text()) if self.path.is_file() else {}
            stored[key] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(stored, indent=0))


def _vm(graph: Graph, target: dict):
    import tvm
    from tvm import relax

    from ...backends.tvm.build import build
    from ...runtime.module import load_library

    library = build(graph, target)[0]  # (library bytes, seconds, ...)
    return relax.VirtualMachine(load_library(library), tvm.cpu())


def time_graphs(graphs: list[Graph], target: dict, rounds: int = 7, min_ms: int = 20) -> list[float]:
    """Median seconds per call of each compiled graph, timed in interleaved rounds."""
    import tvm

    dev = tvm.cpu()
    vms = [_vm(g, target) for g in graphs]
    rng = np.random.default_rng(0)
    xs = [tvm.runtime.tensor(rng.standard_normal(g.inputs[0][1].shape).astype(g.inputs[0][1].dtype), dev)
          for g in graphs]
    timers = [vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=min_ms) for vm in vms]
    for t, x in zip(timers, xs):  # warm up: first calls page in code and weights
        t(x)
    samples = [[] for _ in graphs]
    for _ in range(rounds):
        for s, t, x in zip(samples, timers, xs):
            s.append(t(x).mean)
    return [float(np.median(s)) for s in samples]
