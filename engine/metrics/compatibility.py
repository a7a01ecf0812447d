"""Compatibility with the classifier (PE §4.1, Fig. 3): desired output f(x)+δ against achieved f(x_δ)."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """[B, S] -> [B, S] ranks 1..S along the last dim, ties sharing their average rank."""
    v = values.double()
    less = (v.unsqueeze(-1) > v.unsqueeze(-2)).sum(-1)      # how many values are below each
    equal = (v.unsqueeze(-1) == v.unsqueeze(-2)).sum(-1)    # including itself
    return less + (equal + 1) / 2.0


def spearman_rows(desired: torch.Tensor, achieved: torch.Tensor) -> torch.Tensor:
    """Per-row Spearman correlation of [B, S] pairs; NaN where a row is constant."""
    rd, ra = average_ranks(desired), average_ranks(achieved)
    rd, ra = rd - rd.mean(-1, keepdim=True), ra - ra.mean(-1, keepdim=True)
    return (rd * ra).sum(-1) / (rd.norm(dim=-1) * ra.norm(dim=-1))


def compatibility_rows(desired: torch.Tensor, achieved: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'spearman': [B], 'mae': [B]} between desired and achieved outputs at each step of each series."""
    return {"spearman": spearman_rows(desired, achieved), "mae": (desired - achieved).abs().mean(-1)}


def pooled_compatibility(desired: np.ndarray, achieved: np.ndarray) -> dict[str, float]:
    """Spearman correlation and MAE over every (desired, achieved) pair of a group, as Fig. 3 pools them."""
    desired, achieved = np.asarray(desired, float).ravel(), np.asarray(achieved, float).ravel()
    if desired.size < 2:
        return {"spearman": float("nan"), "mae": float(np.abs(desired - achieved).mean()) if desired.size else float("nan")}
    rho = spearmanr(desired, achieved).statistic
    return {"spearman": float(rho), "mae": float(np.abs(desired - achieved).mean())}
