"""Build a graph into a TVM Relax executable for a target."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ...errors import CompileError
from ...ir import Graph
from .lower import to_relax
from .quiet import quiet_tvm
from .schedules import schedule_module


def build(graph: Graph, target: dict) -> tuple[bytes, float]:
    """-> (the shared library's bytes, seconds). `target` is a resolved target dict.
    The library is linked once here; running and exporting both use these bytes."""
    import tvm

    t0 = time.perf_counter()
    mod = to_relax(graph)
    try:
        with tvm.target.Target(target):
            mod = schedule_module(mod, target)
            ex = tvm.compile(mod, target=tvm.target.Target(target))
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CompileError(f"TVM failed to build for {target.get('kind')} "
                           f"{target.get('mtriple', '')}: {msg[-1] if msg else type(e).__name__}") from None
    with tempfile.TemporaryDirectory() as d, quiet_tvm():
        lib = Path(d) / "lib.so"
        ex.export_library(str(lib))
        data = lib.read_bytes()
    return data, time.perf_counter() - t0
