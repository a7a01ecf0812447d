"""Plausibility of a counterfactual as a sample of its target class: k-NN distance in a feature space.

A counterfactual labelled c_t is kept as a training sample only when it lies as close to real samples of
c_t as real samples of c_t lie to each other: its distance to the k-th nearest real c_t sample must not
exceed the `quantile` of the same leave-one-out distance among the real c_t samples. Input-space edits
that move the model's decision without making the input look like c_t stay far from c_t in the
features of a network trained on the domain, and are rejected. `score` is that distance divided by the
class's median real distance (1 = as typical as a typical real sample).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KnnPlausibility:
    features: list[torch.Tensor]   # per class c: [n_c, d] real reference features
    threshold: torch.Tensor        # [K] the quantile of real leave-one-out k-th-NN distances per class
    scale: torch.Tensor            # [K] the median of the same distances per class
    k: int
    quantile: float

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 5,
            quantile: float = 0.95) -> "KnnPlausibility":
        """features [N, d] of real samples with labels [N]; every class needs more than k samples."""
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"Expected `quantile` in (0, 1] but got {quantile}")
        per_class, threshold, scale = [], torch.full((num_classes,), float("nan")), torch.full((num_classes,), 1.0)
        features = features.double().flatten(1)
        for c in range(num_classes):
            f = features[labels == c]
            per_class.append(f)
            if len(f) <= k:
                continue  # too few real samples: counterfactuals towards c are never kept
            d = torch.cdist(f, f)
            d.fill_diagonal_(float("inf"))
            kth = d.kthvalue(k, dim=1).values
            threshold[c] = torch.quantile(kth, quantile)
            scale[c] = kth.median().clamp_min(1e-12)
        return cls(per_class, threshold, scale, k, quantile)

    def score(self, features: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, d], target [B] -> (score [B] float64, plausible [B] bool)."""
        features = features.double().flatten(1)
        kth = torch.full((len(features),), float("inf"), dtype=torch.float64)
        for c in target.unique().tolist():
            rows = (target == c).nonzero().squeeze(1)
            ref = self.features[c]
            if len(ref) >= self.k:
                kth[rows] = torch.cdist(features[rows], ref).kthvalue(self.k, dim=1).values
        score = kth / self.scale[target]
        plausible = torch.isfinite(kth) & (kth <= self.threshold[target])  # NaN threshold: never plausible
        return score, plausible
