"""Build a graph into a TVM Relax executable for a target."""
from __future__ import annotations

import time

from ...errors import CompileError
from ...ir import Graph
from .cross import codegen_for, export_library
from .lower import follow_renames, to_relax
from .schedules import schedule_module
from .tune import TuneResult, tune_module


def build(graph: Graph, target: dict, tune=None, variants: dict | None = None
          ) -> tuple[bytes, float, "TuneResult | None", list]:
    """-> (the shared library's bytes, seconds, what tuning did, the conv kernel calls in the order
    the model makes them: lower.to_relax's `calls`). `target` is a resolved target dict; `tune` a
    TuneOptions or None (default schedules only). The library's VM function `main` runs `graph`;
    `variants` ({function name: graph}, the same graph at other batch sizes) adds one function each.
    The library is linked once here; running and exporting both use these bytes."""
    import tvm

    t0 = time.perf_counter()
    calls: list = []

    def lowered(kernels=None, tiles=None):
        calls.clear()
        return to_relax(graph, target, kernels, tiles, calls, variants)

    mod = lowered()
    tuned = None
    try:
        with tvm.target.Target(target), codegen_for(target):
            if tune is None:
                mod = schedule_module(mod, target)
            else:
                mod, tuned = tune_module(lowered, target, tune)
            follow_renames(mod, calls)
            ex = tvm.compile(mod, target=tvm.target.Target(target))
    except CompileError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CompileError(f"TVM failed to build for {target.get('kind')} "
                           f"{target.get('mtriple', '')}: {msg[-1] if msg else type(e).__name__}") from None
    data = export_library(ex, target)  # cross-linked for aarch64; with the GPU kernels for cuda
    return data, time.perf_counter() - t0, tuned, calls
