"""Pure per-query loss terms shared by the input-space methods.

Every function maps batched tensors to a per-query vector `[B]`, so a summed loss gives each
query exactly the gradient it would get alone (classifiers are evaluated in eval mode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def l2_distance(x_new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖x′ − x‖₂ per query: [B, ...] -> [B] (GC Eq. 7, λ term)."""
    return torch.linalg.vector_norm((x_new - x).flatten(1), ord=2, dim=1)


def l1_distance(x_new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖x′ − x‖₁ per query: [B, ...] -> [B] (Wachter et al.'s distance)."""
    return (x_new - x).flatten(1).abs().sum(1)


def logit_matching(logits: torch.Tensor, mean_logits: torch.Tensor) -> torch.Tensor:
    """‖f′(X′) − (1/N) Σᵢ f′(X_{i,c_t})‖₂ over the K logits: [B, K], [B, K] -> [B] (GC Eq. 7).

    The printed Eq. 7 puts Σ_k inside the norm; read literally that is |Σ_k (f′_k − μ_k)|, which any
    shift of the logits along a zero-sum direction leaves at 0. The text ("force the logit space of
    X′ to belong to the space of training data", Fig. 3) means the norm of the K-vector, used here.
    """
    return torch.linalg.vector_norm(logits - mean_logits, ord=2, dim=1)


def total_variation(x: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """R_tv = Σ_{i,j} ((X_{i,j+1} − X_{i,j})² + (X_{i+1,j} − X_{i,j})²)^{β/2} per query (GC Eq. 8).

    x: [B, ..., H, W] (channels summed) -> [B]. This is Mahendran & Vedaldi's form that Eq. 8 cites;
    the printed inner exponent β is a typo there (β = 2 makes both readings agree).
    """
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    s = dx * dx + dy * dy
    # For β < 2 the power is not differentiable at 0; a floor keeps the gradient finite there.
    tv = s if beta == 2.0 else s.clamp_min(1e-12) ** (beta / 2.0)
    return tv.flatten(1).sum(1)


def target_gap(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z_t − max_{k≠t} z_k per query: [B, K], [B] -> [B]; > 0 iff the target is the unique argmax."""
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    others = logits.scatter(1, target[:, None], float("-inf"))
    return z_t - others.amax(1)


def cross_entropy_to_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """−log softmax(z)_t per query: [B, K], [B] -> [B]."""
    return F.cross_entropy(logits, target, reduction="none")


def hinge_to_target(logits: torch.Tensor, target: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """max(max_{k≠t} z_k − z_t + κ, 0) per query (the logit hinge of CEM / Carlini–Wagner)."""
    return (margin - target_gap(logits, target)).clamp_min(0.0)
