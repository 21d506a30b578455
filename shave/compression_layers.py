"""The per-layer table of shave.compress: every way to compress one layer (or one channel group)
alone, with the time it saves measured on the target and the score it costs.

- "prune": each channel group of the graph (passes/prune/dependency.py) pruned to 75 % and 50 %
  of its units (l1, rounded to the target's channel multiple); the time saved is that of the
  conv/linear layers whose weights it shrinks, each compiled alone before and after (LayerTimer);
- "decompose": Tucker-2 at the rank Decompose(rank="auto") measures as fastest, per layer;
- "depthwise_separable", "shift_rewrite": the rewrite of each layer the pass measures faster.

The score each option costs (its "drop") is the model's score with that option alone applied
(with the pass's own refit, before any recovery). Options that are not faster when measured are
left out. `choose` takes options by most time saved per point of score lost, none in conflict
with another (one per layer or group; prunes of different groups combine).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import ShaveError
from .ir import Graph

log = logging.getLogger("shave.compress")

PRUNE_RATIOS = (0.25, 0.5)
WEIGHTED = ("conv2d", "linear")


@dataclass
class Option:
    """One way to compress one layer or channel group alone."""
    technique: str  # prune | decompose | depthwise_separable | shift_rewrite
    name: str  # the layer, or the channel group (prune)
    label: str  # what it does, in words
    layers: frozenset  # the layers it changes
    saving_ms: float  # the layers' kernel time it saves, measured compiled alone
    setting: object = None  # prune: units kept; decompose: the rank
    drop: float | None = None  # score lost with this option alone (no recovery)
    step: int | None = None  # the search step that applied it

    def conflicts(self, other: "Option") -> bool:
        """Whether the two cannot both be applied: the same layer or group, or a rewrite of a layer
        the other changes (prunes of different groups combine, even where they share a layer)."""
        if self.name == other.name:
            return True
        return not (self.technique == other.technique == "prune") and bool(self.layers & other.layers)

    def value(self, eps: float) -> float:
        """Time saved per point of score lost (a gain in score counts as a loss of `eps`)."""
        return self.saving_ms / max(self.drop if self.drop is not None else 0.0, eps)


def apply_options(graph: Graph, options: list[Option], target, calibration) -> tuple[Graph, list]:
    """`graph` with every option applied (prune first, then the per-layer rewrites) and the passes
    that did it, with nothing left to measure: replaying them rebuilds the same graph."""
    from .passes import Decompose, DepthwiseSeparable, Prune, ShiftRewrite

    passes = []
    keep = {o.name: o.setting for o in options if o.technique == "prune"}
    if keep:
        passes.append(Prune(keep=keep, target=target))
    passes += [Decompose("tucker2", rank=o.setting, layers=[o.name], target=target)
               for o in options if o.technique == "decompose"]
    for technique, cls in (("depthwise_separable", DepthwiseSeparable), ("shift_rewrite", ShiftRewrite)):
        names = [o.name for o in options if o.technique == technique]
        if names:
            passes.append(cls(layers=names, data=calibration))
    for p in passes:
        graph = p(graph)
    return graph, passes


def choose(options: list[Option], saving_ms: float, eps: float) -> list[Option]:
    """Options by most time saved per point lost, none conflicting with another, until together
    they save `saving_ms` (at least one option, where there is any)."""
    chosen = []
    for o in sorted(options, key=lambda o: -o.value(eps)):
        if any(o.conflicts(c) for c in chosen):
            continue
        chosen.append(o)
        if sum(c.saving_ms for c in chosen) >= saving_ms:
            break
    return chosen


def layer_options(graph: Graph, techniques, target, calibration, timer=None, stop=lambda: False) -> list[Option]:
    """Every option of `techniques` on `graph` that is measured faster (drops not yet scored), each
    timed with `timer` (a LayerTimer, e.g. shave.layer_timer(cache=..., rpc=...); None: here); a
    technique that does not apply to the graph adds none. `stop() -> True` ends the table early
    (the options measured so far are returned)."""
    from .passes import DepthwiseSeparable, ShiftRewrite

    makers = []
    if "prune" in techniques:
        makers.append(("prune", lambda: _prune_options(graph, target, timer, stop)))
    if "decompose" in techniques:
        makers.append(("decompose", lambda: _decompose_options(graph, target, timer)))
    if "rewrites" in techniques:
        for technique, cls, words in (("depthwise_separable", DepthwiseSeparable, "depthwise separable"),
                                      ("shift_rewrite", ShiftRewrite, "shift rewrite")):
            makers.append((technique, lambda t=technique, c=cls, w=words: _rewrite_options(graph, t, c, w, target,
                                                                                          calibration, timer)))
    out = []
    for technique, make in makers:
        if stop():
            break
        try:
            out += make()
        except ShaveError as e:
            log.info("no %s option: %s", technique, e)
    return out


def _rewrite_options(graph: Graph, technique: str, cls, words: str, target, calibration, timer) -> list[Option]:
    r = cls(data=calibration, target=target, exclude=(), timer=timer).apply(graph)
    return [Option(technique, e.name, f"{words} {e.name}", frozenset([e.name]), (e.seconds[0] - e.seconds[1]) * 1e3)
            for e in r.plan if e.kept and e.seconds and e.seconds[0] > e.seconds[1]]


def _decompose_options(graph: Graph, target, timer) -> list[Option]:
    from .passes import Decompose

    r = Decompose("tucker2", rank="auto", target=target, timer=timer).apply(graph)
    return [Option("decompose", lp.name, f"tucker2 {lp.name} at rank {lp.rank}", frozenset([lp.name]),
                   (lp.seconds[0] - lp.seconds[1]) * 1e3, tuple(lp.rank))
            for lp in r.plan if lp.kept and lp.seconds and lp.seconds[0] > lp.seconds[1]]


def _prune_options(graph: Graph, target, timer, stop) -> list[Option]:
    from .passes import Prune
    from .passes.layers import cut_out, weighted_layers
    from .passes.prune.dependency import analyse
    from .passes.prune.prune import _keep_count, _unit_width
    from .target import resolve_target
    from .timing import as_timer

    spec, timer = resolve_target(target), as_timer(timer)
    lanes = Prune(target=target).lanes()
    weighted = weighted_layers(graph, WEIGHTED)
    tries = []  # (group, units kept, pruned graph, layers whose weights shrank)
    for group in analyse(graph).groups:
        if stop():
            break
        if group.size < 2:
            continue
        for keep in sorted({_keep_count(group.size, _unit_width(group), r, lanes) for r in PRUNE_RATIOS}, reverse=True):
            if keep >= group.size:
                continue
            pruned = Prune(keep={group.name: keep}, target=target)(graph)
            changed = [n.name for n in weighted
                       if pruned.params[pruned.node(n.name).inputs[1]].shape != graph.params[n.inputs[1]].shape]
            if changed:
                tries.append((group, keep, pruned, changed))
    if not tries:
        return []
    before_names = sorted({name for *_, changed in tries for name in changed})
    before = dict(zip(before_names, timer.time([cut_out(graph, [n]) for n in before_names], spec)))
    afters = timer.time([cut_out(pruned, [n]) for _, _, pruned, changed in tries for n in changed], spec)
    out, i = [], 0
    for group, keep, _, changed in tries:
        saved = sum(before[n] - afters[i + k] for k, n in enumerate(changed)) * 1e3
        i += len(changed)
        if saved > 0:
            out.append(Option("prune", group.name, f"prune {group.name} to {keep}/{group.size}",
                              frozenset(changed), saved, keep))
    return out
