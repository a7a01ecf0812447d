"""Core batch types shared by data, methods, metrics and the runtime.

Shapes: B queries, K classes, d = prod(input_shape), S steps in a progressive series.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch


@dataclass
class QueryBatch:
    """A batch of queries to explain, each with its own target class.

    x: [B, *input_shape] float32 in the data's value range.
    target: [B] int64, the class each counterfactual must reach.
    query_id: [B] int64, stable ids (index into the dataset split).
    label: [B] int64 ground-truth label, or -1 when unknown.
    seed: base seed; per-query randomness derives from (seed, query_id).
    """

    x: torch.Tensor
    target: torch.Tensor
    query_id: torch.Tensor
    label: Optional[torch.Tensor] = None
    attributes: Optional[torch.Tensor] = None  # [B, A] float in {0, 1}
    seed: int = 0

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        for name in ("target", "query_id", "label", "attributes"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"Expected `{name}` to have {n} rows like `x`, got {tuple(value.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> "QueryBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def select(self, index: torch.Tensor | slice) -> "QueryBatch":
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})


# Status values of a counterfactual; `reason` explains non-success in words.
STATUS_OK = "ok"            # reached the target (validity criterion of the method)
STATUS_BUDGET = "budget"    # iteration / feature budget spent without reaching the target
STATUS_NAN = "nan"          # the search produced non-finite values; isolated to this query
STATUS_ALREADY = "already"  # the query was already classified as the target


@dataclass
class CFBatch:
    """Counterfactuals for a QueryBatch, row-aligned with it.

    x_cf: [B, *input_shape]; p_orig, p_cf: [B, K] softmax probabilities;
    success: [B] bool; n_iter: [B] int64 optimisation steps used by each query;
    status: per-query status string (STATUS_*); reason: per query, why it is not "ok" in words ("" if ok).
    Optional: z0/z_cf [B, k] latents, a0/a_cf [B, A] attributes,
    path [B, S, *input_shape] progressive series, explanation [B, *input_shape] difference map,
    n_features [B] number of features the method chose to change (GC masking steps).
    The other optional fields are what one method or family reports beside the counterfactual; the method's
    class docstring says which it fills. None: the method does not report it.
    """

    x_cf: torch.Tensor
    success: torch.Tensor
    p_orig: torch.Tensor
    p_cf: torch.Tensor
    target: torch.Tensor
    n_iter: torch.Tensor
    status: list[str]
    z0: Optional[torch.Tensor] = None
    z_cf: Optional[torch.Tensor] = None
    a0: Optional[torch.Tensor] = None
    a_cf: Optional[torch.Tensor] = None
    path: Optional[torch.Tensor] = None
    explanation: Optional[torch.Tensor] = None
    n_features: Optional[torch.Tensor] = None
    reason: list[str] = field(default_factory=list)
    # Latent searches (CDeepEx, xGEM): the residual Δ = x − G(z0) [B, *input_shape] (CDeepEx Eq. 2).
    residual: Optional[torch.Tensor] = None
    # Attribute edits (AIP §4.6.1, GCI Fig. 6/8): Δ = a_cf − a0 [B, A] (or L′ − L0), its column names, and per
    # query the names of the most changed entries, largest |Δ| first.
    attribute_delta: Optional[torch.Tensor] = None
    attribute_names: Optional[list[str]] = None
    top_attributes: Optional[list[list[str]]] = None
    # Gradual construction: the mask M [B, *input_shape] bool of Eq. 1.
    mask: Optional[torch.Tensor] = None
    # Introspection: λ [B] of the round that gave x_cf (Eq. 2; NaN if no search ran); prototype [B] bool (c′ = c).
    lam: Optional[torch.Tensor] = None
    prototype: Optional[torch.Tensor] = None
    # Growing spheres: outer radius [B] of the last layer drawn (0 when none was).
    radius: Optional[torch.Tensor] = None
    # CDeepEx at x_cf (Eq. 2-4), [B] each: h = llh_true − llh_probe, the margin over every other class, the
    # constraint violation and the final penalty c.
    llh_gap: Optional[torch.Tensor] = None
    margin: Optional[torch.Tensor] = None
    violation: Optional[torch.Tensor] = None
    penalty: Optional[torch.Tensor] = None
    # Progressive exaggeration, [B, S] each: desired f(x) + δ, achieved f(x_δ), and the bins c_f(x, δ).
    desired: Optional[torch.Tensor] = None
    achieved: Optional[torch.Tensor] = None
    bins: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.x_cf.shape[0]

    def cpu(self) -> "CFBatch":
        return replace(self, **{f.name: getattr(self, f.name).detach().cpu() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})
