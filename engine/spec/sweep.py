"""The sweep job spec: one method's config fields searched with Ray Tune on a fixed, seeded query sample.

The dataset, fleet, generator, oracle, queries, targets, method and metrics entries are the audit spec's
own (engine.spec.audit); a sweep adds the search space, the search, the objectives and the trial budget.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from engine.methods import get_method_class, make_config, method_names
from engine.spec.audit import (ID_PATTERN, DatasetRef, ExplainerEntry, FidSpec, FleetModel, GeneratorEntry,
                               MethodEntry, MetricsSpec, OracleEntry, QuerySpec, Strict, Target, confounders_of)

# What a trial reports that an objective may name (engine.tune.trainable computes every one of them).
# Distances and latent figures are over the valid counterfactuals only, as in the audit's reports.
OBJECTIVE_METRICS = {
    "flip_ratio": "share of queries whose counterfactual is valid (AIP Eq. 7 FR; = validity)",
    "validity": "share of queries whose counterfactual is valid",
    "mean_l0": "features (entries) changed by >= 1e-3 (GC Eq. 9)",
    "mean_l1": "L1 change of the input",
    "mean_l2": "L2 change of the input (GC Eq. 10)",
    "mean_z_l2": "||z_cf - z0|| in the method's own latent",
    "mean_lpr": "latent perturbation ratio through the generator's encoder (AIP Eq. 8)",
    "mean_latent_l2": "||E(x_cf) - E(x)||_2 through the generator's encoder",
    "latent_closeness": "share of valid cfs closest to their own query in latent space (PE Eq. 10)",
    "mean_coherence": "GC Eq. 11 coherence",
    "confounding_rate": "share of valid cfs whose oracle-read change includes a confounder (PE Table 3)",
    "deletion_area": "area under the deletion curve (PE §4.3)",
    "mean_p_cf_target": "probability of the target on the counterfactual",
    "mean_n_iter": "optimisation steps used",
    "seconds_per_cf": "method wall time per counterfactual (not reproducible)",
    "fid": "Fréchet distance of valid cfs to real images (metrics.fid.extractor)",
}
NEEDS_ENCODER = {"mean_lpr", "mean_latent_l2", "latent_closeness"}


class SpaceEntry(Strict):
    """One config field's search domain: exactly one of the keys."""

    grid: Optional[list[Any]] = Field(default=None, min_length=1, description="every value (tune.grid_search)")
    choice: Optional[list[Any]] = Field(default=None, min_length=1, description="sampled uniformly (tune.choice)")
    uniform: Optional[tuple[float, float]] = Field(default=None, description="[low, high] (tune.uniform)")
    loguniform: Optional[tuple[float, float]] = Field(default=None, description="[low, high], low > 0")
    randint: Optional[tuple[int, int]] = Field(default=None, description="[low, high) integers (tune.randint)")

    @model_validator(mode="after")
    def _one_kind(self) -> "SpaceEntry":
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint; got {given or 'none'}")
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: expected [low, high] with low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: expected low > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None)

    def probes(self) -> list[Any]:
        """Values that must each make a valid config: every listed value, or both ends of a range."""
        if self.grid is not None or self.choice is not None:
            return list(self.grid or self.choice)
        low, high = self.uniform or self.loguniform or self.randint
        return [low, high - 1] if self.randint is not None else [low, high]


class SweepMetrics(MetricsSpec):
    """The audit's metrics section; a sweep computes no FID unless asked (it trains a domain extractor)."""

    fid: FidSpec = FidSpec(extractor="none")


class Objective(Strict):
    metric: str
    mode: Literal["max", "min"]


class Resources(Strict):
    """What one trial reserves; the driver itself reserves nothing."""

    cpu: float = Field(default=1, gt=0, description="CPUs per trial (also its torch threads, at least 1)")
    gpu: float = Field(default=0, ge=0, description="GPUs per trial (fractions share one)")


class SweepRuntime(Strict):
    address: Optional[str] = Field(default=None, description="Ray cluster address; None starts a local Ray")
    batch_size: int = Field(default=64, gt=0, description="queries per method call inside a trial")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    include_dashboard: bool = False
    cache_dir: Optional[str] = Field(default=None, description="model cache; default $CFAUDIT_CACHE")
    max_retries: int = Field(default=1, ge=0, description="re-runs of a trial that raised (tune.FailureConfig)")


