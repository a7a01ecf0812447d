"""The in-memory dataset type every loader returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch


@dataclass
class ArrayDataset:
    """One split of a dataset held as tensors.

    x: [N, *input_shape] float32 in `value_range` (images [N, C, H, W], tabular [N, D]).
    y: [N] int64 labels in [0, len(class_names)).
    attributes: [N, A] float32 in {0, 1}, named by `attribute_names`, or None.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    kind: Literal["image", "tabular"]
    value_range: tuple[float, float] = (0.0, 1.0)
    attributes: Optional[torch.Tensor] = None
    attribute_names: list[str] = field(default_factory=list)
    feature_names: list[str] = field(default_factory=list)  # tabular only
    meta: dict = field(default_factory=dict)  # provenance: source path, seed, bias, ...
    schema: Optional[Any] = None  # tabular only: engine.data.schema.TabularSchema of the encoding, or None

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.name}: x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")
        if self.attributes is not None and self.attributes.shape != (self.x.shape[0], len(self.attribute_names)):
            raise ValueError(f"{self.name}: attributes shape {tuple(self.attributes.shape)} does not match "
                             f"{self.x.shape[0]} rows x {len(self.attribute_names)} attribute names")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        return ArrayDataset(
            name=self.name, x=self.x[index], y=self.y[index], class_names=self.class_names, kind=self.kind,
            value_range=self.value_range,
            attributes=None if self.attributes is None else self.attributes[index],
            attribute_names=self.attribute_names, feature_names=self.feature_names, meta=dict(self.meta),
            schema=self.schema)
