"""The TVM backend's LayerTimer (shave/timing.py): build each small graph with this backend for
the target and time it with TVM's runtime, here or on a device behind a TVM RPC tracker.

Graphs are timed in interleaved rounds (`rounds`, each call repeated for at least `min_ms`
ms), after one warm-up call each; the median per-call time of each graph is returned."""
from __future__ import annotations

import numpy as np

from ...errors import CompileError
from ...ir import Graph
from ...runtime.launcher import host_launcher
from ...runtime.module import load_library, target_mismatch
from ...target import required_features, target_arch
from ...timing import LayerTimer, register_timer
from .build import build
from .tune import _check_tracker, _parse_rpc


class TVMTimer(LayerTimer):
    def __init__(self, cache=None, rpc: str | None = None, rounds: int = 7, min_ms: int = 20, timeout_s: int = 120):
        self.rpc = _parse_rpc(rpc, "the layer timer's rpc") if rpc else None
        super().__init__(cache, where=f"rpc {rpc}" if rpc else "here", shared=True)
        self.rounds, self.min_ms, self.timeout_s = int(rounds), int(min_ms), int(timeout_s)

    def measure(self, graphs: list[Graph], target: dict) -> list[float]:
        import tvm
        from tvm import relax

        if self.rpc is None:
            why = target_mismatch({"arch": target_arch(target), "name": target.get("mcpu") or target.get("kind"),
                                   "dict": target, "cpu_features": required_features(target)})
            if why:
                raise CompileError(f"timing layers for this target needs its device: {why}; pass "
                                   "timer=shave.layer_timer(rpc='tracker-host:port/key') to time them there")
        libs = [build(g, target)[0] for g in graphs]
        if self.rpc is None:
            dev = tvm.cpu()
            host_launcher()  # as the compiled model will run them
            vms = [relax.VirtualMachine(load_library(lib), dev) for lib in libs]
        else:
            from tvm import rpc

            host, port, key = self.rpc
            _check_tracker(host, port, key, "layer timing")
            remote = rpc.connect_tracker(host, port).request(key, session_timeout=self.timeout_s)
            dev = remote.cpu() if target_arch(target) != "cuda" else remote.cuda()
            vms = []
            for i, lib in enumerate(libs):
                name = f"shave_layer_{i}.so"
                remote.upload(bytearray(lib), name)
                vms.append(relax.VirtualMachine(remote.load_module(name), dev))
        rng = np.random.default_rng(0)
        xs = [[tvm.runtime.tensor(rng.standard_normal(t.shape).astype(t.dtype), dev) for _, t in g.inputs]
              for g in graphs]
        timers = [vm.time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=self.min_ms) for vm in vms]
        for t, x in zip(timers, xs):  # warm up: first calls page in code and weights
            t(*x)
        samples: list[list[float]] = [[] for _ in graphs]
        for _ in range(self.rounds):
            for s, t, x in zip(samples, timers, xs):
                s.append(t(*x).mean)
        return [float(np.median(s)) for s in samples]


register_timer(__name__, TVMTimer)
