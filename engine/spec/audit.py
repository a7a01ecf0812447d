"""The audit job spec: fleet x dataset x queries x targets x methods -> output URI."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from engine.methods import get_method_class, make_config, method_names
from engine.models.explainer_training import make_explainer_config

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"  # model ids become directory names (model=<id>)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(Strict):
    name: str = Field(description="registered dataset name, e.g. shapes, digits, fashion_mnist, parquet_images")
    options: dict[str, Any] = Field(default_factory=dict, description="loader options (size, seed, path, ...)")


class TrainEntry(Strict):
    """A built-in model trained (or taken from the cache) on the spec's dataset."""

    arch: Literal["cnn", "mlp", "text_cnn"] = "cnn"  # text_cnn: Kim's CNN over word vectors (dataset `text`)
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
    format: Literal["auto", "torchscript", "export", "state_dict", "pickle", "onnx", "sklearn"] = Field(
        default="auto", description="onnx: an ONNX graph (onnx2torch); sklearn: a scikit-learn, LightGBM or XGBoost "
        "classifier saved with skops (compiled by hummingbird; not differentiable)")
    factory: Optional[str] = Field(default=None, description="package.module:function building the module")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    trust: bool = Field(default=False, description="load TorchScript, torch.export (.pt2) or pickled files, which "
                        "can execute code from the file, and the types skops does not trust in a skops file; "
                        "`allow_pickle` is its deprecated alias")

    @model_validator(mode="before")
    @classmethod
    def _allow_pickle_alias(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "allow_pickle" not in data:
            return data
        data = dict(data)
        alias = data.pop("allow_pickle")
        if "trust" in data and data["trust"] != alias:
            raise ValueError(f"`trust` ({data['trust']}) and its deprecated alias `allow_pickle` ({alias}) "
                             f"disagree; give only `trust`")
        data["trust"] = alias
        return data

    def _check_source(self, what: str, train: Any) -> None:
        if (train is None) == (self.path is None):
            raise ValueError(f"{what}: give exactly one of `train` (built-in) or `path` (your file)")
        if self.format == "state_dict" and not self.factory:
            raise ValueError(f"{what}: format state_dict needs `factory: package.module:function`")


Size = Union[int, list[int]]  # one side for a square, or [H, W]
PerChannel = Union[float, list[float]]  # one value for every channel, or one per channel


class InputSpec(Strict):
    """What a model takes, when it is not the data as they are. The engine feeds [0, 1] data through
    scale -> size -> crop -> mean/std -> channels_last -> dtype before the model (engine.models.adapters), so
    methods search and measure distances in the data's space. Channel counts are checked against the data."""

    scale: float = Field(default=1.0, gt=0, description="multiply the data by it first: 255 for 0-255 pixels")
    size: Optional[Size] = Field(default=None, description="resize to it (bilinear, no antialias): int or [H, W]")
    crop: Optional[Size] = Field(default=None, description="center crop after the resize: int or [H, W]")
    mean: Optional[PerChannel] = Field(default=None, description="subtracted per channel (after scale)")
    std: Optional[PerChannel] = Field(default=None, description="divides per channel after the mean; > 0")
    channels_last: bool = Field(default=False, description="permute [B, C, H, W] to [B, H, W, C] (NHWC models)")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = Field(
        default="float32", description="the model runs in it (weights and input cast); logits come back float32")

    @field_validator("size", "crop")
    @classmethod
    def _size(cls, value: Optional[Size]) -> Optional[Size]:
        if value is None:
            return value
        sides = [value] if isinstance(value, int) else value
        if (isinstance(value, list) and len(value) != 2) or min(sides) <= 0:
            raise ValueError(f"expected a positive int or [H, W] of positive ints, got {value}")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: Optional[PerChannel], info) -> Optional[PerChannel]:
        if value is None:
            return value
        values = [value] if isinstance(value, (int, float)) else value
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError(f"expected one finite value or one per channel, got {value}")
        if info.field_name == "std" and min(values) <= 0:
            raise ValueError(f"every std must be > 0, got {value}")
        return value


class OutputSpec(Strict):
    """What a model returns, when it is not logits [B, K]; `output: sigmoid` is short for `output: {kind: sigmoid}`."""

    kind: Literal["logits", "probabilities", "log_probabilities", "sigmoid"] = Field(
        default="logits", description="probabilities -> log(max(p, 1e-12)); sigmoid: one logit z [B] or [B, 1] of "
                                      "a binary model -> logits [0, z]")
    index: Optional[int] = Field(default=None, description="the entry of a tuple or list output that holds it")
    key: Optional[str] = Field(default=None, description="the entry of a dict output that holds it")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"kind": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_selector(self) -> "OutputSpec":
        if self.index is not None and self.key is not None:
            raise ValueError("give `index` (a tuple or list output) or `key` (a dict output), not both")
        return self


