"""ShareWeights: k-means weight sharing (Deep Compression), a size-only compression.

    ShareWeights(bits=None, clusters=None, layers=None, exclude=(), data=None, iters=30)

Each selected layer (conv2d, linear or conv_transpose2d with a constant weight; `layers` and
`exclude` take node names or fnmatch patterns) gets its own k-means codebook of
k = `clusters` (or 2**`bits`) float values: centroids start linearly spaced over
[min, max] of the layer's weights (the initialisation the paper found best),
then Lloyd iterations; every weight is replaced by its centroid. A layer with no
more distinct values than k keeps them exactly.

The pass's plan (a SharePlan; `summary()` of its PassResult) gives, per layer and in total, the
paper's compression rate

    r = n * b / (n * log2(k) + k * b)      n weights, b = 32 bits each,

that is the size of an index-per-weight + codebook encoding against float32,
the weights' relative error ||W - W_shared|| / ||W||, and the graph's output
error (largest |difference| / largest |output|) on `data` (an iterable of example
inputs), or on one seeded random normal input when no data is given.

What it does not do: the compiled artifact still stores float32 weights (int8
after Quantize) and the code runs at the same speed. Shared weights only make
the file compressible (few distinct values per layer; `total_zlib` measures
the weights' zlib size before and after); the rate above is what an index +
codebook storage would give.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..reference.interpreter import forward_with_values
from ..errors import PassError
from ..ir import Graph, get_op, weight_of
from .base import Pass, register_pass
from .calibration import calibration_batches
from .layers import select_layers, weighted_layers

BITS = 32


def compression_rate(n: int, k: int, b: int = BITS) -> float:
    """Deep Compression's rate: n weights of b bits -> n indices of log2(k) bits + a k-entry codebook."""
    return n * b / (n * math.log2(k) + k * b) if k > 1 else n * b / (k * b)


def kmeans_1d(w: np.ndarray, k: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(codebook, index per weight): k-means on the values of w, linear initialisation over
    [min, max]; exact (the distinct values) when w has at most k of them."""
    x = np.asarray(w, np.float64).reshape(-1)
    distinct = np.unique(x)
    if len(distinct) <= k:
        return distinct, np.searchsorted(distinct, x)
    c = np.linspace(x.min(), x.max(), k)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        counts = np.bincount(idx, minlength=k)
        sums = np.bincount(idx, weights=x, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)  # an empty cluster keeps its centroid
        new.sort()
        if np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    return c, np.searchsorted((c[1:] + c[:-1]) / 2, x)


@dataclass
class SharedLayer:
    name: str
    n: int  # weights
    k: int  # codebook entries
    rate: float  # Deep Compression's formula
    weight_error: float  # ||W - W_shared|| / ||W||


class SharePlan(list):
    """The SharedLayer entries of a run, with its totals."""
    total_rate: float | None = None  # Deep Compression's rate over the shared layers
    model_rate: float | None = None  # ... over the whole model (unshared parameters at 32 bits)
    total_zlib: tuple[int, int] | None = None  # zlib size of the shared layers' weights before, after
    output_error: float | None = None  # measured on `data` (or one random batch)


@register_pass("share_weights", contract="lossy")
class ShareWeights(Pass):
    def __init__(self, bits: int | None = None, clusters: int | None = None, layers=None, exclude=(), data=None,
                 iters: int = 30):
        if (bits is None) == (clusters is None):
            raise PassError("ShareWeights needs one of bits= or clusters=")
        k = clusters if clusters is not None else (2 ** bits if isinstance(bits, int) and bits >= 1 else None)
        if not isinstance(k, int) or isinstance(k, bool) or k < 2:
            raise PassError(f"ShareWeights needs at least 2 clusters (bits >= 1), got "
                            f"{'clusters' if clusters is not None else 'bits'}={clusters if clusters is not None else bits!r}")
        self.k, self.iters, self.data = k, iters, data
        self.patterns = None if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers))
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)

    def _selected(self, graph: Graph) -> list:
        chosen = select_layers(graph, weighted_layers(graph), self.patterns, self.exclude, pass_name="ShareWeights",
                               what="layer (conv2d, linear, conv_transpose2d) with a constant weight")
        return [n for n, _ in chosen]

    def run(self, graph: Graph) -> tuple[Graph, SharePlan]:
        original = graph.copy()
        plan = SharePlan()
        before = after = b""
        for n in self._selected(graph):
            w = np.asarray(graph.params[weight_of(n)], np.float32)
            codebook, idx = kmeans_1d(w, self.k, self.iters)
            shared = codebook[idx].astype(np.float32).reshape(w.shape)
            err = float(np.linalg.norm(shared - w) / max(np.linalg.norm(w), 1e-30))
            plan.append(SharedLayer(n.name, w.size, self.k, compression_rate(w.size, self.k), err))
            slot = get_op(n.op).weight
            n.inputs[slot] = graph.add_param(f"{n.name}.weight.shared", shared)
            before += w.tobytes()
            after += shared.tobytes()
        if plan:
            n_bits = sum(x.n * BITS for x in plan)
            coded = sum(x.n * math.log2(x.k) + x.k * BITS for x in plan)
            plan.total_rate = n_bits / coded
            used = {v for m in graph.nodes for v in m.inputs if graph.is_param(v)}
            other = sum(np.asarray(graph.params[v]).size * BITS for v in used
                        if not v.endswith(".weight.shared"))
            plan.model_rate = (n_bits + other) / (coded + other)
            plan.total_zlib = (len(zlib.compress(before, 6)), len(zlib.compress(after, 6)))
        plan.output_error = self._output_error(original, graph)
        return graph, plan

    def _output_error(self, original: Graph, shared: Graph) -> float:
        if self.data is not None:
            batches = calibration_batches(self.data, "ShareWeights evaluation", original)
        else:
            g = torch.Generator().manual_seed(0)
            batches = [tuple(torch.randn((1,) + tuple(t.shape[1:]), generator=g).to(getattr(torch, t.dtype))
                             for _, t in original.inputs)]
        err = 0.0
        with torch.no_grad():
            for b in batches:
                ref, _ = forward_with_values(original, b, ())
                out, _ = forward_with_values(shared, b, ())
                for o, r in zip(out, ref):
                    err = max(err, float((o - r).abs().max() / r.abs().max().clamp_min(1e-12)))
        return err

    def summarize(self, plan: SharePlan) -> str:
        rows = [f"{'layer':32} {'weights':>9} {'k':>5} {'rate':>7} {'weight err':>11}"]
        for x in plan:
            rows.append(f"{x.name:32} {x.n:9d} {x.k:5d} {x.rate:6.2f}x {x.weight_error:11.4f}")
        if plan:
            rows.append(f"total: {len(plan)} layers, {sum(x.n for x in plan)} weights, rate "
                        f"{plan.total_rate:.2f}x (whole model incl. unshared params {plan.model_rate:.2f}x); "
                        f"zlib size of these weights {plan.total_zlib[0]:,} -> {plan.total_zlib[1]:,} B; "
                        f"output error {plan.output_error:.4g}")
        rows.append("size only: the artifact keeps float weights; the code is no faster")
        return "\n".join(rows)
