"""Rank selection: a fixed rank or fraction, an energy threshold, a FLOP budget, or VBMF.

- fraction f in (0, 1]: ceil(f x full rank) (for cp the full rank is the rank
  at which it is exact by construction, min(N, C) kh kw, so useful fractions are small);
- energy e in (0, 1]: the smallest rank whose singular values keep a share e
  of the squared Frobenius norm (for tucker2, per mode);
- flop_budget b in (0, 1]: the largest rank whose factors cost at most b x the
  layer's multiply-accumulates (tucker2 scales both ranks together);
- "vbmf": empirical variational Bayesian matrix factorisation (Nakajima et al.
  2013), the rank estimate Kim et al. use for tucker2: singular values above
  the threshold implied by the estimated noise variance.

Computed ranks are then rounded to a multiple of the vector width (up,
except for a budget, which rounds down), never past the full rank. Grouped
layers get one rank per group, the largest any group asks for.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import PassError
from .methods import Layer, full_rank, macs, spectra


def _as_pair(rank):
    return rank if isinstance(rank, tuple) else (rank,)


def _from_pair(method: str, parts):
    return tuple(parts) if method == "tucker2" else parts[0]


def fraction_rank(method: str, layer: Layer, f: float):
    return _from_pair(method, [max(1, math.ceil(f * r - 1e-9)) for r in _as_pair(full_rank(method, layer))])


def energy_rank(method: str, layer: Layer, w, energy: float):
    parts = []
    for component in spectra(method, layer, w):
        need = 1
        for s, _ in component:
            share = np.cumsum(s ** 2) / max(float((s ** 2).sum()), 1e-300)
            need = max(need, int(np.searchsorted(share, energy - 1e-12) + 1))
        parts.append(need)
    return _from_pair(method, parts)


def vbmf_rank(method: str, layer: Layer, w):
    return _from_pair(method, [max(1, max(evbmf_rank(s, shape) for s, shape in component))
                               for component in spectra(method, layer, w)])


def budget_rank(method: str, layer: Layer, budget: float, lanes: int = 1):
    """The largest rank within `budget`, each part rounded down to a multiple of
    `lanes` where it is at least that large; None if not even rank 1 fits."""
    limit = budget * macs(None, layer)
    full = _as_pair(full_rank(method, layer))
    steps = max(full)

    def at(i):  # the i-th rank on a line from 0 to full
        return _from_pair(method, [min(f, max(1, int(i * f // steps))) for f in full])

    lo, hi = 0, steps  # largest i with macs(at(i)) <= limit, by bisection (cost grows with i)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if macs(method, layer, at(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0 or macs(method, layer, at(lo)) > limit:
        return None
    return _from_pair(method, [_round(p, lanes, down=True) if p >= lanes else p for p in _as_pair(at(lo))])


def _round(r: float, lanes: int, down: bool) -> int:
    if lanes <= 1:
        return int(math.floor(r + 1e-9)) if down else int(math.ceil(r - 1e-9))
    return (int(math.floor(r / lanes + 1e-9)) if down else int(math.ceil(r / lanes - 1e-9))) * lanes


def round_rank(method: str, layer: Layer, rank, lanes: int):
    """Round each part of `rank` up to a multiple of `lanes`, capped at the full rank."""
    full = _as_pair(full_rank(method, layer))
    return _from_pair(method, [min(f, max(1, _round(r, lanes, down=False))) for r, f in zip(_as_pair(rank), full)])


def check_rank(method: str, layer: Layer, rank, where: str):
    """An explicit rank, validated: one line naming the node when it is out of range."""
    full = _as_pair(full_rank(method, layer))
    parts = _as_pair(rank) if isinstance(rank, tuple) else (rank,) * len(full)
    if len(parts) != len(full) or not all(isinstance(p, (int, np.integer)) for p in parts):
        raise PassError(f"{method} takes {'a rank (R1, R2) or one int' if len(full) == 2 else 'an int rank'}, "
                        f"got {rank!r}")
    if not all(1 <= p <= f for p, f in zip(parts, full)):
        bounds = " x ".join(f"1..{f}" for f in full)
        raise PassError(f"rank {rank!r} is out of range for {where} ({layer.describe()}): {method} takes {bounds}")
    return _from_pair(method, [int(p) for p in parts])


# ------------------------------------------------------------------------------------------------- VBMF
def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def _evb_objective(sigma2: float, L: int, M: int, s: np.ndarray, xubar: float) -> float:
    alpha = L / M
    x = s ** 2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    t1 = _tau(z1, alpha)
    return float(np.sum(z2 - np.log(z2)) + np.sum(z1 - t1) + np.sum(np.log((t1 + 1) / z1))
                 + alpha * np.sum(np.log(t1 / alpha + 1)))


def evbmf_rank(s: np.ndarray, shape) -> int:
    """Rank that empirical VBMF keeps for a matrix of `shape` with singular values `s`
    (noise variance estimated by minimising the analytic free energy)."""
    L, M = sorted(int(d) for d in shape)
    s = np.sort(np.asarray(s, np.float64))[::-1][:L]
    s = s[s > 0]
    if len(s) < 2:
        return len(s)
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = min(int(math.ceil(L / (1 + alpha))) - 1, len(s)) - 1
    tail = s[min(eh_ub + 1, len(s) - 1):]
    upper = float(np.sum(s ** 2)) / (L * M)
    lower = max(float(tail[0] ** 2) / (M * xubar), float(np.mean(tail ** 2)) / M)
    if not lower < upper:
        return 0 if s[0] ** 2 <= M * upper * xubar else 1
    grid = np.geomspace(lower, upper, 200)
    best = int(np.argmin([_evb_objective(g, L, M, s, xubar) for g in grid]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    for _ in range(40):  # golden section around the best grid point
        c, d = b - (b - a) / 1.618034, a + (b - a) / 1.618034
        if _evb_objective(c, L, M, s, xubar) < _evb_objective(d, L, M, s, xubar):
            b = d
        else:
            a = c
    sigma2 = (a + b) / 2
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))
