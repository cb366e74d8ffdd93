"""Small statistics of the experiments (pure numpy)."""

from __future__ import annotations

import numpy as np


def pairwise_sq_dists(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    d = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def median_bandwidth(z: np.ndarray) -> float:
    """The median heuristic: the median Euclidean distance between distinct points of ``z``."""
    d = pairwise_sq_dists(z, z)
    iu = np.triu_indices(len(z), k=1)
    med = float(np.median(np.sqrt(d[iu]))) if len(iu[0]) else 0.0
    return med if med > 0 else 1.0


def mmd_rbf(x: np.ndarray, y: np.ndarray, sigma: float | None = None) -> tuple[float, float]:
    """Unbiased squared MMD between samples ``x`` (m, d) and ``y`` (n, d) with the RBF kernel
    ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``; ``sigma`` defaults to the median heuristic over the
    pooled sample. Returns ``(mmd2, sigma)``. Needs m, n >= 2."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"MMD needs at least 2 points per sample, got {m} and {n}")
    if sigma is None:
        sigma = median_bandwidth(np.concatenate([x, y]))
    g = 1.0 / (2.0 * sigma * sigma)
    kxx = np.exp(-g * pairwise_sq_dists(x, x))
    kyy = np.exp(-g * pairwise_sq_dists(y, y))
    kxy = np.exp(-g * pairwise_sq_dists(x, y))
    mmd2 = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2.0 * kxy.mean())
    return float(mmd2), float(sigma)


def saturation(sizes: list[float], means: list[float], tol: float) -> float | None:
    """The smallest size whose mean is within ``tol`` of the largest size's mean (None: no data)."""
    if not sizes:
        return None
    order = np.argsort(sizes)
    s = np.asarray(sizes, float)[order]
    m = np.asarray(means, float)[order]
    ref = m[-1]
    for si, mi in zip(s, m):
        if mi >= ref - tol:
            return float(si)
    return float(s[-1])


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None], float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
