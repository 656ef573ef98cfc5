"""MAUVE (Pillutla et al., 2021): how close the distribution of generated texts P is to that of
real texts Q, seen through a featurizer (an embedding of each text), as one number in (0, 1].

    r = mauve(p_features, q_features)      # [n_p, D] and [n_q, D] arrays -> {"mauve": ..., "mauve_se": ...}

1. Features of both sets are scaled to unit length and reduced jointly by PCA to the fewest
   components that keep `variance` (90%) of their variance.
2. The joint set is quantized by k-means into k = max(2, round(min(n_p, n_q) / 10)) clusters
   (k-means++ starts from a seeded generator, the best of `restarts` runs: deterministic).
3. P and Q become histograms p, q over the k clusters.
4. The divergence curve: for mixtures R_l = l P + (1 - l) Q, l in (0, 1), the points
   (exp(-c KL(Q || R_l)), exp(-c KL(P || R_l))) with c = 5, closed by (1, 0) and (0, 1).
5. MAUVE = the area under that curve (trapezoids over x). P = Q gives 1; disjoint supports give
   c B(c + 1, c) = 1/252 for c = 5 (the curve x = (1 - l)^c, y = l^c).

The standard error is a bootstrap one: `boot` replicates resample P and Q (with replacement,
each within itself, the PCA and the clustering redone) and the SE is the standard deviation of
their MAUVEs: it counts the sampling noise of both sets and the quantization's. MAUVE depends
on the featurizer, k and n (it is biased down for small n), so every number names its featurizer
and is comparable only with numbers of the same featurizer and sizes.
"""

from __future__ import annotations

import math

import numpy as np

SCALE = 5.0  # c: the scaling constant of the divergence curve


def pca(x: np.ndarray, variance: float = 0.9) -> np.ndarray:
    """x [n, D] centred and projected on its top principal directions, as few as keep at least
    `variance` of the total variance: [n, d], d <= min(n, D)."""
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    power = s ** 2
    if power.sum() <= 0:  # every point the same: one coordinate, all zeros
        return np.zeros((len(x), 1))
    d = int(np.searchsorted(np.cumsum(power) / power.sum(), variance - 1e-12) + 1)
    return x @ vt[:d].T


def kmeans(x: np.ndarray, k: int, seed: int = 0, restarts: int = 5, iters: int = 300) -> np.ndarray:
    """Cluster labels [n] of the points x [n, d]: Lloyd's algorithm from k-means++ starts drawn
    with numpy's generator seeded `seed`, the run of least within-cluster squared distance of
    `restarts`. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = min(k, n)
    best, best_cost = None, math.inf
    for _ in range(restarts):
        centres = [x[rng.integers(n)]]
        for _ in range(k - 1):  # k-means++: the next centre with probability ~ squared distance
            d2 = ((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
            centres.append(x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)])
        centres = np.asarray(centres)
        labels = None
        for _ in range(iters):
            new = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            if labels is not None and (new == labels).all():
                break
            labels = new
            for j in range(k):
                if (labels == j).any():
                    centres[j] = x[labels == j].mean(0)
        cost = ((x - centres[labels]) ** 2).sum()
        if cost < best_cost - 1e-12:
            best, best_cost = labels, cost
    return best


def histograms(p_features: np.ndarray, q_features: np.ndarray, k: int | None = None, seed: int = 0,
               variance: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3: the cluster histograms p, q [k] (each sums to 1) of the two feature sets."""
    p_features, q_features = (np.asarray(f, dtype=np.float64) for f in (p_features, q_features))
    n_p = len(p_features)
    joint = np.concatenate([p_features, q_features])
    joint = joint / np.maximum(np.linalg.norm(joint, axis=1, keepdims=True), 1e-12)
    k = k or max(2, round(min(n_p, len(q_features)) / 10))
    labels = kmeans(pca(joint, variance), k, seed)
    p = np.bincount(labels[:n_p], minlength=k) / n_p
    q = np.bincount(labels[n_p:], minlength=k) / len(q_features)
    return p, q


def kl(a: np.ndarray, b: np.ndarray) -> float:
    """KL(a || b) in nats over histograms; inf where a > 0 = b."""
    s = a > 0
    if (b[s] <= 0).any():
        return math.inf
    return float((a[s] * np.log(a[s] / b[s])).sum())


def divergence_curve(p: np.ndarray, q: np.ndarray, points: int = 101, scale: float = SCALE) -> np.ndarray:
    """The curve's points [points + 2, 2] (x, y) = (exp(-c KL(q || r)), exp(-c KL(p || r))) for
    r = l p + (1 - l) q at `points` mixture weights l evenly spaced strictly inside (0, 1), with
    the end points (1, 0) and (0, 1)."""
    weights = np.linspace(0, 1, points + 2)[1:-1]
    xy = [(1.0, 0.0)]
    for w in weights:
        r = w * p + (1 - w) * q
        xy.append((math.exp(-scale * kl(q, r)), math.exp(-scale * kl(p, r))))
    xy.append((0.0, 1.0))
    return np.asarray(xy)


def area(curve: np.ndarray) -> float:
    """The area under the divergence curve (points [m, 2] in its order: x falling from 1 to 0,
    y rising from 0 to 1), by trapezoids; a vertical step adds nothing."""
    x, y = curve[:, 0], curve[:, 1]
    return float(((x[:-1] - x[1:]) * (y[1:] + y[:-1]) / 2).sum())


def mauve_of_histograms(p: np.ndarray, q: np.ndarray, points: int = 101, scale: float = SCALE) -> float:
    """Steps 4-5 for two histograms."""
    return area(divergence_curve(np.asarray(p, float), np.asarray(q, float), points, scale))


def mauve(p_features, q_features, seed: int = 0, boot: int = 50, k: int | None = None, variance: float = 0.9,
          points: int = 101, scale: float = SCALE) -> dict:
    """MAUVE of the feature sets p_features [n_p, D] (model samples) and q_features [n_q, D]
    (reference texts), and its bootstrap SE over `boot` replicates (nan for boot < 2):
    {"mauve", "mauve_se", "clusters", "boot"}."""
    p_features, q_features = (np.asarray(f, dtype=np.float64) for f in (p_features, q_features))
    if min(len(p_features), len(q_features)) < 2:
        raise ValueError("MAUVE needs at least 2 texts on each side")

    def value(pf, qf):
        return mauve_of_histograms(*histograms(pf, qf, k, seed, variance), points, scale)

    rng = np.random.default_rng(seed + 1)
    replicates = [value(p_features[rng.integers(len(p_features), size=len(p_features))],
                        q_features[rng.integers(len(q_features), size=len(q_features))]) for _ in range(boot)]
    return {"mauve": value(p_features, q_features),
            "mauve_se": float(np.std(replicates, ddof=1)) if boot > 1 else math.nan,
            "clusters": k or max(2, round(min(len(p_features), len(q_features)) / 10)), "boot": boot}
