"""Prune: filter pruning with channel propagation to every consumer.

    Prune(ratio=0.5, criterion="l1", per_layer=True, exclude=(), round_to="auto", data=None, target=None,
          keep=None)

Channels are removed in units found by the dependency analysis, so a residual
stream, a concat, a depthwise conv or a channel shuffle is pruned consistently
in every tensor that carries it. Criteria score each unit:

- "l1", "l2": norm of its filters (Li et al., "Pruning Filters for Efficient ConvNets");
- "bn_gamma": |gamma| of the batch norms on its channels (Liu et al., network slimming);
  groups without a batch norm fall back to "l1";
- "taylor": first-order Taylor estimate of the loss change (Molchanov et al.), needs `data`;
- "reconstruction": ThiNet-style greedy selection that best preserves the next
  layer's output on `data`, then a least-squares refit of that layer; groups
  not read by exactly one dense conv/linear fall back to "l1".

`keep` ({group name: units kept}) prunes the groups it names to those widths and leaves
the others whole, instead of `ratio` (what shave.compress's per-layer search writes
into its recipe); a name that is no channel group of the graph is an error.

`data` is an iterable of calibration inputs (each a tensor/array or a tuple of them).

`steps` > 1 prunes iteratively (for high ratios): the one-shot plan fixes each
group's final width, and the widths shrink geometrically towards it in
`steps` prunes, each followed by `recover(graph) -> graph` (e.g. a short
`shave.finetune`), which also runs once after a one-step prune.

With per_layer=True each group loses `ratio` of its units; otherwise units
are ranked globally by their score divided by their group's mean score.
A group always keeps at least one unit, and with round_to the number of kept
channels is rounded up to a multiple of it where the group is at least that
wide. "auto" is the fp32 vector width of `target` (shave.isa: 8 on AVX2, 16 on
AVX-512, 4 on NEON); without `target=`, the target of the shave.compile running
the pass, else this machine.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np

from ...errors import PassError
from ...isa import isa, pass_target
from ...ir import Graph
from ..base import Pass, register_pass
from ..layers import matches
from .apply import remove_channels
from ..calibration import calibration_batches, check_batches
from .data_criteria import reconstruct, taylor_scores
from .dependency import ChannelGroup, analyse

CRITERIA = ("l1", "l2", "bn_gamma", "taylor", "reconstruction")


def _filter_norm(graph: Graph, group: ChannelGroup, produces: set, p: int) -> np.ndarray:
    scores = np.zeros(group.size)
    for k, unit in enumerate(group.units):
        for (value, axis), idx in unit.indices.items():
            if (value, axis) in produces:
                w = np.take(graph.params[value], idx, axis=axis).astype(np.float64)
                scores[k] += np.abs(w).sum() if p == 1 else np.sqrt((w * w).sum())
    return scores


def _bn_gamma(graph: Graph, group: ChannelGroup) -> np.ndarray | None:
    gammas = {n.inputs[3] for n in graph.nodes if n.op == "batch_norm"}
    scores, found = np.zeros(group.size), False
    for k, unit in enumerate(group.units):
        for (value, axis), idx in unit.indices.items():
            if value in gammas:
                scores[k] += np.abs(graph.params[value][idx]).sum()
                found = True
    return scores if found else None


def _keep_count(n_units: int, unit_width: int, ratio: float, round_to: int) -> int:
    keep = max(1, n_units - int(math.floor(ratio * n_units + 1e-9)))
    if unit_width == 1 and round_to > 1 and n_units >= round_to:
        keep = min(n_units, int(math.ceil(keep / round_to) * round_to))
    return keep


@register_pass("prune", contract="lossy")
class Prune(Pass):
    def __init__(self, ratio: float = 0.5, criterion: str = "l1", per_layer: bool = True, exclude=(),
                 round_to="auto", data=None, target=None, steps: int = 1, recover=None, keep=None):
        if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool) or not 0.0 <= ratio < 1.0:
            raise PassError(f"Prune ratio must be a number in [0, 1), got {ratio!r}")
        if criterion not in CRITERIA:
            raise PassError(f"unknown pruning criterion {criterion!r}; known: {', '.join(CRITERIA)}")
        self.ratio, self.criterion, self.per_layer = ratio, criterion, per_layer
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        if round_to != "auto" and not (round_to is None or (isinstance(round_to, numbers.Integral)
                                                             and not isinstance(round_to, bool))):
            raise PassError(f"Prune round_to must be 'auto', an int or None, got {round_to!r}")
        self.round_to, self.target = round_to, target
        self.batches = (calibration_batches(data, f"Prune(criterion={criterion!r}) calibration")
                        if criterion in ("taylor", "reconstruction") else None)
        if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
            raise PassError(f"Prune steps must be a positive int, got {steps!r}")
        if recover is not None and not callable(recover):
            raise PassError(f"Prune recover must be a callable Graph -> Graph, got {type(recover).__name__}")
        self.steps, self.recover = int(steps), recover
        if keep is not None and not (isinstance(keep, dict) and all(
                isinstance(k, str) and isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
                for k, v in keep.items())):
            raise PassError(f"Prune keep must be a dict {{channel group name: units kept >= 1}}, got {keep!r}")
        self.keep = None if keep is None else {k: int(v) for k, v in keep.items()}

    def lanes(self) -> int:
        """The multiple kept channel counts are rounded to."""
        if self.round_to == "auto":
            return isa(pass_target(self.target)).channel_multiple
        return int(self.round_to or 1)

    def scores(self, graph: Graph, group: ChannelGroup, produces: set) -> np.ndarray:
        """Data-free scores ("taylor" is scored in select; "reconstruction" ranks by l1 where it cannot apply)."""
        if self.criterion == "bn_gamma":
            s = _bn_gamma(graph, group)
            if s is not None:
                return s
        return _filter_norm(graph, group, produces, 2 if self.criterion == "l2" else 1)

    def required_ops(self) -> dict[str, str]:
        if self.criterion == "bn_gamma":
            return {"batch_norm": "criterion='bn_gamma' ranks channels by their batch norm's gamma, and fold_bn "
                                  "removes batch norms: run Prune before it"}
        return {}

    def summarize(self, plan: list) -> str:
        return "\n".join(f"{e.group}: {e.channels} -> {e.kept} channels" for e in plan)

    def _excluded(self, group: ChannelGroup) -> bool:
        return any(matches(part, self.exclude) for part in group.name.split("+"))

    def run(self, graph: Graph) -> tuple[Graph, list]:
        if self.steps == 1:
            doomed, plan = self._select(graph, self.keep)
            return self._recovered(remove_channels(graph, doomed), 1), plan
        # the one-shot plan fixes each group's final width; the steps shrink the widths
        # geometrically towards it, each step followed by `recover`
        _, final = self._select(graph.copy(), self.keep)
        lanes = self.lanes()
        for step in range(1, self.steps + 1):
            frac = step / self.steps
            targets = {p.group: p.kept if step == self.steps else
                       min(p.channels, _keep_count(p.channels, 1, 1 - (p.kept / p.channels) ** frac, lanes))
                       for p in final}
            doomed, _ = self._select(graph, targets)
            graph = self._recovered(remove_channels(graph, doomed), step)
        return graph, final

    def _recovered(self, graph: Graph, step: int) -> Graph:
        if self.recover is None:
            return graph
        out = self.recover(graph)
        if not isinstance(out, Graph):
            raise PassError(f"Prune recover returned a {type(out).__name__} after step {step}; it must return "
                            "the recovered Graph (e.g. lambda g: shave.finetune(g, data, ...))")
        return out

    def select(self, graph: Graph) -> list:
        """The units (from dependency.analyse) to remove from `graph`. With the
        reconstruction criterion this also refits the consumers' weights in `graph`."""
        return self._select(graph)[0]

    def _select(self, graph: Graph, targets: dict | None = None) -> tuple[list, list]:
        """(units to remove, the plan: a GroupPlan per channel group); `targets`: the kept units
        per group name instead of the ratio's (groups it does not name keep all)."""
        analysis = analyse(graph)
        groups = [g for g in analysis.groups if not self._excluded(g) and g.size > 1]
        if targets is not None:
            unknown = sorted(set(targets) - {g.name for g in analysis.groups})
            if unknown:
                raise PassError(f"Prune keep names {unknown[0]!r}, which is no channel group of this graph; "
                                f"groups: {', '.join(g.name for g in analysis.groups) or 'none'}")
            groups = [g for g in groups if g.name in targets]
        if self.criterion == "taylor":
            scores = taylor_scores(graph, groups, check_batches(graph, self.batches, "Prune calibration"))
        else:
            scores = [self.scores(graph, g, analysis.produces) for g in groups]
        if self.per_layer:
            ratios = [self.ratio] * len(groups)
        else:  # rank every unit by its score relative to its group's mean; drop the lowest
            ranked = sorted((s / max(sc.mean(), 1e-12), gi) for gi, sc in enumerate(scores) for s in sc)
            budget = int(math.floor(self.ratio * sum(g.size for g in groups)))
            dropped = [0] * len(groups)
            for _, gi in ranked:
                if budget <= 0:
                    break
                if groups[gi].size - dropped[gi] > 1:
                    dropped[gi] += 1
                    budget -= 1
            ratios = [d / g.size for d, g in zip(dropped, groups)]
        round_to = self.lanes()
        keeps = [_keep_count(g.size, _unit_width(g), r, round_to) for g, r in zip(groups, ratios)]
        if targets is not None:
            keeps = [max(1, min(g.size, targets.get(g.name, g.size))) for g in groups]
        chosen = {}
        if self.criterion == "reconstruction":
            chosen = reconstruct(graph, groups, analysis.reduces,
                                 check_batches(graph, self.batches, "Prune calibration"), keeps)
        doomed, plan = [], []
        for gi, (g, sc, keep) in enumerate(zip(groups, scores, keeps)):
            drop = chosen.get(gi, np.argsort(sc, kind="stable")[: g.size - keep])
            doomed += [g.units[i] for i in drop]
            plan.append(GroupPlan(g.name, g.size, keep))
        return doomed, plan


class GroupPlan(NamedTuple):
    """What Prune did to one channel group."""
    group: str
    channels: int  # units before
    kept: int


def _unit_width(group: ChannelGroup) -> int:
    return max(len(v) for v in group.units[0].indices.values())
