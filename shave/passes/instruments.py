"""Pass instruments: what runs around every pass, whether it is called through shave.compile or
on its own (`Prune(...)(graph)`), in the spirit of TVM's PassInstrument and torch.fx's pass
infrastructure.

* NumericCheck: runs the graph before and after the pass on probe inputs through the
  reference interpreter; an exact pass that changes the outputs beyond its tolerance (widened
  where a graph rounds floats to int8: runtime.report.INT8_BOUNDARY_TOLERANCE, and beyond that
  to the graph's own spread under last-digit changes, exact_check_tolerance) is a PassError,
  a lossy pass has its error measured (PassResult.error).
* IRDump: writes the graph after each pass to a folder (shave.ir.save_graph: one file
  holding graph.json and params.npz; shave.ir.load_graph reads it back).

A pass called on its own runs under `default_instruments()` (a NumericCheck on two seeded
random probes of the graph's input shapes); `shave.compile` runs its passes under a
NumericCheck on its own probes (the example inputs, and the model's outputs as reference).
`with instrumented(...)` sets the instruments for the passes called inside it.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np

from ..errors import PassError
from ..ir import Graph, save_graph
from ..reference import run_graph
from ..runtime.report import exact_tolerance, relative_error, rounds_floats_to_int8


class PassInstrument:
    def before(self, p, graph: Graph) -> None:
        """Runs before the pass, on its input graph."""

    def after(self, p, before: Graph, result) -> None:
        """Runs after the pass with its PassResult; may fill in fields or raise."""


def random_probes(graph: Graph, n: int = 2, seed: int = 0) -> list[tuple[np.ndarray, ...]]:
    """`n` seeded N(0, 1) inputs of the graph's input types (zeros for non-float inputs)."""
    rng = np.random.default_rng(seed)
    return [tuple(rng.standard_normal(t.shape).astype(t.dtype) if t.dtype.startswith("float")
                  else np.zeros(t.shape, t.dtype) for _, t in graph.inputs) for _ in range(n)]


def run_probes(graph: Graph, probes) -> list:
    """The graph's outputs on every probe (a list of input tuples), flattened into one list."""
    return [out for inputs in probes for out in run_graph(graph, inputs)]


# Two computations of the same float32 value (the backend's against the reference interpreter's:
# summation order, FMA contraction, exp) can differ in the last bits, and where a graph rounds float
# results to int8 codes a value on a rounding boundary then lands one code away. In a deep int8
# network on a probe unlike its calibration data a few such codes can move the outputs far beyond
# INT8_BOUNDARY_TOLERANCE: MobileNetV2 with its first depthwise conv left float moved by 6-7 % on a
# random probe, in the reference interpreter itself, when that conv's weights changed by 1e-7
# (docs/tvm-notes.md, int8). So such a check compares the error with the graph's own spread.
SPREAD_JITTER = 1e-6  # relative change of the float32 parameters and inputs (a few float32 ulps)
SPREAD_DRAWS = 3
MAX_ROUNDING_TOLERANCE = 0.5  # a disagreement beyond this is a bug whatever the graph's spread


def rounding_spread(graph: Graph, probes, draws: int = SPREAD_DRAWS, outputs=None) -> float:
    """How far `graph`'s own outputs on `probes` (`outputs`, where already computed) move
    (relative_error, the largest of `draws` seeded draws) when every float32 parameter and float32
    input changes by a relative SPREAD_JITTER: the disagreement last-bit differences alone can cause."""
    base = run_probes(graph, probes) if outputs is None else outputs
    worst = 0.0
    for seed in range(draws):
        rng = np.random.default_rng(seed)

        def jitter(a):
            a = np.asarray(a)
            if a.dtype != np.float32:
                return a
            return (a * (1 + SPREAD_JITTER * rng.standard_normal(a.shape))).astype(np.float32)

        g = graph.copy()
        g.params = {k: jitter(v) for k, v in g.params.items()}
        moved = run_probes(g, [tuple(jitter(x) for x in inputs) for inputs in probes])
        worst = max(worst, relative_error(moved, base))
    return worst