class FleetModel(FileSource):
    """One audited classifier: built-in (`train`) or a user's file (`path`)."""

    id: str = Field(pattern=ID_PATTERN)
    train: Optional[TrainEntry] = None
    input: Optional[InputSpec] = Field(default=None, description="None: the model takes the data as they are")
    output: Optional[OutputSpec] = Field(default=None, description="None: logits [B, K], not declared")

    @model_serializer(mode="wrap")
    def _omit_unset_adapters(self, handler) -> dict[str, Any]:
        # Unset input/output are left out of dumps, so audit and sweep spec hashes of specs that do not use
        # them stay what they were before the fields existed (resumes of older outputs still match).
        data = handler(self)
        for name in ("input", "output"):
            if data.get(name, 0) is None:
                del data[name]
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "FleetModel":
        self._check_source(f"model {self.id!r}", self.train)
        if self.train is not None and self.input is not None:
            given = sorted(self.input.model_fields_set - {"dtype"})
            if given:  # the zoo trains on the data as they are: preprocessing would feed it what it never saw
                raise ValueError(f"model {self.id!r}: input.{given[0]} applies to a model file; a built-in "
                                 "(`train`) model learns from the data as they are (only input.dtype fits it)")
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


class ExplainerEntry(Strict):
    """Progressive Exaggeration's explainer, trained (or taken from the model cache) for each fleet classifier."""

    train: dict[str, Any] = Field(default_factory=dict, description="ExplainerConfig fields: steps, batch_size, "
                                  "num_bins, d_steps, lr, lambda_cgan, lambda_f, lambda_rec, width, positive_class")
    dataset_options: dict[str, Any] = Field(default_factory=dict,
                                            description="overrides of dataset.options for the explainer's data")
    seed: int = 0
    workers: int = Field(default=1, gt=0, description="Ray Train data-parallel workers; 1 trains in-process")
    use_gpu: bool = False
    checkpoint_uri: Optional[str] = Field(default=None, description="checkpoint prefix (a model id is appended); "
                                          "default <output>/explainers")
    checkpoint_every: int = Field(default=200, gt=0, description="generator steps between checkpoints")

    @field_validator("train")
    @classmethod
    def _known(cls, value: dict[str, Any]) -> dict[str, Any]:
        make_explainer_config(value)  # raises naming the unknown or invalid field
        return value