class SweepSpec(Strict):
    name: str = Field(default="sweep", pattern=ID_PATTERN)
    seed: int = Field(default=0, description="random search's sampler and every trial's method seed")
    output: str = Field(description="local path or s3://...; the sweep goes to <output>/sweeps/<name>/")
    overwrite: bool = False
    dataset: DatasetRef
    fleet: list[FleetModel] = Field(min_length=1, description="every trial runs on every model; metrics pool them")
    generator: Optional[GeneratorEntry] = None
    oracle: Optional[OracleEntry] = None
    explainer: Optional[ExplainerEntry] = None
    queries: QuerySpec = QuerySpec(count=64)
    targets: Target = "second"
    method: MethodEntry = Field(description="the swept method and its fixed params")
    space: dict[str, SpaceEntry] = Field(min_length=1, description="config field -> domain")
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(default=1, gt=0, description="random/optuna: trials; grid: must stay 1")
    objectives: list[Objective] = Field(min_length=1)
    validity_floor: Optional[float] = Field(default=None, ge=0, le=1,
                                            description="recommend the knee among trials with validity >= this")
    resources: Resources = Resources()
    max_concurrent_trials: Optional[int] = Field(default=None, gt=0)
    examples: int = Field(default=4, ge=0, description="queries shown per point on the sweep page")
    metrics: SweepMetrics = SweepMetrics()
    runtime: SweepRuntime = SweepRuntime()

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSpec":
        ids = [m.id for m in self.fleet]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"fleet: model ids must be unique, repeated: {dup}")
        known = method_names()
        if self.method.name not in known:
            raise ValueError(f"method.name: unknown method {self.method.name!r}; expected one of {known}")
        cls = get_method_class(self.method.name)
        make_config(self.method.name, self.method.params)  # raises naming the bad parameter
        needs = cls.requires
        if self.generator is None and ("generator" in needs or "encoder" in needs):
            raise ValueError(f"method: {self.method.name!r} needs a generative model; add a `generator` entry")
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        for name, entry in self.space.items():
            if name not in fields:
                raise ValueError(f"space.{name}: not a config field of {self.method.name!r}; "
                                 f"expected some of {sorted(fields)}")
            if name in self.method.params:
                raise ValueError(f"space.{name}: also fixed in method.params; sweep it or fix it, not both")
            default = getattr(cls.Config(), name)
            if isinstance(default, int) and not isinstance(default, bool) and entry.kind in ("uniform", "loguniform"):
                raise ValueError(f"space.{name}: {self.method.name}.{name} is an integer; use randint or grid")
            if self.search == "grid" and entry.kind != "grid":
                raise ValueError(f"space.{name}: search 'grid' takes `grid` values only, got {entry.kind}")
            if self.search == "optuna" and entry.kind == "grid":
                raise ValueError(f"space.{name}: search 'optuna' samples; use choice instead of grid")
            for value in entry.probes():
                try:
                    make_config(self.method.name, {**self.method.params, name: value})
                except ValueError as err:
                    raise ValueError(f"space.{name}: {err}") from None
        if self.search == "grid" and self.num_samples != 1:
            raise ValueError(f"num_samples: a grid's trials are deterministic, repeating them adds nothing; "
                             f"expected 1, got {self.num_samples}")
        has_encoder = self.generator is not None and self.generator.kind != "dcgan"
        for i, objective in enumerate(self.objectives):
            if objective.metric not in OBJECTIVE_METRICS:
                raise ValueError(f"objectives[{i}].metric: unknown metric {objective.metric!r}; "
                                 f"expected one of {sorted(OBJECTIVE_METRICS)}")
            if objective.metric in NEEDS_ENCODER and not has_encoder:
                raise ValueError(f"objectives[{i}].metric: {objective.metric} is measured through the generator's "
                                 "encoder; add a `generator` of kind vae or attribute_autoencoder")
            if objective.metric == "confounding_rate" and self.oracle is None:
                raise ValueError(f"objectives[{i}].metric: confounding_rate needs an `oracle` entry")
            if objective.metric == "fid" and self.metrics.fid.extractor == "none":
                raise ValueError(f"objectives[{i}].metric: fid needs metrics.fid.extractor (auto, domain or "
                                 "inception); a sweep computes no FID by default")
        names = [o.metric for o in self.objectives]
        if len(set(names)) != len(names):
            raise ValueError(f"objectives: each metric may appear once, got {names}")
        if self.search == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ValueError("search: 'optuna' needs the optuna package (pip install optuna)") from None
        return self

    def needs_explainer(self) -> Optional[ExplainerEntry]:
        if "explainer" in get_method_class(self.method.name).requires:
            return self.explainer or ExplainerEntry()
        return None

    def confounders(self) -> list[str]:
        return confounders_of(self.metrics, self.dataset)

    def expected_trials(self) -> int:
        if self.search == "grid":
            return math.prod(len(e.grid) for e in self.space.values())
        grids = [len(e.grid) for e in self.space.values() if e.grid is not None]
        return self.num_samples * math.prod(grids)

    def spec_hash(self) -> str:
        """Hash of what determines the trials (not placement, budget of examples or output)."""
        payload = self.model_dump(exclude={"runtime": {"address", "include_dashboard", "cache_dir", "max_retries"},
                                           "overwrite": True, "output": True, "resources": True,
                                           "max_concurrent_trials": True, "examples": True})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
