"""Decompose: low-rank and separable factorisation of conv2d and linear layers.

    Decompose(method="tucker2", rank=None, layers=None, exclude=(), energy=None, flop_budget=None,
              round_to="auto", data=None, target="x86", cache=None, min_speedup=1.1, timer=None)

Methods (methods.py, factorize.py): "svd" (linear), "weight_svd", "spatial",
"tucker2", "cp" (conv2d). The rank (ranks.py) is one of: an int (tucker2:
also (R1, R2)), a fraction of the full rank (float), energy=e, flop_budget=b,
rank="vbmf", or rank="auto": candidates from `energy` or `flop_budget` when
given, else from FLOP budgets 3/4, 1/2, 1/4; the largest candidate whose
compiled layer is measured at least `min_speedup` times faster than the
original on `target` is kept, and where none is, the layer stays as it was.
The layer alone and its factors alone are timed by `timer` (shave/timing.py:
a LayerTimer, e.g. `shave.layer_timer(rpc="host:9190/rpi4")` to time on the
device itself; default: this machine), cached by shape and target in memory
and, with `cache=` (a JSON file), across runs. A layer the decomposition would not make cheaper in FLOPs is
left alone too, unless `layers=` names it exactly.

`layers` takes node names or fnmatch patterns ("layer3.*"); a name (no
wildcard) must be a layer the method applies to. `data` (calibration inputs,
as for Prune) turns on the least-squares refit of the last factor of each
layer to the original layer's outputs (passes/refit.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import PassError
from ...isa import isa
from ...timing import LayerTimer, as_timer
from ...ir import Graph, get_op
from ..base import Pass, register_pass
from ..layers import cut_out, select_layers, weighted_layers
from ..calibration import calibration_batches, check_batches
from . import ranks
from .methods import METHODS, Layer, factor_shapes, factor_weights, macs, not_applicable
from ..refit import refit_last_factor
from .rewrite import replace_with_factors

AUTO_BUDGETS = (0.75, 0.5, 0.25)


@dataclass
class LayerPlan:
    """What Decompose did with one layer."""
    name: str
    layer: str  # e.g. "conv2d 3x3 64->64"
    rank: object  # None when no rank applied
    macs_before: int
    macs_after: int
    kept: bool
    reason: str = ""
    seconds: tuple | None = None  # (original, decomposed) measured by rank="auto"
    last: str = ""  # the last factor's node


@register_pass("decompose", contract="lossy")
class Decompose(Pass):
    def __init__(self, method: str = "tucker2", rank=None, layers=None, exclude=(), energy=None, flop_budget=None,
                 round_to="auto", data=None, target="x86", cache=None, min_speedup: float = 1.1,
                 cp_iters: int = 50, timer=None):
        if method not in METHODS:
            raise PassError(f"unknown decomposition method {method!r}; known: {', '.join(METHODS)}")
        named = [k for k, v in (("energy", energy), ("flop_budget", flop_budget)) if v is not None]
        if len(named) > 1 or (named and rank not in (None, "auto")):
            raise PassError(f"give one rank rule: rank, energy or flop_budget (rank='auto' may take one of the "
                            f"others), got rank={rank!r} and {', '.join(named)}")
        for key, val in (("energy", energy), ("flop_budget", flop_budget)):
            if val is not None and not 0.0 < val <= 1.0:
                raise PassError(f"Decompose {key} must be in (0, 1], got {val}")
        if isinstance(rank, float) and not 0.0 < rank <= 1.0:
            raise PassError(f"a fractional rank must be in (0, 1], got {rank}")
        if isinstance(rank, str) and rank not in ("auto", "vbmf"):
            raise PassError(f"rank must be an int, a fraction, 'vbmf' or 'auto', got {rank!r}")
        if rank == "vbmf" and method == "cp":
            raise PassError("rank='vbmf' needs singular values; cp has none: use rank= or flop_budget=")
        if energy is not None and method == "cp":
            raise PassError("energy= needs singular values; cp has none: use rank= or flop_budget=")
        if rank is None and not named:
            rank = 0.5
        self.method, self.rank, self.energy, self.flop_budget = method, rank, energy, flop_budget
        self.layers = None if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers))
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.target, self.round_to, self.min_speedup, self.cp_iters = target, round_to, min_speedup, cp_iters
        self._timer, self._cache = timer, cache
        self.batches = calibration_batches(data, "Decompose refit") if data is not None else None

    @property
    def timer(self) -> LayerTimer:
        """The LayerTimer of rank="auto" (made on first use)."""
        if not isinstance(self._timer, LayerTimer):
            self._timer = as_timer(self._timer, self._cache)
        return self._timer

    # --------------------------------------------------------------------------------- selection
    def _target(self) -> dict:
        from ...target import resolve_target

        return resolve_target(self.target)

    def _lanes(self) -> int:
        if self.round_to != "auto":
            return int(self.round_to or 1)
        return isa(self._target()).channel_multiple

    def selected(self, graph: Graph) -> list[tuple]:
        """[(node, named exactly)] in graph order."""
        def why_not(n):
            why = not_applicable(self.method, Layer.of(graph, n))
            return why and f"{self.method} does not apply to {Layer.of(graph, n).describe()}: {why}"

        # the factorisations work on the weight as a matrix (output channels, everything else)
        candidates = [n for n in weighted_layers(graph) if get_op(n.op).out_axis == 0]
        return select_layers(graph, candidates, self.layers, self.exclude, pass_name=f"Decompose({self.method})",
                             what="conv2d or linear node with a constant weight", why_not=why_not)

    def candidate_ranks(self, graph: Graph, node, layer: Layer) -> list:
        """Ranks to try for this layer, largest first (one, except for rank='auto' without a rule)."""
        w = graph.params[node.inputs[1]]
        lanes = self._lanes()
        rank = self.rank
        if isinstance(rank, bool):
            raise PassError(f"rank must be an int, a fraction, 'vbmf' or 'auto', got {rank!r}")
        if isinstance(rank, (int, np.integer, tuple)):
            return [ranks.check_rank(self.method, layer, rank, f"node {node.name!r}")]
        if isinstance(rank, float):
            return [ranks.round_rank(self.method, layer, ranks.fraction_rank(self.method, layer, rank), lanes)]
        if rank == "vbmf":
            return [ranks.round_rank(self.method, layer, ranks.vbmf_rank(self.method, layer, w), lanes)]
        if self.energy is not None:
            return [ranks.round_rank(self.method, layer, ranks.energy_rank(self.method, layer, w, self.energy),
                                     lanes)]
        budgets = [self.flop_budget] if self.flop_budget is not None else list(AUTO_BUDGETS)
        found = [ranks.budget_rank(self.method, layer, b, lanes) for b in budgets]
        return list(dict.fromkeys(r for r in found if r is not None))

    # ---------------------------------------------------------------------------------- rewrite
    def run(self, graph: Graph) -> tuple[Graph, list[LayerPlan]]:
        original = graph.copy() if self.batches is not None else None
        plan = [self._decompose(graph, node, named) for node, named in self.selected(graph)]
        if original is not None:
            for entry in plan:
                if entry.kept:
                    refit_last_factor(original, graph, entry.name, entry.last,
                                      check_batches(original, self.batches, "Decompose refit"))
        return graph, plan

    def _decompose(self, graph: Graph, node, named: bool) -> LayerPlan:
        layer = Layer.of(graph, node)
        before = macs(None, layer)
        entry = LayerPlan(node.name, layer.describe(), None, before, before, False)
        rank, reason = None, "no rank within the FLOP budget"
        for cand in self.candidate_ranks(graph, node, layer):
            after = macs(self.method, layer, cand)
            entry.rank, entry.macs_after = cand, after
            if after >= before and not named:
                rank, reason = None, "no fewer operations at this rank"
                continue
            if self.rank != "auto":
                rank = cand
                break
            entry.seconds = self.measure(graph, node, cand)
            if entry.seconds[0] >= self.min_speedup * entry.seconds[1]:
                rank = cand
                break
            reason = f"not faster when compiled ({entry.seconds[0] * 1e3:.3f} -> {entry.seconds[1] * 1e3:.3f} ms)"
        if rank is None:
            entry.macs_after, entry.reason = before, reason
            return entry
        weights = factor_weights(self.method, layer, graph.params[node.inputs[1]], rank, self.cp_iters)
        made = replace_with_factors(graph, node, self.method, layer, rank, weights)
        entry.kept, entry.last = True, made[-1].name
        return entry

    def measure(self, graph: Graph, node, rank, cached: bool = True) -> tuple:
        """(original, decomposed) seconds per call of `node` compiled alone and as its
        factors at `rank`; from the cache unless `cached` is False (then measured again)."""
        target, layer = self._target(), Layer.of(graph, node)
        single = cut_out(graph, [node.name])
        rng = np.random.default_rng(0)  # latency depends on shapes alone, not on the values
        weights = [rng.standard_normal(s).astype(np.float32) for s in factor_shapes(self.method, layer, rank)]
        factored = single.copy()
        replace_with_factors(factored, factored.node(node.name), self.method, layer, rank, weights)
        return tuple(self.timer.time([single, factored], target, cached))

    def summarize(self, plan: list[LayerPlan]) -> str:
        rows = [f"{'layer':28} {'shape':28} {'rank':>10} {'MMACs':>14}  result"]
        for e in plan:
            mm = f"{e.macs_before / 1e6:.2f}->{e.macs_after / 1e6:.2f}"
            t = f" ({e.seconds[0] * 1e3:.3f} -> {e.seconds[1] * 1e3:.3f} ms)" if e.seconds and e.kept else ""
            rows.append(f"{e.name:28} {e.layer:28} {str(e.rank):>10} {mm:>14}  "
                        f"{'decomposed' + t if e.kept else 'kept: ' + e.reason}")
        return "\n".join(rows)
