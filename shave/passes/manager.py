"""Run passes in order; verify the IR and check the numbers after each one."""
from __future__ import annotations

import logging

from ..errors import IRError, PassError
from ..ir import Graph
from ..runtime.report import Report, op_changes
from .base import get_pass, pass_list
from .instruments import NumericCheck, current_instruments, run_probes  # noqa: F401  (run_probes: API)


log = logging.getLogger("shave.passes")


def run_passes(graph: Graph, passes, probes, reference, report: Report | None = None,
               graph_outputs=None) -> tuple[Graph, Report]:
    """Apply `passes` to `graph`. After each pass the new graph runs on `probes`
    (a list of input tuples, through the torch reference kernels) and its
    outputs are compared with `reference` (as `run_probes` returns them).
    An exact pass whose error exceeds its tolerance raises PassError naming it."""
    report = report if report is not None else Report()
    # the user's instruments (with instrumented(...)) too, but the numbers are checked against `reference`
    extra = [i for i in current_instruments() if not isinstance(i, NumericCheck)]
    check = NumericCheck(probes, reference)  # one for all passes: each pass's outputs are the next one's input
    if graph_outputs is not None:
        check.seed(graph, graph_outputs)
    for spec in pass_list(passes):
        p = get_pass(spec)
        before = graph.op_counts()
        try:
            result = p.apply(graph, [check] + extra)
        except (PassError, IRError) as e:
            msg = str(e)
            raise PassError(msg if msg.startswith(f"pass {p.name!r}") else f"pass {p.name!r}: {msg}") from None
        new = result.graph
        log.info("pass %s (%s): %.2f s, error %s, %s", p.name, p.contract, result.seconds,
                 "-" if result.error is None else f"{result.error:.3g}",
                 op_changes(before, new.op_counts()) or "no op changes")
        stats = new.stats()
        report.add(stage=p.name, contract=p.contract, flops=stats["flops"], params=stats["params"],
                   bytes=stats["bytes"], nodes=stats["nodes"], error=result.error,
                   seconds=result.seconds, changes=op_changes(before, new.op_counts()),
                   plan=result.records, summary=result.summary())
        graph = new
    return graph, report
