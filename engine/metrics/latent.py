"""Latent-space metrics through one shared encoder: LPR (AIP Eq. 8) and latent-space closeness (PE Eq. 10).

Every method is measured with the same encoder E (the audit's generator, seen as one latent z ⊕ a), as
AIP §4.3.2 does "to make a fair comparison": z0 = E(x) and z* = E(x_cf), whatever space the method searched.

LPR tolerance: an encoder is continuous, so re-encoding a decoded image moves every coordinate a little.
A coordinate counts as perturbed when |z*_j - z0_j| > tolerance; the default 0.05 is 5% of the unit
prior scale of the project's VAE-style latents (set `metrics.lpr_tolerance` for other encoders).
"""
from __future__ import annotations

import torch

LPR_TOLERANCE = 0.05


def latent_change(z0: torch.Tensor, z_cf: torch.Tensor, tolerance: float = LPR_TOLERANCE) -> dict[str, torch.Tensor]:
    """z0, z_cf [B, k] -> {'z_l2': ||z* - z0||_2 [B], 'lpr': ||z* - z0||_0 / k [B]} (AIP Eq. 8)."""
    diff = (z_cf - z0).flatten(1)
    return {"z_l2": diff.norm(dim=1), "lpr": (diff.abs() > tolerance).float().mean(1)}


def latent_closeness(e_x: torch.Tensor, e_cf: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
    """PE Eq. 10 per query: is E(x_δ) nearer to E(x) than to every other query's explanation E(m)?

    e_x, e_cf: [B, k]; group: [B] ids (e.g. the target), explanations are compared within a group only,
    as the paper compares explanations generated with the same δ. Returns [B] float64: 1 closest, 0 not,
    NaN where Eq. 10 compares nothing: no other finite explanation in the group, or a non-finite encoding.
    """
    e_x, e_cf = e_x.flatten(1).double(), e_cf.flatten(1).double()
    if e_x.shape[0] == 0:  # no explanation at all: the min below would be over an empty set
        return e_x.new_empty(0)
    own = (e_x - e_cf).norm(dim=1)
    inf = float("inf")
    others = torch.cdist(e_cf, e_cf).nan_to_num(nan=inf, posinf=inf)  # [B, B] ||E(x_δ,b) - E(m_j)||
    others.fill_diagonal_(inf)
    if group is not None:
        others = others.masked_fill(group.view(-1, 1) != group.view(1, -1), inf)
    nearest = others.min(dim=1).values
    return (own < nearest).double().masked_fill(~own.isfinite() | nearest.isinf(), float("nan"))