class MethodEntry(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class RuntimeSpec(Strict):
    address: Optional[str] = Field(default=None, description="Ray cluster address; None starts a local Ray")
    batch_size: int = Field(default=64, gt=0, description="queries per work unit")
    num_actors: int = Field(default=2, gt=0)
    num_cpus_per_actor: float = Field(default=1, gt=0)
    num_gpus_per_actor: float = Field(default=0, ge=0)
    max_retries: int = Field(default=2, ge=0, description="re-runs of a unit that raised, before it is recorded failed")
    host_start_timeout_s: float = Field(default=600, gt=0, description="seconds a model host may take to start "
                                        "(the cluster finding room for it, then its constructor); past it the job ends")
    models_per_host: int = Field(default=4, gt=0, description="fleet models a host keeps loaded at once (least "
                                 "recently used evicted); units go to the host already holding their model")
    reference_samples: int = Field(default=10000, gt=0, description="training samples whose logits the methods "
                                   "that need reference data use (Gradual Construction's class statistics), computed "
                                   "once per model for the job; a seeded sample when the split is larger, the whole "
                                   "split in order otherwise")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    include_dashboard: bool = False
    cache_dir: Optional[str] = None


class FidSpec(Strict):
    """Fréchet distance of the valid counterfactuals against real images of the query split."""

    extractor: Literal["auto", "inception", "domain", "none"] = Field(
        default="auto", description="auto: Inception (pytorch-fid) when its weights are found, else domain")
    weights: Optional[str] = Field(default=None, description="pytorch-fid Inception state dict (pt_inception-*.pth)")
    reference_samples: int = Field(default=1000, ge=2, description="real images drawn for the reference statistics")


class CoherenceSpec(Strict):
    norm: Literal["l0", "l1", "l2"] = Field(default="l2", description="neighbourhood distance (GC Eq. 11 uses l0)")
    eps: Union[Literal["auto"], float] = Field(default="auto", description="neighbourhood radius; auto: 10% quantile")

    @field_validator("eps")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError(f"coherence eps must be > 0 or 'auto', got {value}")
        return value


class MetricsSpec(Strict):
    confounders: Optional[list[str]] = Field(
        default=None, description="attributes whose change marks a counterfactual confounded (PE Table 3); "
                                  "None: the dataset's `confounder` option")
    lpr_tolerance: float = Field(default=0.05, gt=0, description="|Δz_j| above this counts in LPR (AIP Eq. 8)")
    coherence: CoherenceSpec = CoherenceSpec()
    deletion_steps: int = Field(default=10, ge=0, description="deletion-curve points minus one; 0 disables it")
    fid: FidSpec = FidSpec()
    bootstrap_samples: int = Field(default=1000, ge=10)
    confidence: float = Field(default=0.95, gt=0, lt=1)
    reference_model: Optional[str] = Field(
        default=None, description="fleet id whose confounding rates the reports compare with; "
                                  "None: the fleet's least-confounded model per method and attribute")


Target = Union[Literal["flip", "second", "all"], int]


def confounders_of(metrics: MetricsSpec, dataset: DatasetRef) -> list[str]:
    """The attributes whose oracle-read change marks a counterfactual confounded: `metrics.confounders`,
    else the dataset's `confounder` option."""
    if metrics.confounders is not None:
        return list(metrics.confounders)
    named = dataset.options.get("confounder")
    return [named] if isinstance(named, str) else list(named or [])


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
    metrics: MetricsSpec = MetricsSpec()
    explainer: Optional[ExplainerEntry] = None
    runtime: RuntimeSpec = RuntimeSpec()

    def explainer_entry(self) -> Optional[ExplainerEntry]:
        """The explainer to train per fleet model when a method needs one (the defaults if none is given)."""
        if any("explainer" in get_method_class(m.name).requires for m in self.methods):
            return self.explainer or ExplainerEntry()
        return None

    def confounders(self) -> list[str]:
        return confounders_of(self.metrics, self.dataset)

    @field_validator("targets")
    @classmethod
    def _target(cls, value: Target) -> Target:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"an explicit target class must be >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _unique_and_known(self) -> "AuditSpec":
        ids = [m.id for m in self.fleet]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"fleet: model ids must be unique, repeated: {dup}")
        if self.metrics.reference_model is not None and self.metrics.reference_model not in ids:
            raise ValueError(f"metrics.reference_model: expected one of the fleet ids {ids}, "
                             f"got {self.metrics.reference_model!r}")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods: each method may appear once, got {names}")
        known = method_names()
        for i, entry in enumerate(self.methods):
            if entry.name not in known:
                raise ValueError(f"methods[{i}].name: unknown method {entry.name!r}; expected one of {known}")
            try:
                make_config(entry.name, entry.params)  # raises naming the bad parameter
            except (ValueError, TypeError) as err:
                raise ValueError(f"methods[{i}].params: {err}") from None
            needs = get_method_class(entry.name).requires
            if self.generator is None and ("generator" in needs or "encoder" in needs):
                raise ValueError(f"methods[{i}]: {entry.name!r} needs a generative model; add a `generator` "
                                 "entry (kind vae, dcgan or attribute_autoencoder)")
            informed = self.generator is not None and (self.generator.kind == "attribute_autoencoder"
                                                       or bool(self.generator.attribute_names))
            if get_method_class(entry.name).uses_attributes and self.generator is not None and not informed:
                raise ValueError(f"methods[{i}]: {entry.name!r} edits the attributes of an attribute-informed "
                                 f"generator (latent z ⊕ a); generator kind {self.generator.kind!r} has none (use "
                                 "kind attribute_autoencoder, or give `attribute_names` for your file)")
            if "encoder" in needs and self.generator is not None and self.generator.kind == "dcgan":
                raise ValueError(f"methods[{i}]: {entry.name!r} needs a generator with an encoder; a dcgan has "
                                 "none (use vae or attribute_autoencoder)")
        return self

    def spec_hash(self) -> str:
        """Hash of everything that determines the results (not runtime placement)."""
        # reference_model changes only the reports, not the results.
        # Of the runtime, only the reference sample's bound changes a result (Gradual Construction's statistics).
        placement = set(RuntimeSpec.model_fields) - {"reference_samples"}
        payload = self.model_dump(exclude={"runtime": placement, "overwrite": True, "output": True,
                                           "metrics": {"reference_model"}})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
