"""Coherence / robustness (GC Eq. 11): how far apart the counterfactuals of two similar queries are.

robustness(X_o) = max over X_i in N(X_o) of ||X'_i - X'_o||_2 / ||X_i - X_o||_2, where N(X_o) are the
other queries within ε of X_o. The paper (tabular data) measures "within ε" as the number of features
differing by >= 0.001 (`norm="l0"`); for images, where every pixel differs, `norm="l2"` (or "l1") uses
that distance instead. `eps="auto"` takes the 10% quantile of the pairwise query distances, so every
batch has neighbours to compare. Neighbours are the other queries of the same work unit with the same
target, so the figure depends on the unit's size; `coherence_neighbours` records how many there were.
"""
from __future__ import annotations

import torch

from engine.metrics.distances import L0_THRESHOLD

AUTO_QUANTILE = 0.1


def pairwise_distance(x: torch.Tensor, norm: str) -> torch.Tensor:
    """[B, ...] -> [B, B] distances: 'l0' counts features differing by >= 0.001 (GC Eq. 9)."""
    flat = x.flatten(1).double()
    if norm == "l0":
        return (flat.unsqueeze(1) - flat.unsqueeze(0)).abs().ge(L0_THRESHOLD).sum(-1).double()
    if norm in ("l1", "l2"):
        return torch.cdist(flat, flat, p=1.0 if norm == "l1" else 2.0)
    raise ValueError(f"Unknown coherence norm {norm!r}; expected 'l0', 'l1' or 'l2'")


def coherence(x: torch.Tensor, x_cf: torch.Tensor, group: torch.Tensor | None = None, norm: str = "l2",
              eps: float | str = "auto", valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GC Eq. 11 per query -> (robustness [B] float, NaN without neighbours; neighbour count [B] int).

    group: [B] ids; only queries of the same group are neighbours. valid: [B] bool; only valid
    counterfactuals take part (an invalid one explains nothing).
    """
    n = x.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.int64)
    near = pairwise_distance(x, norm)
    allowed = ~torch.eye(n, dtype=torch.bool, device=x.device)
    if group is not None:
        allowed &= group.view(-1, 1) == group.view(1, -1)
    if valid is not None:
        allowed &= valid.view(-1, 1) & valid.view(1, -1)
    if eps == "auto":
        candidates = near[allowed]
        eps = float(torch.quantile(candidates, AUTO_QUANTILE)) if candidates.numel() else 0.0
    neighbours = allowed & (near <= float(eps)) & (near > 0)
    flat = x_cf.flatten(1).double()
    ratio = torch.cdist(flat, flat) / torch.cdist(x.flatten(1).double(), x.flatten(1).double()).clamp_min(1e-12)
    ratio = ratio.masked_fill(~neighbours, float("-inf")).max(dim=1).values
    count = neighbours.sum(1)
    return ratio.masked_fill(count == 0, float("nan")), count
