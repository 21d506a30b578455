"""The numpy maths of each decomposition: weights in, factor weights out.

Every function takes a layer's weight (conv: N, C/g, kh, kw; linear: N, C),
factorises each group independently, and returns the factor weights in the
order the data flows through them, already shaped as the conv2d / linear
weights of the new layers (grouped convs keep their groups in every factor,
so a grouped layer stays grouped). Scales are split evenly between factors
(sqrt of the singular values) so no factor has a much larger dynamic range.

- svd (linear):   W = (U sqrt S)(sqrt S Vt)                         -> C->k, k->N
- weight_svd:     W as N x (C kh kw), same SVD                       -> kh x kw C->r, 1x1 r->N
- spatial:        W as (C kh) x (kw N) (Jaderberg et al., scheme 2)  -> kh x 1 C->K, 1 x kw K->N
- tucker2:        W = core x0 U_out x1 U_in (Kim et al.; HOSVD then HOOI)
                                                                     -> 1x1 C->R1, kh x kw R1->R2, 1x1 R2->N
- cp:             W = sum_k a_k o b_k o y_k o x_k (Lebedev et al.; CP-ALS)
                                                                     -> 1x1 C->K, kh x 1 dw, 1 x kw dw, 1x1 K->N
"""
from __future__ import annotations

import numpy as np


def _split_groups(w: np.ndarray, groups: int) -> list[np.ndarray]:
    return np.split(np.asarray(w, np.float64), groups, axis=0)


def _low_rank(m: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) with left @ right the best rank-k approximation of m; zero-padded when k > rank."""
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    k_svd = min(k, len(s))
    root = np.sqrt(s[:k_svd])
    left = np.zeros((m.shape[0], k))
    right = np.zeros((k, m.shape[1]))
    left[:, :k_svd] = u[:, :k_svd] * root
    right[:k_svd] = root[:, None] * vt[:k_svd]
    return left, right


def svd_linear(w: np.ndarray, k: int) -> list[np.ndarray]:
    """Linear N x C -> [first (k, C), second (N, k)]."""
    left, right = _low_rank(np.asarray(w, np.float64), k)
    return [right, left]


def weight_svd(w: np.ndarray, groups: int, r: int) -> list[np.ndarray]:
    """Conv (N, C/g, kh, kw) -> [kh x kw conv (g r, C/g, kh, kw), 1x1 conv (N, r, 1, 1)]."""
    firsts, seconds = [], []
    for wg in _split_groups(w, groups):
        n_g, c_g, kh, kw = wg.shape
        left, right = _low_rank(wg.reshape(n_g, -1), r)
        firsts.append(right.reshape(r, c_g, kh, kw))
        seconds.append(left.reshape(n_g, r, 1, 1))
    return [np.concatenate(firsts), np.concatenate(seconds)]


def spatial_matrix(wg: np.ndarray) -> np.ndarray:
    """One group's weight (N, C, kh, kw) as the (C kh) x (kw N) matrix whose rank is the separable rank."""
    n_g, c_g, kh, kw = wg.shape
    return wg.transpose(1, 2, 3, 0).reshape(c_g * kh, kw * n_g)


def spatial(w: np.ndarray, groups: int, k: int) -> list[np.ndarray]:
    """Conv (N, C/g, kh, kw) -> [kh x 1 conv (g K, C/g, kh, 1), 1 x kw conv (N, K, 1, kw)]."""
    verticals, horizontals = [], []
    for wg in _split_groups(w, groups):
        n_g, c_g, kh, kw = wg.shape
        left, right = _low_rank(spatial_matrix(wg), k)  # (C kh, K), (K, kw N)
        verticals.append(left.T.reshape(k, c_g, kh, 1))
        horizontals.append(right.reshape(k, kw, n_g).transpose(2, 0, 1)[:, :, None, :])
    return [np.concatenate(verticals), np.concatenate(horizontals)]


def mode_matrix(wg: np.ndarray, mode: int) -> np.ndarray:
    """Mode-`mode` unfolding of a 4-way tensor: (dim `mode`) x (product of the others)."""
    return np.moveaxis(wg, mode, 0).reshape(wg.shape[mode], -1)


def _leading(m: np.ndarray, k: int) -> np.ndarray:
    """k leading left singular vectors of m, as orthonormal columns (from the
    eigenvectors of m m^T: the small side, so HOOI's repeated solves stay cheap)."""
    vals, vecs = np.linalg.eigh(m @ m.T)
    order = np.argsort(vals)[::-1][:k]
    out = np.zeros((m.shape[0], k))
    out[:, :len(order)] = vecs[:, order]
    return out


def tucker2(w: np.ndarray, groups: int, r1: int, r2: int, iters: int = 10) -> list[np.ndarray]:
    """Conv (N, C/g, kh, kw) -> [1x1 (g R1, C/g), core (g R2, R1, kh, kw), 1x1 (N, R2)].

    HOSVD gives the starting factors; HOOI (alternating: each factor is the
    leading subspace of W projected on the other) then lowers the error at
    ranks below full. At full rank both factors are square orthogonal: exact."""
    ins, cores, outs = [], [], []
    for wg in _split_groups(w, groups):
        n_g, c_g = wg.shape[:2]
        u_out, u_in = _leading(mode_matrix(wg, 0), r2), _leading(mode_matrix(wg, 1), r1)
        if r1 < c_g or r2 < n_g:
            for _ in range(iters):
                u_in = _leading(mode_matrix(np.einsum("nchw,nr->rchw", wg, u_out, optimize=True), 1), r1)
                u_out = _leading(mode_matrix(np.einsum("nchw,cr->nrhw", wg, u_in, optimize=True), 0), r2)
        core = np.einsum("nchw,na,cb->abhw", wg, u_out, u_in, optimize=True)
        ins.append(u_in.T[:, :, None, None])
        cores.append(core)
        outs.append(u_out[:, :, None, None])
    return [np.concatenate(ins), np.concatenate(cores), np.concatenate(outs)]


