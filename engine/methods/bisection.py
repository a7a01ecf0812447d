"""Per-query bisection on a loss weight λ, batched: every query keeps its own bracket [lo, hi] as tensors.

The search looks for the smallest λ at which the inner problem still reaches its goal ("valid"): the
smaller the weight of the classification term, the smaller the change (Liu et al. Eq. 2, §3.2; the same
outer loop as Carlini & Wagner's binary search over c). A valid round lowers hi, an invalid one raises lo.
Until both ends are known λ moves by a constant factor (down from a valid λ, up from an invalid one);
afterwards it is the midpoint of the bracket in log λ, since λ is a scale (weights from 1e-2 to 1e4 are
all plausible). λ stays in [lam_min, lam_max]; a query valid at lam_min or invalid at lam_max is settled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LambdaBisection:
    """λ to try next and the bracket per query; all tensors [B] float64 (λ spans many decades)."""

    lam: torch.Tensor
    lo: torch.Tensor  # largest λ known to be invalid; 0: none yet
    hi: torch.Tensor  # smallest λ known to be valid; +inf: none yet
    factor: float
    lam_min: float
    lam_max: float

    @classmethod
    def start(cls, n: int, lam_init: float, *, factor: float, lam_min: float, lam_max: float,
              device: torch.device | str = "cpu") -> "LambdaBisection":
        lam = torch.full((n,), float(lam_init), dtype=torch.float64, device=device).clamp(lam_min, lam_max)
        return cls(lam, torch.zeros_like(lam), torch.full_like(lam, math.inf), float(factor), float(lam_min),
                   float(lam_max))

    def update(self, tried: torch.Tensor, valid: torch.Tensor) -> None:
        """Record the outcome of the round for the queries in the [B] bool mask `tried`; pick their next λ."""
        self.hi = torch.where(tried & valid, torch.minimum(self.hi, self.lam), self.hi)
        self.lo = torch.where(tried & ~valid, torch.maximum(self.lo, self.lam), self.lo)
        has_hi, has_lo = torch.isfinite(self.hi), self.lo > 0
        safe_hi = torch.where(has_hi, self.hi, self.lam)
        middle = torch.sqrt(self.lo.clamp_min(self.lam_min) * safe_hi)
        nxt = torch.where(has_hi & has_lo, middle, torch.where(has_hi, safe_hi / self.factor, self.lo * self.factor))
        self.lam = torch.where(tried, nxt.clamp(self.lam_min, self.lam_max), self.lam)

    @property
    def settled(self) -> torch.Tensor:
        """[B] bool: nothing left to learn, valid at lam_min or invalid at lam_max."""
        return (self.hi <= self.lam_min) | (self.lo >= self.lam_max)
