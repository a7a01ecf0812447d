"""SweepSpec.space -> Tune domains; the variant generator carries the seed and the concurrency limit."""
from ray import tune
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.sample import Categorical, Float, Integer

from engine.spec import parse_spec
from engine.spec.sweep import SweepSpec
from engine.tune.space import param_space, plain, search_alg
from tests.tune.test_sweep_spec import BASE


def test_domains_map_to_tune():
    spec = parse_spec(SweepSpec, {**BASE, "search": "random", "num_samples": 3, "max_concurrent_trials": 2,
                                  "method": {"name": "gradual_construction"},
                                  "space": {"lam": {"loguniform": [0.01, 1.0]}, "tau": {"uniform": [0.5, 0.9]},
                                            "eta": {"choice": [0.1, 0.3]}, "sigma": {"randint": [10, 50]},
                                            "beta": {"grid": [1.0, 2.0]}}})
    space = param_space(spec)
    assert set(space) == {"lam", "tau", "eta", "sigma", "beta"}
    assert isinstance(space["lam"], Float) and space["lam"].lower == 0.01 and "LogUniform" in str(space["lam"].sampler)
    assert isinstance(space["tau"], Float) and (space["tau"].lower, space["tau"].upper) == (0.5, 0.9)
    assert isinstance(space["eta"], Categorical) and space["eta"].categories == [0.1, 0.3]
    assert isinstance(space["sigma"], Integer) and (space["sigma"].lower, space["sigma"].upper) == (10, 50)
    assert space["beta"] == tune.grid_search([1.0, 2.0])
    searcher, concurrency = search_alg(spec)
    assert isinstance(searcher, BasicVariantGenerator) and concurrency is None  # the generator limits itself
    assert searcher.max_concurrent == 2


def test_plain_unwraps_numpy_scalars():
    import numpy as np

    assert type(plain(np.int64(3))) is int and type(plain(np.float64(0.5))) is float
    assert plain("ce") == "ce" and plain(True) is True
