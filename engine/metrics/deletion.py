"""Saliency quality by deletion (Samek et al., as PE §4.3 uses it).

The most relevant pixels of a query (by the explanation's saliency) are replaced by uniform noise in
growing fractions 0, 1/S, ..., 1; the curve is the classifier's accuracy at each fraction, and a good
saliency map makes it fall fast (small area under the curve). Per query the curve holds 0/1 correctness,
so the group curve is their mean and merges exactly.

Relevance per pixel is the saliency summed over channels: the method's `explanation` map when it gives
one (PE's |x_δmax - x_δmin|, CDeepEx's difference), else |x_cf - x|.
"""
from __future__ import annotations

import math

import torch

from engine.models.handles import ClassifierHandle
from engine.seeding import per_query_normal


def per_query_uniform(seed: int, query_id: torch.Tensor, shape: tuple[int, ...], salt: str) -> torch.Tensor:
    """U(0, 1) draws [B, *shape], row b seeded from (seed, query_id[b], salt) like per_query_normal."""
    normal = per_query_normal(seed, query_id, shape, salt)
    return 0.5 * (1.0 + torch.erf(normal / math.sqrt(2.0)))


def relevance_order(relevance: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] (or [B, d]) saliency -> [B, P] pixel indices, most relevant first (stable ties)."""
    per_pixel = relevance.abs().sum(1) if relevance.dim() == 4 else relevance.abs()
    return torch.argsort(per_pixel.flatten(1), dim=1, descending=True, stable=True)


@torch.no_grad()
def deletion_curve(classifier: ClassifierHandle, x: torch.Tensor, relevance: torch.Tensor, label: torch.Tensor,
                   query_id: torch.Tensor, seed: int, steps: int = 10,
                   value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """[B, steps + 1] float 0/1: does f still predict `label` after deleting the top k/steps pixels?"""
    b = x.shape[0]
    image = x.dim() == 4
    pixels = x.shape[2] * x.shape[3] if image else x[0].numel()
    order = relevance_order(relevance.to(x.device))                                  # [B, P]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=x.device).expand(b, -1))
    lo, hi = value_range
    noise = (lo + (hi - lo) * per_query_uniform(seed, query_id.cpu(), tuple(x.shape[1:]), "deletion")).to(x)
    correct = []
    for k in range(steps + 1):
        cut = round(pixels * k / steps)
        deleted = (rank < cut)                                                       # [B, P]
        mask = deleted.view(b, 1, *x.shape[2:]) if image else deleted.view_as(x)
        perturbed = torch.where(mask, noise, x)
        correct.append((classifier.logits(perturbed).argmax(-1) == label).float())
    return torch.stack(correct, dim=1)


def curve_auc(curve: torch.Tensor) -> torch.Tensor:
    """Area under curves [..., S + 1] sampled evenly on [0, 1] (trapezoid rule)."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[-1] - 1), dim=-1)
