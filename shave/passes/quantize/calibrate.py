"""Calibration: activation ranges from running the float graph (as torch) on user data.

Methods choose the clipping range [lo, hi] of each activation (always containing 0):
  "minmax"      the observed minimum and maximum;
  "percentile"  the p-th and (100-p)-th percentiles (p=99.99 by default);
  "mse"         the range, shrunk from min-max (60 factors from 1 down to 0.02), that minimises the mean squared
                quantization error on the observed values.
A value is sampled (at most SAMPLES per batch, seeded) for the percentile and MSE methods;
the minimum and maximum are taken over every element.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from ...reference.interpreter import forward_with_values
from ...errors import PassError
from ...ir import Graph

METHODS = ("minmax", "percentile", "mse")
SAMPLES = 1 << 16


class Observer:
    """Running min/max and a sample of one activation."""

    def __init__(self, seed: int):
        self.lo, self.hi = np.inf, -np.inf
        self.samples: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)

    def add(self, t: torch.Tensor) -> None:
        a = t.detach().reshape(-1).numpy()
        self.lo, self.hi = min(self.lo, float(a.min())), max(self.hi, float(a.max()))
        if a.size > SAMPLES:
            a = a[self.rng.choice(a.size, SAMPLES, replace=False)]
        self.samples.append(a.astype(np.float32))

    def range(self, method: str, percentile: float) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if method == "minmax":
            return lo, hi
        x = np.concatenate(self.samples)
        if method == "percentile":
            plo, phi = np.percentile(x, [100.0 - percentile, percentile])
            return min(float(plo), 0.0) if self.lo < 0 else 0.0, max(float(phi), 0.0)
        best = None
        for f in np.geomspace(1.0, 0.02, 60):
            clo, chi = lo * f, hi * f
            scale, zp = qparams(clo, chi)
            q = np.clip(np.round(x / scale) + zp, 0, 255)
            err = float(np.mean(((q - zp) * scale - x) ** 2))
            if best is None or err < best[0]:
                best = (err, clo, chi)
        return best[1], best[2]


def qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of asymmetric uint8 covering [lo, hi] (which contains 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / 255.0))
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return scale, zp


def activation_ranges(graph: Graph, values, batches, method: str, percentile: float) -> dict[str, tuple]:
    """{value: (scale, zero_point)} of each named value of `graph` over the calibration batches."""
    if method not in METHODS:
        raise PassError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
    inputs = {name for name, _ in graph.inputs}
    obs = {v: Observer(seed=i) for i, v in enumerate(sorted(values))}
    with torch.no_grad():
        for batch in tqdm(batches, desc="calibrating", unit="batch", leave=False, disable=None):
            _, kept = forward_with_values(graph, batch, set(values))
            for v, o in obs.items():
                if v in inputs:
                    o.add(batch[[n for n, _ in graph.inputs].index(v)])
                else:
                    o.add(kept[v])
    return {v: qparams(*o.range(method, percentile)) for v, o in obs.items()}


WEIGHT_METHODS = ("max", "mse")


def weight_scales(w: np.ndarray, qmax: int, per_channel: bool, method: str = "max") -> np.ndarray:
    """Symmetric per-output-channel (or one per-tensor) scales for an int8 weight.

    "max": the channel's largest |w| maps to qmax. "mse": the clipping range, shrunk from that
    (40 factors from 1 down to 0.4), that minimises the channel's squared rounding + clipping error."""
    if method not in WEIGHT_METHODS:
        raise PassError(f"unknown weight method {method!r}; known: {', '.join(WEIGHT_METHODS)}")
    w2 = w.reshape(w.shape[0], -1).astype(np.float64)
    if not per_channel:
        w2 = w2.reshape(1, -1)
    amax = np.abs(w2).max(axis=1)
    if method == "mse":
        best_err, best_f = None, np.ones_like(amax)
        for f in np.linspace(1.0, 0.4, 40):
            s = np.where(amax > 0, amax * f / qmax, 1.0)[:, None]
            err = ((np.clip(np.round(w2 / s), -qmax, qmax) * s - w2) ** 2).sum(axis=1)
            if best_err is None:
                best_err = err
            else:
                better = err < best_err
                best_err, best_f = np.where(better, err, best_err), np.where(better, f, best_f)
        amax = amax * best_f
    if not per_channel:
        amax = np.full(w.shape[0], amax[0])
    scales = np.where(amax > 0, amax / qmax, 1.0)
    return scales.astype(np.float32)
