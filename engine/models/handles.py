"""Handles: a model plus what the engine must know about it (DESIGN.md, core contracts)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from engine.data.base import ArrayDataset


@dataclass
class ClassifierHandle:
    """A classifier `x [B, *input_shape] -> logits [B, K]` in eval mode.

    differentiable: False when d logits / d x is zero or undefined (a tree ensemble compiled by hummingbird);
    methods that follow gradients refuse such a model (Method.needs_gradients).
    """

    module: nn.Module
    model_id: str
    input_shape: tuple[int, ...]
    class_names: list[str]
    value_range: tuple[float, float] = (0.0, 1.0)
    meta: dict = field(default_factory=dict)
    differentiable: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.module(x), dim=-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return torch.cat([self.module(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])


@dataclass
class GeneratorHandle:
    """A generative model: `decode(z, a=None) -> x`, optional `encode(x) -> (z, a)`.

    `attribute_names` is non-empty for attribute-informed models (latent z ⊕ a, AIP).
    """

    module: nn.Module
    model_id: str
    latent_dim: int
    attribute_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def has_encoder(self) -> bool:
        return hasattr(self.module, "encode")

    def decode(self, z: torch.Tensor, a: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.module.decode(z, a) if self.attribute_names else self.module.decode(z)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not self.has_encoder:
            raise ValueError(f"Generator {self.model_id!r} has no encoder; invert it by optimisation instead")
        out = self.module.encode(x)
        return out if isinstance(out, tuple) else (out, None)


    def joint(self) -> "GeneratorHandle":
        """This attribute-informed generator seen as a plain one whose latent is z ⊕ a [B, k + A].

        Methods that search an unstructured latent space (xGEM, CDeepEx) use it: encode gives z0 ⊕ a0,
        decode splits the vector again. A generator without attributes is returned as it is.
        """
        if not self.attribute_names:
            return self
        return GeneratorHandle(module=_JointLatent(self.module, self.latent_dim), model_id=f"{self.model_id}-joint",
                               latent_dim=self.latent_dim + len(self.attribute_names), meta=dict(self.meta))


class _JointLatent(nn.Module):
    """decode(z ⊕ a) and encode(x) -> z ⊕ a over an attribute-informed module."""

    def __init__(self, inner: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.inner, self.k = inner, latent_dim

    def decode(self, za: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(za[:, :self.k], za[:, self.k:])

    def forward(self, za: torch.Tensor) -> torch.Tensor:
        return self.decode(za)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z, a = self.inner.encode(x)
        return torch.cat([z, a], dim=1)


@dataclass
class ModelBundle:
    """What a method may use for one audited model; everything but the classifier is optional.

    reference: training samples (for GC's per-class logit statistics, Eq. 7), or only the data's description
    (0 rows) when `reference_logits` [N, K] holds the classifier's logits of the samples already (a model host's).
    explainer: Progressive Exaggeration's I_f trained for this classifier (engine.models.explainer.Explainer).
    schema: the tabular feature schema of the inputs (engine.data.schema.TabularSchema); defaults to the
    reference data's. Input-space methods then keep immutables, move monotone features one way only and
    project every counterfactual onto a valid record before judging it.
    """

    classifier: ClassifierHandle
    generator: Optional[GeneratorHandle] = None
    oracle: Optional[ClassifierHandle] = None
    reference: Optional[ArrayDataset] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    explainer: Optional[nn.Module] = None
    schema: Optional[Any] = None
    reference_logits: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.schema is None and self.reference is not None:
            self.schema = self.reference.schema
