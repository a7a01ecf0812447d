"""Per-query proximity and sparsity in input space (GC Eq. 9 and 10)."""
from __future__ import annotations

import torch

L0_THRESHOLD = 1e-3  # GC Eq. 9: changes below this are generative noise, not edits


def input_distances(x: torch.Tensor, x_cf: torch.Tensor, threshold: float = L0_THRESHOLD) -> dict[str, torch.Tensor]:
    """x, x_cf: [B, *shape] -> {'l0': [B] int64, 'l1': [B], 'l2': [B]}."""
    diff = (x_cf - x).flatten(1)
    return {
        "l0": (diff.abs() >= threshold).sum(1),
        "l1": diff.abs().sum(1),
        "l2": diff.norm(dim=1),
    }
