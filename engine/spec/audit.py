"""The audit job spec: fleet x dataset x queries x targets x methods -> output URI."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"  # model ids become directory names (model=<id>)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(Strict):
    name: str = Field(description="registered dataset name, e.g. shapes, digits, fashion_mnist, parquet_images")
    options: dict[str, Any] = Field(default_factory=dict, description="loader options (size, seed, path, ...)")


class TrainEntry(Strict):
    """A built-in model trained (or taken from the cache) on the spec's dataset."""

    arch: Literal["cnn", "mlp"] = "cnn"
    arch_options: dict[str, Any] = Field(default_factory=dict)
    dataset_options: dict[str, Any] = Field(default_factory=dict,
                                            description="overrides of dataset.options for training (e.g. bias)")
    epochs: Optional[int] = Field(default=None, gt=0, description="None: the training routine's default")
    batch_size: Optional[int] = Field(default=None, gt=0)
    lr: Optional[float] = Field(default=None, gt=0)
    seed: int = 0

    def train_kwargs(self) -> dict[str, Any]:
        given = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        return {k: v for k, v in given.items() if v is not None}


class FileSource(Strict):
    """Where a user's model file is and how to load it safely."""

    path: Optional[str] = None
    format: Literal["auto", "torchscript", "export", "state_dict", "pickle"] = "auto"
    factory: Optional[str] = Field(default=None, description="package.module:function building the module")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    allow_pickle: bool = False

    def _check_source(self, what: str, train: Any) -> None:
        if (train is None) == (self.path is None):
            raise ValueError(f"{what}: give exactly one of `train` (built-in) or `path` (your file)")
        if self.format == "state_dict" and not self.factory:
            raise ValueError(f"{what}: format state_dict needs `factory: package.module:function`")


class FleetModel(FileSource):
    """One audited classifier: built-in (`train`) or a user's file (`path`)."""

    id: str = Field(pattern=ID_PATTERN)
    train: Optional[TrainEntry] = None

    @model_validator(mode="after")
    def _one_source(self) -> "FleetModel":
        self._check_source(f"model {self.id!r}", self.train)
        return self


class AuxTrain(Strict):
    """A built-in generator or oracle trained (or cached) on the spec's dataset."""

    arch: Optional[str] = Field(default=None, description="zoo architecture; default: the kind's built-in one")
    arch_options: dict[str, Any] = Field(default_factory=dict)
    dataset_options: dict[str, Any] = Field(default_factory=dict)
    epochs: Optional[int] = Field(default=None, gt=0)
    batch_size: Optional[int] = Field(default=None, gt=0)
    lr: Optional[float] = Field(default=None, gt=0)
    train_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0

    def train_kwargs(self) -> dict[str, Any]:
        given = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}
        return {**{k: v for k, v in given.items() if v is not None}, **self.train_options}


class GeneratorEntry(FileSource):
    """The domain's generative model, shared by the fleet (methods that search a latent space need it)."""

    kind: Literal["vae", "dcgan", "attribute_autoencoder"]
    train: Optional[AuxTrain] = None
    latent_dim: Optional[int] = Field(default=None, gt=0, description="required for a file")
    attribute_names: list[str] = Field(default_factory=list, description="z ⊕ a models: names of a's entries")

    @model_validator(mode="after")
    def _one_source(self) -> "GeneratorEntry":
        self._check_source("generator", self.train)
        if self.path is not None and self.latent_dim is None:
            raise ValueError("generator: a generator file needs `latent_dim`")
        return self


class OracleEntry(FileSource):
    """An attribute classifier (x -> attribute logits) that reads what counterfactuals changed."""

    train: Optional[AuxTrain] = None
    attribute_names: list[str] = Field(default_factory=list, description="required for a file")

    @model_validator(mode="after")
    def _one_source(self) -> "OracleEntry":
        self._check_source("oracle", self.train)
        if self.path is not None and not self.attribute_names:
            raise ValueError("oracle: an oracle file needs `attribute_names`")
        return self


class QuerySpec(Strict):
    split: Literal["train", "test"] = "test"
    count: int = Field(default=200, gt=0)
    seed: int = 0
    classes: Optional[list[int]] = Field(default=None, description="sample only queries with these labels")


class MethodEntry(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RuntimeSpec(Strict):
    address: Optional[str] = Field(default=None, description="Ray cluster address; None starts a local Ray")
    batch_size: int = Field(default=64, gt=0, description="queries per work unit")
    num_actors: int = Field(default=2, gt=0)
    num_cpus_per_actor: float = Field(default=1, gt=0)
    num_gpus_per_actor: float = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    include_dashboard: bool = False
    cache_dir: Optional[str] = None


Target = Union[Literal["flip", "second", "all"], int]


class AuditSpec(Strict):
    name: str = Field(default="audit", pattern=ID_PATTERN)
    seed: int = 0
    output: str = Field(description="output URI: a local path, s3://bucket/prefix or memory://...")
    overwrite: bool = False
    dataset: DatasetRef
    fleet: list[FleetModel] = Field(min_length=1)
    generator: Optional[GeneratorEntry] = None
    oracle: Optional[OracleEntry] = None
    queries: QuerySpec = QuerySpec()
    targets: Target = "second"
    methods: list[MethodEntry] = Field(min_length=1)
    runtime: RuntimeSpec = RuntimeSpec()

    @field_validator("targets")
    @classmethod
    def _target(cls, value: Target) -> Target:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"an explicit target class must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _unique_and_known(self) -> "AuditSpec":
        from engine.methods import get_method_class, make_config, method_names

        ids = [m.id for m in self.fleet]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"fleet: model ids must be unique, repeated: {dup}")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: each method may appear once, got {names}")
        known = method_names()
        for i, entry in enumerate(self.methods):
            if entry.name not in known:
                raise ValueError(f"methods[{i}].name: unknown method {entry.name!r}; expected one of {known}")
            make_config(entry.name, entry.params)  # raises naming the bad parameter
            needs = get_method_class(entry.name).requires
            if self.generator is None and ("generator" in needs or "encoder" in needs):
                raise ValueError(f"methods[{i}]: {entry.name!r} needs a generative model; add a `generator` "
                                 "entry (kind vae, dcgan or attribute_autoencoder)")
            if "encoder" in needs and self.generator is not None and self.generator.kind == "dcgan":
                raise ValueError(f"methods[{i}]: {entry.name!r} needs a generator with an encoder; a dcgan has "
                                 "none (use vae or attribute_autoencoder)")
        return self

    def spec_hash(self) -> str:
        """Hash of everything that determines the results (not runtime placement)."""
        payload = self.model_dump(exclude={"runtime", "overwrite", "output"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
