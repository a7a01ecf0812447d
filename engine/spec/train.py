"""The train job spec: which built-in models to train (or fetch from the cache) on which data."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from engine.models.explainer_training import RUN_OPTIONS, make_explainer_config
from engine.spec.audit import ID_PATTERN, DatasetRef, Strict

# The built-in architecture each kind trains when a spec names none (zoo.ARCHITECTURES names).
DEFAULT_ARCH = {"classifier": "cnn", "vae": "conv_vae", "dcgan": "dcgan_generator",
                "attribute_autoencoder": "attribute_autoencoder", "oracle": "attribute_oracle"}


class TrainModel(Strict):
    id: str = Field(pattern=ID_PATTERN)
    kind: Literal["classifier", "vae", "dcgan", "attribute_autoencoder", "oracle", "exaggeration"]
    classifier: Optional[str] = Field(default=None, description="exaggeration: id of the classifier entry it explains")
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

    def train_kwargs_without(self, names: frozenset[str]) -> dict[str, Any]:
        return {k: v for k, v in self.train_kwargs().items() if k not in names}


class TrainSpec(Strict):
    name: str = Field(default="train", pattern=ID_PATTERN)
    dataset: DatasetRef
    models: list[TrainModel] = Field(min_length=1)
    cache_dir: Optional[str] = None

    @model_validator(mode="after")
    def _explainers(self) -> "TrainSpec":
        """An `exaggeration` entry names an earlier classifier entry; its train_options are ExplainerConfig
        fields plus the run options workers, use_gpu, checkpoint_uri and checkpoint_every."""
        seen: dict[str, str] = {}
        for i, m in enumerate(self.models):
            if m.kind == "exaggeration":
                if m.classifier is None or seen.get(m.classifier) != "classifier":
                    raise ValueError(f"models[{i}].classifier: an exaggeration entry must name an earlier "
                                     f"classifier entry, got {m.classifier!r}")
                if m.epochs is not None or m.arch is not None:
                    raise ValueError(f"models[{i}]: an exaggeration entry takes `steps` in train_options, not "
                                     "epochs or arch")
                make_explainer_config({**m.train_kwargs_without(RUN_OPTIONS)})
            elif m.classifier is not None:
                raise ValueError(f"models[{i}].classifier: only exaggeration entries name a classifier")
            seen[m.id] = m.kind
        return self