def exact_check_tolerance(graph: Graph, probes, tolerance: float, error: float,
                          outputs=None) -> tuple[float, float | None]:
    """(the bound an exact step with its own `tolerance` is held to on `graph`, given the `error` it
    made on `probes`; the graph's rounding spread, where it was measured). Where the graph rounds
    floats to int8 the bound is INT8_BOUNDARY_TOLERANCE, and where the error is beyond that, twice
    the graph's own spread (rounding_spread, from its `outputs` on the probes where the caller has
    them) up to MAX_ROUNDING_TOLERANCE: measured only then."""
    bound = exact_tolerance(graph, tolerance)
    if error <= bound or not rounds_floats_to_int8(graph):
        return bound, None
    spread = rounding_spread(graph, probes, outputs=outputs)
    return max(bound, min(2 * spread, MAX_ROUNDING_TOLERANCE)), spread


class NumericCheck(PassInstrument):
    """Run the graph before and after the pass on `probes` (random ones of the graph's shapes when
    None). An exact pass must keep the outputs it was given within its tolerance; the error
    reported (PassResult.error) is against `reference` (e.g. the model's own outputs, so the
    report shows how far every stage is from the model), the outputs before the pass when None."""

    def __init__(self, probes=None, reference=None):
        self.probes, self.reference = probes, reference
        self._last = None  # (graph, its outputs on the probes): a pass's output is the next one's input

    def seed(self, graph: Graph, outputs) -> "NumericCheck":
        """Outputs of `graph` on the probes, already computed (so the first pass does not rerun them)."""
        self._last = (graph, outputs)
        return self

    def before(self, p, graph):
        self._probes = self.probes if self.probes is not None else random_probes(graph)
        if self.probes is not None and self._last is not None and self._last[0] is graph:
            self._before = self._last[1]
        else:
            self._before = run_probes(graph, self._probes)

    def after(self, p, before, result):
        outs = run_probes(result.graph, self._probes)
        self._last = (result.graph, outs)
        changed = relative_error(outs, self._before)
        result.error = changed if self.reference is None else relative_error(outs, self.reference)
        if p.contract != "exact":
            return
        # a graph that rounds floats to int8 may land codes away (exact_check_tolerance)
        checks = [exact_check_tolerance(g, self._probes, p.tolerance, changed, outputs=o)
                  for g, o in ((before, self._before), (result.graph, outs))]
        tolerance, spread = max(checks, key=lambda c: c[0])
        if not changed <= tolerance:
            own = "" if spread is None else f"; the graph moves by {spread:.3g} under last-digit changes"
            raise PassError(f"pass {p.name!r} is declared exact but changed the outputs by {changed:.3g} "
                            f"(relative; tolerance {tolerance:g}{own})")


class IRDump(PassInstrument):
    """Save the graph after every pass as `<directory>/<index>-<pass>.ir` (shave.ir.save_graph)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.count = 0

    def after(self, p, before, result):
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count += 1
        save_graph(result.graph, self.directory / f"{self.count:02d}-{p.name}.ir")


_CURRENT: ContextVar = ContextVar("shave_pass_instruments", default=None)


def current_instruments() -> list[PassInstrument]:
    """The instruments of the innermost `instrumented(...)` ([] outside one)."""
    return list(_CURRENT.get() or [])


def default_instruments() -> list[PassInstrument]:
    """The instruments a pass runs under: those of the innermost `instrumented(...)`, else a
    NumericCheck on random probes."""
    current = _CURRENT.get()
    return list(current) if current is not None else [NumericCheck()]


@contextmanager
def instrumented(*instruments: PassInstrument):
    """Run the passes called inside under these instruments (none at all: `instrumented()`)."""
    for i in instruments:
        if not isinstance(i, PassInstrument):
            raise PassError(f"instruments must be PassInstrument objects, got {type(i).__name__}")
    token = _CURRENT.set(list(instruments))
    try:
        yield
    finally:
        _CURRENT.reset(token)
