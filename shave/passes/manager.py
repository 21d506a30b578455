"""Run passes in order; verify the IR and check the numbers after each one."""
from __future__ import annotations

import time

from ..backends.torch import run_graph
from ..errors import IRError, PassError
from ..ir import Graph
from ..report import Report, op_changes, relative_error
from .base import get_pass, pass_list


def run_probes(graph: Graph, probes) -> list:
    """The graph's outputs on every probe (a list of input tuples), flattened into one list."""
    return [out for inputs in probes for out in run_graph(graph, inputs)]


def run_passes(graph: Graph, passes, probes, reference, report: Report | None = None) -> tuple[Graph, Report]:
    """Apply `passes` to `graph`. After each pass the new graph runs on `probes`
    (a list of input tuples, through the torch reference kernels) and its
    outputs are compared with `reference` (as `run_probes` returns them).
    An exact pass whose error exceeds its tolerance raises PassError naming it."""
    report = report if report is not None else Report()
    for spec in pass_list(passes):
        p = get_pass(spec)
        before = graph.op_counts()
        t0 = time.perf_counter()
        try:
            new = p(graph)
        except (PassError, IRError) as e:
            raise PassError(f"pass {p.name!r}: {e}") from None
        seconds = time.perf_counter() - t0
        err = relative_error(run_probes(new, probes), reference)
        stats = new.stats()
        report.add(stage=p.name, contract=p.contract, flops=stats["flops"], params=stats["params"],
                   bytes=stats["bytes"], nodes=stats["nodes"], error=err, seconds=seconds,
                   changes=op_changes(before, new.op_counts()))
        if p.contract == "exact" and not err <= p.tolerance:
            raise PassError(f"pass {p.name!r} is declared exact but changed the outputs by {err:.3g} "
                            f"(relative; tolerance {p.tolerance:g})")
        graph = new
    return graph, report
