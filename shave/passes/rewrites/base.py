"""What the three block rewrites share: layer selection, the per-layer record, refit and error.

A rewrite replaces one conv2d node by a short chain of nodes (its "block")
whose last value stands for the conv's output. Each pass says whether it
applies to a layer (`why_not`), what the block costs (`macs_after`) and builds
it (`build`, returning a `Block`). This class runs them over the selected
layers, then, with calibration data, refits the block's last conv by least
squares to the original layer's output on that data (passes/refit.py,
asymmetric: the input comes from the rewritten network) and measures every
layer's output error on the data before and after the refit.

With a `target` (e.g. "x86"), every rewritten layer is also compiled alone,
before and after, and timed on that target by `timer` (a LayerTimer,
shave/timing.py; default: this machine); a layer whose block is not at least `min_speedup` times faster keeps
its conv, with the measured ratio as the reason. Fewer MACs in a block that
runs slower (a grouped conv narrower than a vector block, say) is not a win.

Errors per layer (RewritePlan):
- kernel_error: ||W - W_block|| / ||W|| for the dense kernel the initial block
  stands for (the weight energy the rewrite drops);
- output_error / refit_error: ||y_block - y|| / ||y|| of the layer's output on
  the calibration data, before / after the refit (only with data).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...reference.interpreter import forward_with_values
from ...ir import Graph, Node, get_op
from ..base import Pass
from ...timing import as_timer
from ..layers import Layer, cut_out, select_layers
from ..refit import refit_last_factor
from ..calibration import calibration_batches, check_batches


@dataclass
class Block:
    """What `build` made for one layer."""
    last: str  # the block's last conv (the one refitted)
    kernel_error: float
    out_index: tuple | None = None  # channel j of `last` is channel out_index[j] of the original conv (None: j)


@dataclass
class RewritePlan:
    """What a rewrite pass did with one layer."""
    name: str
    layer: str  # e.g. "conv2d 3x3 64->64"
    macs_before: int
    macs_after: int
    kept: bool
    reason: str = ""
    kernel_error: float | None = None
    output_error: float | None = None
    refit_error: float | None = None
    nodes: list = field(default_factory=list)  # the block's nodes
    seconds: tuple | None = None  # (conv alone, block alone) as compiled and timed on the target


def new_node(graph: Graph, base: str, op: str, inputs: list, attrs: dict, source: str, before: Node | None) -> Node:
    """A typed node named after `base`, inserted right before `before` (at the end for None)."""
    node = Node(graph.fresh_name(base), op, list(inputs), dict(attrs), None, source)
    node.type = get_op(op).infer([graph.type_of(v) for v in inputs], node.attrs)
    graph.nodes.insert(graph.nodes.index(before) if before is not None else len(graph.nodes), node)
    return node


class ConvRewrite(Pass):
    """Base of ShiftRewrite, GroupRewrite and DepthwiseSeparable (see base.py's docstring)."""

    def __init__(self, layers=None, exclude=(), data=None, target=None, min_speedup: float = 1.0, timer=None):
        if target is not None:
            from ...target import resolve_target

            target = resolve_target(target)
        self.target, self.min_speedup, self.timer = target, float(min_speedup), timer
        self.layers = None if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers))
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.batches = calibration_batches(data, f"{self.name} refit") if data is not None else None

    # what a subclass provides
    def why_not(self, graph: Graph, node: Node, layer: Layer) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def macs_after(self, layer: Layer) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, graph: Graph, node: Node, layer: Layer) -> Block:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ selection
    def _why_not(self, graph: Graph, node: Node) -> str | None:
        if node.op != "conv2d":
            return f"is {node.op}, not a conv2d"
        if not graph.is_param(node.inputs[1]):
            return "its weight is not a constant"
        return self.why_not(graph, node, Layer.of(graph, node))

    def selected(self, graph: Graph) -> list[tuple[Node, bool]]:
        """[(node, named exactly)] in graph order (with the ones it cannot rewrite: the plan says why);
        a name that does not apply is an error."""
        convs = [n for n in graph.nodes if n.op == "conv2d"]
        return select_layers(graph, convs, self.layers, self.exclude, pass_name=self.name, what="conv2d node",
                             why_not=lambda n: (w := self._why_not(graph, n)) and f"it {w}",
                             keep_inapplicable=True)

    # -------------------------------------------------------------------------------------- rewrite
    def run(self, graph: Graph) -> tuple[Graph, list[RewritePlan]]:
        slow, timed = {}, {}
        if self.target is not None:
            trial, plan = self._rewrite(graph.copy(), {}, {})
            slow, timed = self._too_slow(graph, trial, plan)
        return self._rewrite(graph, slow, timed, refit=True)

    def _too_slow(self, original: Graph, rewritten: Graph, plan: list[RewritePlan]) -> tuple[dict, dict]:
        """({layer: reason} for the rewritten layers whose block is not min_speedup x faster,
        {layer: (seconds before, after)} for the others)."""
        slow, timed = {}, {}
        for e in plan:
            if not e.kept:
                continue
            block = cut_out(rewritten, e.nodes)
            before, after = as_timer(self.timer).time([cut_out(original, [e.name]), block],
                                                      self.target)
            if before < self.min_speedup * after:
                slow[e.name] = (f"block measured {before / after:.2f}x the conv's speed on "
                                f"{self.target.get('kind')} (< {self.min_speedup:g}x)", (before, after))
            else:
                timed[e.name] = (before, after)
        return slow, timed

    def _rewrite(self, graph: Graph, slow: dict, timed: dict, refit: bool = False) -> tuple[Graph, list]:
        original = graph.copy()
        plan, blocks = [], []
        for node, named in self.selected(graph):
            why = self._why_not(graph, node)
            layer = Layer.of(graph, node) if node.op == "conv2d" else None
            before = layer.macs if layer else 0
            entry = RewritePlan(node.name, layer.describe() if layer else node.op, before, before, False)
            plan.append(entry)
            if why is None and self.macs_after(layer) >= before and not named:
                why = "would not need fewer operations"
            if why is None and node.name in slow:
                why, entry.seconds = slow[node.name]
            if why is not None:
                entry.reason = why
                continue
            names = {n.name for n in graph.nodes}
            block = self.build(graph, node, layer)
            entry.kept, entry.macs_after, entry.kernel_error = True, self.macs_after(layer), block.kernel_error
            entry.nodes = [n.name for n in graph.nodes if n.name not in names]
            entry.seconds = timed.get(node.name)
            blocks.append((entry, block))
        if refit and self.batches is not None and blocks:
            check_batches(original, self.batches, f"{self.name} refit")  # a clear error before any torch one
            self._errors(original, graph, blocks, "output_error")
            for entry, block in blocks:
                target = original
                if block.out_index is not None:  # the block's conv computes the original channels in this order
                    target = original.copy()
                    target.nodes.append(Node(f"{entry.name}.__target", "channel_permute", [entry.name],
                                             {"indices": tuple(block.out_index)}, original.node(entry.name).type))
                refit_last_factor(target, graph, target.nodes[-1].name if block.out_index is not None else entry.name,
                                  block.last, self.batches)
            self._errors(original, graph, blocks, "refit_error")
        return graph, plan

    def _errors(self, original: Graph, graph: Graph, blocks, attr: str) -> None:
        """Relative output error of every rewritten layer on the calibration data."""
        num = {e.name: 0.0 for e, _ in blocks}
        den = dict(num)
        with torch.no_grad():
            for batch in self.batches:
                ref = forward_with_values(original, batch, set(num))[1]
                got = forward_with_values(graph, batch, {b.last for _, b in blocks})[1]
                for e, b in blocks:
                    y = ref[e.name].double() if b.out_index is None else ref[e.name].double()[:, list(b.out_index)]
                    num[e.name] += float(((got[b.last].double() - y) ** 2).sum())
                    den[e.name] += float((y ** 2).sum())
        for e, _ in blocks:
            setattr(e, attr, float(np.sqrt(num[e.name] / max(den[e.name], 1e-300))))

    def summarize(self, plan: list[RewritePlan]) -> str:
        rows = [f"{'layer':24} {'shape':24} {'MMACs':>13} {'kernel':>7} {'output':>7} {'refit':>7}  result"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        for e in plan:
            mm = f"{e.macs_before / 1e6:.2f}->{e.macs_after / 1e6:.2f}"
            rows.append(f"{e.name:24} {e.layer:24} {mm:>13} {fmt(e.kernel_error):>7} {fmt(e.output_error):>7} "
                        f"{fmt(e.refit_error):>7}  {'rewritten' if e.kept else 'kept: ' + e.reason}")
        return "\n".join(rows)
