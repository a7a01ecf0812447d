"""SweepSpec.space and .search -> Ray Tune's param_space and search algorithm."""
from __future__ import annotations

from typing import Any, Optional

from engine.spec.sweep import SpaceEntry, SweepSpec


def domain(entry: SpaceEntry) -> Any:
    from ray import tune  # deferred: Ray Tune loads only when a sweep runs

    if entry.grid is not None:
        return tune.grid_search(list(entry.grid))
    if entry.choice is not None:
        return tune.choice(list(entry.choice))
    if entry.uniform is not None:
        return tune.uniform(*entry.uniform)
    if entry.loguniform is not None:
        return tune.loguniform(*entry.loguniform)
    return tune.randint(*entry.randint)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Config field name -> Tune domain (the keys are the method's config field names)."""
    return {name: domain(entry) for name, entry in spec.space.items()}


def search_alg(spec: SweepSpec) -> tuple[Any, Optional[int]]:
    """The search algorithm for spec.search, seeded from spec.seed; grid and random use Tune's variant generator.

    Returns (search_alg, max_concurrent_trials for TuneConfig).
    """
    from ray.tune.search import BasicVariantGenerator  # deferred: Ray Tune loads only when a sweep runs

    if spec.search in ("grid", "random"):
        # random_state seeds the sampling of random domains, so a random sweep draws the same configs again.
        # Tune applies TuneConfig.max_concurrent_trials to Searchers only; this generator takes it itself.
        return BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials or 0), None
    # deferred: Optuna (through Ray Tune) loads only for `search: optuna`
    from ray.tune.search.optuna import OptunaSearch

    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    if len(metrics) == 1:
        return OptunaSearch(metric=metrics[0], mode=modes[0], seed=spec.seed), spec.max_concurrent_trials
    # Several objectives: Optuna's default multi-objective sampler (NSGA-II).
    return OptunaSearch(metric=metrics, mode=modes, seed=spec.seed), spec.max_concurrent_trials


def plain(value: Any) -> Any:
    """A Tune-sampled value as a plain Python scalar (numpy scalars become int/float/bool)."""
    item = getattr(value, "item", None)
    return item() if callable(item) and not isinstance(value, (list, dict, str)) else value
