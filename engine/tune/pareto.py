"""Pareto fronts of sweep trials and the recommended setting (pure numpy, no Ray).

Values are an [n, m] array of n trials by m objectives, each with a mode, "max" or "min". A NaN value
(a metric with no data, e.g. a distance when no counterfactual was valid) counts as the worst possible.

Knee: the objectives of the front are min-max normalised to losses in [0, 1] (0: the front's best value
of that objective, 1: its worst; an objective constant on the front is 0 for every point). With two
objectives the front's two extremes are then (0, 1) and (1, 0), and the knee is the point farthest from
the line joining them, on the side of the ideal point (0, 0): the largest (1 - Σ loss) / √m. The same
formula, the distance below the hyperplane Σ loss = 1, defines it for m > 2 objectives. Ties go to the
earlier point.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def gains(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """[n, m] values -> [n, m] float64 where larger is better for every objective; NaN -> -inf."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != len(modes):
        raise ValueError(f"Expected values of shape [n, {len(modes)}] (one column per mode) but got {v.shape}")
    bad = [m for m in modes if m not in ("max", "min")]
    if bad:
        raise ValueError(f"Expected every mode to be 'max' or 'min' but got {bad}")
    sign = np.array([1.0 if m == "max" else -1.0 for m in modes])
    out = v * sign
    out[np.isnan(out)] = -np.inf
    return out


def pareto_mask(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """[n] bool: the trials no other trial dominates (at least as good on every objective, better on one).

    Equal points do not dominate each other: duplicates are all on the front.
    """
    g = gains(values, modes)
    n = g.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool)
    ge = (g[:, None, :] >= g[None, :, :]).all(-1)   # [i, j]: i at least as good as j everywhere
    gt = (g[:, None, :] > g[None, :, :]).any(-1)    # [i, j]: i better than j somewhere
    dominated = (ge & gt).any(0)                     # j dominated by some i
    return ~dominated


def knee_scores(values: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """[n] signed distance of each point below the hyperplane Σ normalised loss = 1 (see module doc).

    Normalisation is over the points given (call it with the front's points). -inf for a point with a
    NaN objective.
    """
    g = gains(values, modes)
    if g.shape[0] == 0:
        return np.zeros(0)
    finite = np.isfinite(g).all(1)
    if not finite.any():
        return np.full(g.shape[0], -np.inf)
    best, worst = g[finite].max(0), g[finite].min(0)
    span = best - worst
    loss = np.where(span > 0, (best - g) / np.where(span > 0, span, 1.0), 0.0)
    score = (1.0 - loss.sum(1)) / np.sqrt(g.shape[1])
    return np.where(finite, score, -np.inf)


def knee_index(values: np.ndarray, modes: Sequence[str]) -> Optional[int]:
    """Index (into `values`) of the knee of their Pareto front, or None when there are no points."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] == 0:
        return None
    front = np.flatnonzero(pareto_mask(v, modes))
    scores = knee_scores(v[front], modes)
    return int(front[int(np.argmax(scores))])  # argmax: the first of equal scores


def recommend(values: np.ndarray, modes: Sequence[str], validity: Optional[np.ndarray] = None,
              floor: Optional[float] = None) -> tuple[np.ndarray, Optional[int]]:
    """(front mask over all points, index of the recommended point or None).

    Without a floor the recommendation is the knee of the front. With one it is the knee of the front of
    the points whose validity >= floor (None when no point reaches it).
    """
    v = np.asarray(values, dtype=np.float64)
    front = pareto_mask(v, modes)
    if floor is None:
        return front, knee_index(v, modes)
    if validity is None:
        raise ValueError("Expected `validity` values with a validity floor but got None")
    ok = np.flatnonzero(np.nan_to_num(np.asarray(validity, dtype=np.float64), nan=-1.0) >= floor)
    if ok.size == 0:
        return front, None
    return front, int(ok[knee_index(v[ok], modes)])


def extremes(values: np.ndarray, modes: Sequence[str], front: np.ndarray) -> list[int]:
    """For each objective, the index of the front's best point on it (the front's ends), first on ties."""
    g = gains(values, modes)
    index = np.flatnonzero(front)
    if index.size == 0:
        return []
    return [int(index[int(np.argmax(g[index, j]))]) for j in range(g.shape[1])]
