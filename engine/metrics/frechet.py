"""Fréchet distance between feature sets as mergeable state (FID when the features are Inception's).

A `FrechetState` holds the sufficient statistics of a feature set, n, sum f and sum f fᵀ, in float64; states of
shards merge by addition, so a distributed job reduces them like counts. `frechet_distance` turns two states
into mean and unbiased covariance and hands them to pytorch-fid's `calculate_frechet_distance`:
    d² = |mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a S_b)^½).
A figure means nothing without the feature extractor and the sample counts behind it: `frechet_record`
returns all three together.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

Features = Union[np.ndarray, torch.Tensor]


def _as_float64(features: Features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    return np.asarray(features, dtype=np.float64)


@dataclass
class FrechetState:
    """Sufficient statistics of a feature set: n, total = Σ f [d], outer = Σ f fᵀ [d, d] (float64)."""

    n: int
    total: np.ndarray
    outer: np.ndarray

    def __post_init__(self) -> None:
        self.n = int(self.n)
        self.total = np.asarray(self.total, dtype=np.float64).reshape(-1)
        d = self.total.shape[0]
        self.outer = np.asarray(self.outer, dtype=np.float64).reshape(d, d)
        if self.n < 0:
            raise ValueError(f"Expected n >= 0 but got {self.n}")

    @property
    def dim(self) -> int:
        return int(self.total.shape[0])

    @classmethod
    def empty(cls, dim: int) -> "FrechetState":
        if int(dim) < 1:
            raise ValueError(f"Expected dim >= 1 but got {dim}")
        return cls(0, np.zeros(int(dim)), np.zeros((int(dim), int(dim))))

    @classmethod
    def of(cls, features: Features) -> "FrechetState":
        """The state of one feature set [N, d]."""
        f = _as_float64(features)
        if f.ndim != 2:
            raise ValueError(f"Expected features of shape [N, d] but got {f.shape}")
        return cls.empty(f.shape[1]).update(f)

    def update(self, features: Features) -> "FrechetState":
        """Accumulate features [N, d] (numpy or torch, any float dtype) in place; returns self."""
        f = _as_float64(features)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"Expected features of shape [N, {self.dim}] but got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError(f"Features contain {int((~np.isfinite(f)).sum())} non-finite values")
        self.n += f.shape[0]
        self.total += f.sum(axis=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: "FrechetState") -> "FrechetState":
        """A new state holding both sets (sums add)."""
        if other.dim != self.dim:
            raise ValueError(f"Cannot merge Fréchet states of dims {self.dim} and {other.dim}")
        return FrechetState(self.n + other.n, self.total + other.total, self.outer + other.outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [d], sigma [d, d]) with the unbiased covariance, as numpy.cov(features, rowvar=False)."""
        if self.n < 2:
            raise ValueError(f"A covariance needs at least 2 samples but this feature set has {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - np.outer(self.total, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2  # symmetric exactly, despite rounding

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a Parquet row: n, dim, total (list [d]), outer (row-major list [d*d])."""
        return {"n": self.n, "dim": self.dim, "total": self.total.tolist(), "outer": self.outer.reshape(-1).tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FrechetState":
        total = np.asarray(d["total"], dtype=np.float64).reshape(-1)
        if "dim" in d and int(d["dim"]) != total.shape[0]:
            raise ValueError(f"Fréchet state: dim {d['dim']} but total has {total.shape[0]} values")
        outer = np.asarray(d["outer"], dtype=np.float64)
        if outer.size != total.shape[0] ** 2:
            raise ValueError(f"Fréchet state: outer has {outer.size} values, expected {total.shape[0] ** 2}")
        return cls(int(d["n"]), total, outer)

    def to_arrays(self) -> tuple[int, np.ndarray, np.ndarray]:
        return self.n, self.total.copy(), self.outer.copy()

    @classmethod
    def from_arrays(cls, n: int, total: Features, outer: Features) -> "FrechetState":
        return cls(int(n), _as_float64(total), _as_float64(outer))


def frechet_distance(a: FrechetState, b: FrechetState) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (pytorch-fid's formula)."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy.linalg import LinAlgWarning

    if a.dim != b.dim:
        raise ValueError(f"Feature sets have different dims ({a.dim} and {b.dim}); use one feature extractor")
    for which, s in (("first", a), ("second", b)):
        if s.n < 2:
            raise ValueError(f"The Fréchet distance needs at least 2 samples per set but the {which} has {s.n}")
    mu1, sigma1 = a.mean_cov()
    mu2, sigma2 = b.mean_cov()
    with warnings.catch_warnings():
        # pytorch-fid passes scipy's deprecated `disp`, and handles a singular product itself (it adds eps
        # to the diagonals), so neither warning tells the user anything.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", LinAlgWarning)
        return float(calculate_frechet_distance(mu1, sigma1, mu2, sigma2))


def frechet_record(a: FrechetState, b: FrechetState, extractor: str) -> dict[str, Any]:
    """{'fid', 'extractor', 'n_a', 'n_b', 'dim'}: a figure with what produced it."""
    return {"fid": frechet_distance(a, b), "extractor": str(extractor), "n_a": a.n, "n_b": b.n, "dim": a.dim}
