"""The Method contract and the registry: name -> (frozen config dataclass, class)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from typing import Any, ClassVar

import torch

from engine.methods.search import Outcome, SearchState, begin
from engine.models.handles import ModelBundle
from engine.types import CFBatch, QueryBatch

_REGISTRY: dict[str, type["Method"]] = {}


class Method:
    """One counterfactual method. Subclasses set `name`, `Config` and implement `_search`, the paper's algorithm.

    `explain` is the template every method runs: validate the models, `begin` (validate the batch, classify the
    originals, set up the per-query masks), `_search`, then the `finish` its result names. It is pure batched
    torch: no Ray, no I/O, deterministic given batch.seed.
    `requires` names what the ModelBundle must hold ("classifier", "reference", "generator", "encoder",
    "explainer").
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    requires: ClassVar[tuple[str, ...]] = ("classifier",)
    # True when the method works with the attribute part a of a z ⊕ a generator (AIP, GCI); other
    # latent methods get the generator's `joint()` view, whose latent is z ⊕ a as one vector.
    uses_attributes: ClassVar[bool] = False
    # What CFBatch.explanation holds: "difference" (x_cf − x, or G(z0) − G(z_cf) for latent methods) or
    # "saliency" (a relevance map in [0, 1], Progressive Exaggeration §4.3).
    explanation_kind: ClassVar[str] = "difference"
    # True when the method follows d logits / d x (or through a generator): refused for a classifier whose
    # handle says it is not differentiable (a tree ensemble). A gradient-free method sets it to False.
    needs_gradients: ClassVar[bool] = True

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        self.config = make_config(self.name, overrides, base=config)

    def explain(self, batch: QueryBatch, models: ModelBundle) -> CFBatch:
        self.check_models(models)
        # A gradient-free method runs without autograd (nothing it computes needs a graph).
        with contextlib.nullcontext() if self.needs_gradients else torch.no_grad():
            state = begin(self.name, batch, models)
            found = self._search(batch, models, state)
            return found.finish(state, models.classifier)

    def _search(self, batch: QueryBatch, models: ModelBundle, state: SearchState) -> Outcome:
        """The method's algorithm on the batch `begin` set up; updates `state` (masks, n_iter) and returns what
        `finish` needs (search.Found for input-space results, latent_search.LatentFound for latents)."""
        raise NotImplementedError

    def check_models(self, models: ModelBundle) -> None:
        """Raise ValueError naming what is missing for this method."""
        if self.needs_gradients and not models.classifier.differentiable:
            free = sorted(n for n, c in _REGISTRY.items() if not c.needs_gradients) or ["growing_spheres"]
            raise ValueError(f"Method {self.name!r} follows the classifier's gradients, but model "
                             f"{models.classifier.model_id!r} is not differentiable (its gradients are zero or "
                             f"undefined, as a tree ensemble's); use a gradient-free method instead: {free}")
        if "reference" in self.requires and models.reference is None:
            raise ValueError(f"Method {self.name!r} needs reference training samples (ModelBundle.reference)")
        if "generator" in self.requires and models.generator is None:
            raise ValueError(f"Method {self.name!r} needs a generator for model {models.classifier.model_id!r}")
        if "encoder" in self.requires and (models.generator is None or not models.generator.has_encoder):
            raise ValueError(f"Method {self.name!r} needs a generator with an encoder")
        if "explainer" in self.requires and getattr(models, "explainer", None) is None:
            raise ValueError(f"Method {self.name!r} needs an explainer trained for model "
                             f"{models.classifier.model_id!r} (ModelBundle.explainer); train one with "
                             "engine.models.explainer_training.get_or_train_explainer or an `explainer` spec entry")


def register(cls: type[Method]) -> type[Method]:
    if not dataclasses.is_dataclass(cls.Config) or not cls.Config.__dataclass_params__.frozen:
        raise TypeError(f"{cls.__name__}.Config must be a frozen dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(name: str, params: dict[str, Any] | None, base: Any = None) -> Any:
    """The method's Config with `params` overriding `base` (or the paper defaults); unknown keys are an error."""
    cls = get_method_class(name)
    config = base if base is not None else cls.Config()
    known = {f.name: f for f in dataclasses.fields(cls.Config)}
    params = dict(params or {})
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"Unknown parameter(s) {unknown} for method {name!r}; expected some of {sorted(known)}")
    for key, value in params.items():
        default = getattr(config, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"Expected `{name}.{key}` to be a boolean but got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Expected `{name}.{key}` to be a number but got {value!r}")
            params[key] = type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
    return dataclasses.replace(config, **params)


def make_method(name: str, params: dict[str, Any] | None = None) -> Method:
    cls = get_method_class(name)
    return cls(make_config(name, params))


def config_hash(name: str, config: Any) -> str:
    """Stable 12-hex-digit hash of a method name and its config."""
    payload = json.dumps({"method": name, **dataclasses.asdict(config)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _load_builtin() -> None:
    # Importing the package registers every built-in method.
    import engine.methods  # noqa: F401