def cp_exact_rank(n_g: int, c_g: int, kh: int, kw: int) -> int:
    """A rank at which a CP decomposition is exact by construction: one term per (channel, tap)."""
    return min(n_g, c_g) * kh * kw


def _cp_exact(wg: np.ndarray, k: int) -> list[np.ndarray]:
    """Exact CP factors [A (N,K), B (C,K), Y (kh,K), X (kw,K)] with K >= cp_exact_rank:
    for each tap (y, x), the slice W[:, :, y, x] written as a sum of min(N, C) outer products."""
    n_g, c_g, kh, kw = wg.shape
    a, b = np.zeros((n_g, k)), np.zeros((c_g, k))
    y, x = np.zeros((kh, k)), np.zeros((kw, k))
    j = 0
    for i in range(kh):
        for jj in range(kw):
            sl = wg[:, :, i, jj]
            for m in range(min(n_g, c_g)):
                if n_g <= c_g:
                    a[m, j], b[:, j] = 1.0, sl[m]
                else:
                    a[:, j], b[m, j] = sl[:, m], 1.0
                y[i, j], x[jj, j] = 1.0, 1.0
                j += 1
    return [a, b, y, x]


def _khatri_rao(mats: list[np.ndarray]) -> np.ndarray:
    """Column-wise Kronecker product, first matrix varying slowest (matches C-order unfolding)."""
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


_MODES = "nchw"


def _mttkrp(t: np.ndarray, factors: list[np.ndarray], mode: int) -> np.ndarray:
    """T's mode-`mode` unfolding times the Khatri-Rao product of the other factors,
    contracted one mode at a time (never forming the product itself)."""
    others = [m for m in range(4) if m != mode]
    spec = f"{_MODES}," + ",".join(f"{_MODES[m]}k" for m in others) + f"->{_MODES[mode]}k"
    return np.einsum(spec, t, *(factors[m] for m in others), optimize=True)


def cp_als(t: np.ndarray, k: int, iters: int = 200, tol: float = 1e-7, seed: int = 0) -> list[np.ndarray]:
    """Rank-k CP decomposition of a 4-way tensor by alternating least squares.

    Initialised from the leading singular vectors of each unfolding (random
    columns where k exceeds a dimension); a small ridge keeps each solve
    well-posed when columns become collinear. Returns [A, B, Y, X], one
    factor per mode, with the component scales carried by A."""
    rng = np.random.default_rng(seed)
    factors = []
    for mode in range(4):
        f = _leading(mode_matrix(t, mode), k)
        missing = np.flatnonzero(np.abs(f).sum(0) == 0)
        f[:, missing] = rng.standard_normal((t.shape[mode], len(missing)))
        factors.append(f)
    norm2 = float((t * t).sum())
    prev = np.inf
    for _ in range(iters):
        for mode in range(4):
            others = [factors[m] for m in range(4) if m != mode]
            gram = np.ones((k, k))
            for f in others:
                gram *= f.T @ f
            mttkrp = _mttkrp(t, factors, mode)
            ridge = 1e-10 * np.trace(gram) / k + 1e-300
            factors[mode] = np.linalg.solve(gram + ridge * np.eye(k), mttkrp.T).T
        # residual from the last solve's products: |T|^2 - 2<T, T^> + |T^|^2
        f = factors[3]
        fit = float((f * mttkrp).sum())
        model2 = float((gram * (f.T @ f)).sum())
        err = np.sqrt(max(norm2 - 2 * fit + model2, 0.0) / max(norm2, 1e-300))
        for mode in (1, 2, 3):  # modes 1..3 unit-norm, the scales in A
            scale = np.linalg.norm(factors[mode], axis=0)
            scale[scale == 0] = 1.0
            factors[mode] /= scale
            factors[0] *= scale
        if prev - err < tol:
            break
        prev = err
    return factors


def cp_tensor(factors: list[np.ndarray]) -> np.ndarray:
    a = factors[0]
    shape = tuple(f.shape[0] for f in factors)
    return (a @ _khatri_rao(factors[1:]).T).reshape(shape)


def cp(w: np.ndarray, groups: int, k: int, iters: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Conv (N, C/g, kh, kw) -> [1x1 (g K, C/g), kh x 1 depthwise (g K, 1, kh, 1),
    1 x kw depthwise (g K, 1, 1, kw), 1x1 (N, K)]."""
    ins, verts, hors, outs = [], [], [], []
    for wg in _split_groups(w, groups):
        n_g, c_g, kh, kw = wg.shape
        if k >= cp_exact_rank(n_g, c_g, kh, kw):
            a, b, y, x = _cp_exact(wg, k)
        else:
            a, b, y, x = cp_als(wg, k, iters=iters, seed=seed)
            # balance: every factor of a component gets the same norm
            norms = [np.linalg.norm(f, axis=0) for f in (a, b, y, x)]
            total = np.prod(norms, axis=0)
            each = total ** 0.25
            a, b, y, x = (f / np.where(nm == 0, 1.0, nm) * each for f, nm in zip((a, b, y, x), norms))
        ins.append(b.T[:, :, None, None])
        verts.append(y.T[:, None, :, None])
        hors.append(x.T[:, None, None, :])
        outs.append(a[:, :, None, None])
    return [np.concatenate(ins), np.concatenate(verts), np.concatenate(hors), np.concatenate(outs)]
