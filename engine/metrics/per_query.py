"""Per-query metric columns of one work unit, computed where the tensors live (inside the model host).

Input-space distances (GC Eq. 9-10) are in engine.metrics.distances; this module adds what needs models:
the shared encoder (LPR, AIP Eq. 8; latent closeness, PE Eq. 10), the oracle (confounded, PE Table 3),
coherence (GC Eq. 11), compatibility of progressive series (PE Fig. 3), the deletion curve (PE §4.3) and
the feature vectors that Fréchet distances are computed from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from engine.metrics.coherence import coherence
from engine.metrics.compatibility import compatibility_rows
from engine.metrics.deletion import curve_auc, deletion_curve
from engine.metrics.latent import LPR_TOLERANCE, latent_change, latent_closeness
from engine.models.handles import ModelBundle
from engine.types import CFBatch, QueryBatch


@dataclass(frozen=True)
class MetricOptions:
    lpr_tolerance: float = LPR_TOLERANCE
    coherence_norm: str = "l2"
    coherence_eps: float | str = "auto"
    deletion_steps: int = 10
    confounders: tuple[str, ...] = ()
    # x [B, C, H, W] -> features [B, d] for Fréchet distances (engine.metrics.features), or None.
    extractor: Optional[Callable[[torch.Tensor], torch.Tensor]] = field(default=None, compare=False)

    @classmethod
    def from_spec(cls, metrics: Any, confounders: list[str], extractor=None) -> "MetricOptions":
        return cls(lpr_tolerance=metrics.lpr_tolerance, coherence_norm=metrics.coherence.norm,
                   coherence_eps=metrics.coherence.eps, deletion_steps=metrics.deletion_steps,
                   confounders=tuple(confounders), extractor=extractor)


FLOAT32_MAX = float(np.finfo(np.float32).max)  # the metric columns are float32 (engine.store.results)


def _nullable(values: torch.Tensor, keep: torch.Tensor) -> list:
    """A float column with None where `keep` is False or the value is not finite as a float32."""
    out = values.detach().double().cpu().numpy()
    ok = keep.cpu().numpy() & (np.abs(out) <= FLOAT32_MAX)
    return [float(v) if k else None for v, k in zip(out, ok)]


@torch.no_grad()
def per_query_columns(batch: QueryBatch, cf: CFBatch, bundle: ModelBundle, options: MetricOptions,
                      oracle_changed: Optional[list[list[str]]] = None) -> dict[str, Any]:
    """Result columns (lists/arrays of length B) for the metrics that apply to this unit.

    Total over any unit (no valid counterfactual, one, a single query, non-finite x_cf or latents): a row
    where a metric has no meaning (no valid counterfactual, nothing to compare with) gets None."""
    n = len(batch)
    valid = cf.success.to(batch.x.device).bool()
    x_cf = torch.nan_to_num(cf.x_cf.to(batch.x.device))
    out: dict[str, Any] = {}
    generator = bundle.generator
    if generator is not None and generator.has_encoder:
        encoder = generator.joint()
        z0, z_cf = encoder.encode(batch.x)[0], encoder.encode(x_cf)[0]
        change = latent_change(z0, z_cf, options.lpr_tolerance)
        every = torch.ones(n, dtype=torch.bool, device=valid.device)
        out["latent_l2"] = _nullable(change["z_l2"], every)
        out["lpr"] = _nullable(change["lpr"], every)
        closest = torch.full((n,), float("nan"), dtype=torch.float64, device=valid.device)
        closest[valid] = latent_closeness(z0[valid], z_cf[valid], batch.target[valid]).to(valid.device)
        out["latent_closest"] = [None if math.isnan(c) else bool(c) for c in closest.tolist()]
    if n > 1:
        robustness, neighbours = coherence(batch.x, x_cf, batch.target, options.coherence_norm,
                                           options.coherence_eps, valid)
        out["coherence"] = _nullable(robustness, valid)
        out["coherence_neighbours"] = neighbours.cpu().numpy().astype(np.int32)
    if oracle_changed is not None and options.confounders:
        wanted = set(options.confounders)
        out["confounded"] = [bool(wanted & set(names)) for names in oracle_changed]
    desired, achieved = cf.desired, cf.achieved
    if desired is not None and achieved is not None:
        desired, achieved = desired.float().cpu(), achieved.float().cpu()
        compat = compatibility_rows(desired, achieved)
        keep = desired.isfinite().all(-1) & achieved.isfinite().all(-1)  # a non-finite step ranks nothing
        out["desired"] = [list(map(float, row)) if k else None for row, k in zip(desired.numpy(), keep.tolist())]
        out["achieved"] = [list(map(float, row)) if k else None for row, k in zip(achieved.numpy(), keep.tolist())]
        out["compat_spearman"] = _nullable(compat["spearman"], keep)
        out["compat_mae"] = _nullable(compat["mae"], keep)
    if options.deletion_steps > 0 and batch.x.dim() == 4:
        relevance = cf.explanation if cf.explanation is not None else (x_cf - batch.x)
        pred = cf.p_orig.to(batch.x.device).argmax(-1)  # the method already ran f on x
        label = pred if batch.label is None else torch.where(batch.label >= 0, batch.label, pred)
        value_range = tuple(bundle.reference.value_range) if bundle.reference is not None else (0.0, 1.0)
        curve = deletion_curve(bundle.classifier, batch.x, torch.nan_to_num(relevance), label, batch.query_id,
                               batch.seed, options.deletion_steps, value_range)
        out["deletion"] = [list(map(float, row)) for row in curve.cpu().numpy()]
        out["deletion_auc"] = curve_auc(curve).cpu().numpy().astype(np.float32)
    if options.extractor is not None and batch.x.dim() == 4:
        features: list = [None] * n
        index = valid.nonzero().flatten()
        if index.numel():
            values = options.extractor(x_cf[index]).float().cpu().numpy()
            for i, row in zip(index.tolist(), values):
                features[i] = row if np.isfinite(row).all() else None  # one NaN would poison the group's FID
        out["fid_features"] = features
    return out
