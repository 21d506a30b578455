"""Build a graph into a TVM Relax executable for a target."""
from __future__ import annotations

import time

from ...errors import CompileError
from ...ir import Graph
from .lower import to_relax


def build(graph: Graph, target: dict):
    """-> (tvm.relax.VMExecutable, seconds). `target` is a resolved target dict."""
    import tvm

    t0 = time.perf_counter()
    mod = to_relax(graph)
    try:
        with tvm.target.Target(target):
            ex = tvm.compile(mod, target=tvm.target.Target(target))
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CompileError(f"TVM failed to build for {target.get('kind')} "
                           f"{target.get('mtriple', '')}: {msg[-1] if msg else type(e).__name__}") from None
    return ex, time.perf_counter() - t0
