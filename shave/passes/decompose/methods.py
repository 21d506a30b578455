"""What each decomposition method needs to know about a layer: whether it
applies, its full rank, its cost at a rank, and the factor layers it becomes.

A rank is an int, except for tucker2 where it is (R1, R2): the input and
output ranks. Ranks are per group for grouped convs (each group is factorised
on its own and every factor keeps the groups).
"""
from __future__ import annotations

import numpy as np

from ...errors import PassError
from ..layers import Layer
from . import factorize as fz

METHODS = ("svd", "weight_svd", "spatial", "tucker2", "cp")


def not_applicable(method: str, layer: Layer) -> str | None:
    """Why `method` cannot decompose `layer`, or None when it can."""
    if method == "svd":
        return None if layer.op == "linear" else "svd factorises linear layers (use weight_svd for convs)"
    if layer.op != "conv2d":
        return f"{method} factorises conv2d layers (use svd for linear)"
    if method in ("spatial", "cp") and (layer.kh == 1 or layer.kw == 1):
        return f"{method} separates a kernel's rows from its columns, and this kernel is {layer.kh}x{layer.kw}"
    return None


def full_rank(method: str, layer: Layer):
    """The rank at which the decomposition is exact."""
    if method == "svd":
        return min(layer.n, layer.c)
    if method == "weight_svd":
        return min(layer.n_g, layer.c_g * layer.kh * layer.kw)
    if method == "spatial":
        return min(layer.c_g * layer.kh, layer.kw * layer.n_g)
    if method == "tucker2":
        return (layer.c_g, layer.n_g)
    return fz.cp_exact_rank(layer.n_g, layer.c_g, layer.kh, layer.kw)


def macs(method: str | None, layer: Layer, rank=None) -> int:
    """Multiply-accumulates of the layer (method None) or of its factors at `rank`."""
    if method is None:
        return layer.macs
    if layer.op == "linear":
        return layer.positions * rank * (layer.c + layer.n)
    b, g = layer.batch, layer.groups
    (hi, wi), (ho, wo) = layer.in_hw, layer.out_hw
    if method is None:
        return layer.macs
    if method == "weight_svd":
        return b * ho * wo * (g * rank * layer.c_g * layer.kh * layer.kw + layer.n * rank)
    if method == "spatial":  # the vertical factor does not stride or pad along the width
        return b * (ho * wi * g * rank * layer.c_g * layer.kh + ho * wo * layer.n * rank * layer.kw)
    if method == "tucker2":
        r1, r2 = rank
        return b * (hi * wi * g * r1 * layer.c_g + ho * wo * (g * r2 * r1 * layer.kh * layer.kw + layer.n * r2))
    if method == "cp":
        return b * (hi * wi * g * rank * layer.c_g + ho * wi * g * rank * layer.kh + ho * wo * g * rank * layer.kw
                    + ho * wo * layer.n * rank)
    raise PassError(f"unknown decomposition method {method!r}; known: {', '.join(METHODS)}")


def spectra(method: str, layer: Layer, w: np.ndarray) -> list[list[np.ndarray]]:
    """Singular values that rank selection (energy, VBMF) reads: one list per
    rank component (tucker2 has two: input then output mode), one array per group,
    with the shape of the matrix each came from as (values, (rows, cols))."""
    w = np.asarray(w, np.float64)
    if method == "svd":
        return [[(np.linalg.svd(w, compute_uv=False), w.shape)]]
    groups = np.split(w, layer.groups, axis=0)
    if method == "weight_svd":
        mats = [[wg.reshape(wg.shape[0], -1) for wg in groups]]
    elif method == "spatial":
        mats = [[fz.spatial_matrix(wg) for wg in groups]]
    elif method == "tucker2":
        mats = [[fz.mode_matrix(wg, 1) for wg in groups], [fz.mode_matrix(wg, 0) for wg in groups]]
    else:
        raise PassError("cp has no singular values to select a rank from: use rank= (int or fraction) "
                        "or flop_budget=")
    return [[(np.linalg.svd(m, compute_uv=False), m.shape) for m in ms] for ms in mats]


def factor_weights(method: str, layer: Layer, w: np.ndarray, rank, cp_iters: int = 50) -> list[np.ndarray]:
    if method == "svd":
        return fz.svd_linear(w, rank)
    if method == "weight_svd":
        return fz.weight_svd(w, layer.groups, rank)
    if method == "spatial":
        return fz.spatial(w, layer.groups, rank)
    if method == "tucker2":
        return fz.tucker2(w, layer.groups, *rank)
    return fz.cp(w, layer.groups, rank, iters=cp_iters)


def factor_shapes(method: str, layer: Layer, rank) -> list[tuple]:
    """The weight shape of each factor (what factor_weights returns), without computing it."""
    g, n, c_g, kh, kw = layer.groups, layer.n, layer.c_g, layer.kh, layer.kw
    if method == "svd":
        return [(rank, layer.c), (n, rank)]
    if method == "weight_svd":
        return [(g * rank, c_g, kh, kw), (n, rank, 1, 1)]
    if method == "spatial":
        return [(g * rank, c_g, kh, 1), (n, rank, 1, kw)]
    if method == "tucker2":
        r1, r2 = rank
        return [(g * r1, c_g, 1, 1), (g * r2, r1, kh, kw), (n, r2, 1, 1)]
    return [(g * rank, c_g, 1, 1), (g * rank, 1, kh, 1), (g * rank, 1, 1, kw), (n, rank, 1, 1)]


def factor_layers(method: str, layer: Layer, rank) -> list[tuple[str, dict]]:
    """(name suffix, conv2d attrs) of each factor, in data-flow order (attrs None for linear)."""
    if method == "svd":
        return [("v", None), ("u", None)]
    g = layer.groups
    full = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation, "groups": g}
    pointwise = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": g}
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    vertical = {"stride": (sh, 1), "padding": (ph, 0), "dilation": (dh, 1)}
    horizontal = {"stride": (1, sw), "padding": (0, pw), "dilation": (1, dw)}
    if method == "weight_svd":
        return [("v", full), ("u", pointwise)]
    if method == "spatial":
        return [("vertical", dict(vertical, groups=g)), ("horizontal", dict(horizontal, groups=g))]
    if method == "tucker2":
        return [("in", pointwise), ("core", full), ("out", pointwise)]
    return [("in", pointwise), ("vertical", dict(vertical, groups=g * rank)),
            ("horizontal", dict(horizontal, groups=g * rank)), ("out", pointwise)]
