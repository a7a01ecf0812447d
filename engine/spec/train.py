"""The train job spec: which built-in models to train (or fetch from the cache) on which data."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from engine.spec.audit import ID_PATTERN, DatasetRef, Strict

# The built-in architecture each kind trains when a spec names none (zoo.ARCHITECTURES names).
DEFAULT_ARCH = {"classifier": "cnn", "vae": "conv_vae", "dcgan": "dcgan_generator",
                "attribute_autoencoder": "attribute_autoencoder", "oracle": "attribute_oracle"}


class TrainModel(Strict):
    id: str = Field(pattern=ID_PATTERN)
    kind: Literal["classifier", "vae", "dcgan", "attribute_autoencoder", "oracle"]
    arch: Optional[str] = Field(default=None, description="architecture; default: the kind's built-in one")
    arch_options: dict[str, Any] = Field(default_factory=dict)
    dataset_options: dict[str, Any] = Field(default_factory=dict, description="overrides of dataset.options")
    epochs: Optional[int] = Field(default=None, gt=0, description="None: the training routine's default")
    batch_size: Optional[int] = Field(default=None, gt=0)
    lr: Optional[float] = Field(default=None, gt=0)
    train_options: dict[str, Any] = Field(default_factory=dict, description="other training arguments")
    seed: int = 0

    def train_kwargs(self) -> dict[str, Any]:
        given = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        return {**{k: v for k, v in given.items() if v is not None}, **self.train_options}


class TrainSpec(Strict):
    name: str = Field(default="train", pattern=ID_PATTERN)
    dataset: DatasetRef
    models: list[TrainModel] = Field(min_length=1)
    cache_dir: Optional[str] = None
