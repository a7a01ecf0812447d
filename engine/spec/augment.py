"""The augmentation job spec: an audit over training samples plus what to keep and how to evaluate it."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.spec.audit import AuditSpec, QuerySpec, Strict


class PlausibilitySpec(Strict):
    """Which valid counterfactuals are plausible samples of their target class (engine.metrics.plausibility)."""

    filter: Literal["knn", "none"] = Field(default="knn", description="knn: k-th-NN distance to real target-class "
                                           "samples in domain features (raw features for tables); none: keep all valid")
    k: int = Field(default=5, gt=0)
    quantile: float = Field(default=0.95, gt=0, le=1, description="keep when the distance is within this quantile "
                            "of real target-class samples' own distances")
    reference_samples: int = Field(default=2000, ge=10, description="real samples drawn (stratified by the seed) "
                                   "for the class references")


class EvaluationSpec(Strict):
    """AIP §4.6.2 / Table 5: train from scratch on a small set with and without the counterfactuals."""

    per_class: int = Field(default=100, gt=0, description="initial training samples per class")
    extra_fraction: float = Field(default=0.1, gt=0, description="counterfactuals added, as a fraction of the "
                                  "initial set (AIP: 2,000 on 20,000)")
    seeds: list[int] = Field(default=[0, 1, 2, 3, 4], min_length=1, description="one initial set, model and "
                             "generation per seed")
    candidates: float = Field(default=3.0, ge=1, description="queries drawn per counterfactual needed (invalid and "
                              "implausible ones are dropped), at most the initial set")


class AugmentOptions(Strict):
    plausibility: PlausibilitySpec = PlausibilitySpec()
    evaluation: EvaluationSpec = EvaluationSpec()


class AugmentSpec(AuditSpec):
    """An audit whose queries are training samples (default split `train`), whose valid and plausible
    counterfactuals become labelled samples (label = target class) under <output>/augmented/."""

    queries: QuerySpec = QuerySpec(split="train")
    augment: AugmentOptions = AugmentOptions()

    def audit_spec(self) -> AuditSpec:
        """The audit part, as the runtime's hosts validate it."""
        return AuditSpec.model_validate(self.model_dump(exclude={"augment"}))

    def evaluation_arch(self) -> tuple[str, dict, dict]:
        """(arch, arch options, training kwargs) of the fleet's first built-in model: the
        architecture the evaluation trains from scratch."""
        entry = self.fleet[0]
        if entry.train is None:
            raise ValueError(f"augment.evaluation: fleet[0] ({entry.id!r}) must be a built-in model (`train`), "
                             "whose architecture is trained from scratch on each initial set")
        return entry.train.arch, dict(entry.train.arch_options), entry.train.train_kwargs()
