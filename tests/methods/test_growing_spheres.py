"""Growing Spheres (issue #24): a gradient-free method, checked on German credit records and toy models.

The cross-method table (test_common.py) covers shapes, statuses, NaN isolation and pickling on digits and
cancer; here: the tabular goal (validity >= 0.95 with <= 2.5 features changed, on valid records that keep
immutables and directions), batch = single calls, chunking, determinism, models without gradients, Alg. 1's
shrink-then-grow schedule and the counter-based sampler.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.data import load_dataset
from engine.data.registry import dataset_fingerprint
from engine.data.schema import result_columns
from engine.methods import make_method
from engine.methods.growing_spheres import (GrowingSpheresConfig, RecordSpace, counter_uniform, draw, layer_points,
                                            stream_keys)
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.models.zoo import get_or_train
from engine.types import STATUS_ALREADY, STATUS_BUDGET, STATUS_OK, QueryBatch
from tests.methods.conftest import RowWise


class Detached(nn.Module):
    """The wrapped classifier's logits computed without autograd: d logits / d x does not exist, as for a tree
    ensemble compiled to tensors."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.inner(x).detach()


@pytest.fixture(scope="module")
def credit(tmp_path_factory):
    """The tabular spec's model (jobs/specs/tabular.yaml: zoo `mlp` [64, 32], 10 epochs) and all 200 test rows,
    each aimed at the other class."""
    train, test = load_dataset("german_credit", "train"), load_dataset("german_credit", "test")
    module, _ = get_or_train("classifier", "mlp", {"hidden": [64, 32]}, train, dataset_fingerprint(train),
                             {"epochs": 10}, 0, tmp_path_factory.mktemp("cache"))
    handle = ClassifierHandle(module, "mlp-credit", tuple(train.input_shape), train.class_names)
    bundle = ModelBundle(classifier=handle, reference=train)
    batch = QueryBatch(x=test.x, target=1 - handle.predict(test.x), query_id=torch.arange(len(test.x)), seed=0)
    return train.schema, bundle, batch


def with_module(bundle: ModelBundle, module: nn.Module, **handle_args) -> ModelBundle:
    h = bundle.classifier
    handle = ClassifierHandle(module, h.model_id + "-wrapped", h.input_shape, h.class_names, h.value_range,
                              **handle_args)
    return ModelBundle(classifier=handle, reference=bundle.reference)


def assert_records_respect_the_schema(schema, x: torch.Tensor, x_cf: torch.Tensor) -> None:
    assert torch.equal(schema.codec().project(x_cf, x), x_cf)  # a valid record: projection changes nothing
    before, after = schema.decode(x), schema.decode(x_cf)
    for f in schema.features:
        for b, a in zip(before, after):
            if f.immutable:
                assert a[f.name] == b[f.name], f.name
            if f.direction == "increase":
                assert a[f.name] >= b[f.name], f.name
            if f.direction == "decrease":
                assert a[f.name] <= b[f.name], f.name
    start = 0
    for f in schema.features:
        if f.type == "categorical":
            assert torch.equal(x_cf[:, start:start + f.width].sum(1), torch.ones(len(x_cf)))  # one category
        start += f.width


def test_defaults_are_the_papers() -> None:
    cfg = GrowingSpheresConfig()
    assert (cfg.n_samples, cfg.eta, cfg.shrink) == (2000, 0.1, 2.0)  # n, η, Alg. 1's η/2
    assert cfg.selection == "sweep"  # Alg. 2 as the authors' code runs it


@pytest.mark.parametrize("params, match", [
    ({"n_samples": 0}, "n_samples` to be an integer >= 1"), ({"eta": 0.0}, "eta` to be > 0"),
    ({"shrink": 1.0}, "shrink` to be > 1"), ({"selection": "greedy"}, "selection` to be one of"),
    ({"chunk_size": 0}, "chunk_size"), ({"max_shrink": -1}, "max_shrink"), ({"n_enemies": 0}, "n_enemies")])
def test_config_errors_name_the_field(params, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_method("growing_spheres", params)


def test_german_credit_counterfactuals_are_valid_sparse_records(credit) -> None:
    schema, bundle, batch = credit
    cf = make_method("growing_spheres").explain(batch, bundle)  # the paper's n = 2000 points per layer
    assert len(batch) >= 100
    ok = cf.success
    assert ok.float().mean() >= 0.95
    assert set(cf.status) <= {STATUS_OK, STATUS_BUDGET}
    l0 = result_columns(schema, batch.x, cf.x_cf)["l0"][ok.numpy()]
    assert l0.mean() <= 2.5, l0.mean()
    assert torch.equal(cf.n_features[ok], torch.as_tensor(l0))
    assert_records_respect_the_schema(schema, batch.x, cf.x_cf)
    # success is judged on the record the result holds
    assert torch.equal(bundle.classifier.predict(cf.x_cf)[ok], batch.target[ok])
    assert (cf.n_iter[ok] >= 1).all() and (cf.radius[ok] > 0).all()


def test_feature_selection_makes_the_enemy_sparser(credit) -> None:
    schema, bundle, batch = credit
    sub = batch.select(slice(0, 60))
    params = {"n_samples": 500, "n_enemies": 1}  # Alg. 2 on Alg. 1's closest enemy, as in the paper
    runs = {sel: make_method("growing_spheres", {**params, "selection": sel}).explain(sub, bundle)
            for sel in ("none", "paper", "sweep")}
    l0 = {sel: result_columns(schema, sub.x, cf.x_cf)["l0"][cf.success.numpy()].mean() for sel, cf in runs.items()}
    assert l0["sweep"] <= l0["paper"] < l0["none"]
    for cf in runs.values():  # Alg. 2 only ever keeps a record classified as the target
        assert cf.success.all()
    assert torch.equal(runs["none"].n_iter, runs["sweep"].n_iter)  # same Alg. 1 search underneath


def test_a_batch_equals_single_calls_and_chunking_changes_nothing(credit) -> None:
    schema, bundle, batch = credit
    rowwise = with_module(bundle, RowWise(bundle.classifier.module))  # no batch-size dependent BLAS bits
    sub = batch.select(slice(0, 5))
    method = make_method("growing_spheres", {"n_samples": 150})
    together = method.explain(sub, rowwise)
    for i in range(len(sub)):
        alone = method.explain(sub.select(slice(i, i + 1)), rowwise)
        assert alone.status == together.status[i:i + 1]
        assert torch.equal(alone.n_iter, together.n_iter[i:i + 1])
        assert torch.equal(alone.x_cf, together.x_cf[i:i + 1])
    chunked = make_method("growing_spheres", {"n_samples": 150, "chunk_size": 37}).explain(sub, rowwise)
    assert torch.equal(chunked.x_cf, together.x_cf) and torch.equal(chunked.n_iter, together.n_iter)


def test_deterministic_given_the_seed(credit) -> None:
    _, bundle, batch = credit
    sub = batch.select(slice(0, 20))
    method = make_method("growing_spheres", {"n_samples": 300})
    first = method.explain(sub, bundle)
    again = make_method("growing_spheres", {"n_samples": 300}).explain(sub, bundle)
    assert torch.equal(first.x_cf, again.x_cf) and first.status == again.status
    other = method.explain(QueryBatch(sub.x, sub.target, sub.query_id, seed=1), bundle)
    assert not torch.equal(first.x_cf, other.x_cf)  # the seed reaches the sampler


def test_a_model_without_gradients_gets_valid_counterfactuals(credit) -> None:
    schema, bundle, batch = credit
    sub = batch.select(slice(0, 100))
    frozen = with_module(bundle, Detached(bundle.classifier.module), differentiable=False)
    x = sub.x.clone().requires_grad_(True)
    assert not frozen.classifier.logits(x).requires_grad  # nothing to follow
    cf = make_method("growing_spheres", {"n_samples": 500}).explain(sub, frozen)
    assert cf.success.float().mean() >= 0.95
    assert_records_respect_the_schema(schema, sub.x, cf.x_cf)
    assert torch.equal(make_method("growing_spheres", {"n_samples": 500}).explain(sub, bundle).x_cf, cf.x_cf)
    with pytest.raises(ValueError, match="not differentiable"):  # a gradient method is refused up front
        make_method("wachter").explain(sub, frozen)


class Halfspace(nn.Module):
    """Class 1 where w·x > b: a boundary at a known distance from any point."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.register_buffer("w", w / w.norm())
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1) @ self.w - self.b
        return torch.stack([-s, s], 1)


def halfspace_bundle(d: int, b: float) -> ModelBundle:
    handle = ClassifierHandle(Halfspace(torch.ones(d), b), "halfspace", (d,), ["no", "yes"])
    return ModelBundle(classifier=handle)


def test_alg1_shrinks_the_ball_then_grows_layers() -> None:
    d = 4
    x = torch.full((3, d), 0.5)
    # boundary at distance 0.01 (inside the first ball: η halves), 0.35 and 5 (beyond the unit box: budget)
    bundle = halfspace_bundle(d, 0.0)
    offsets = torch.tensor([0.01, 0.35, 5.0])
    w = torch.ones(d) / 2.0
    centre = (x @ w)[0].item()
    cfs = []
    for off in offsets.tolist():
        bundle.classifier.module.b = centre + off
        cfs.append(make_method("growing_spheres", {"n_samples": 500}).explain(
            QueryBatch(x[:1], torch.tensor([1]), torch.tensor([0])), bundle))
    near, mid, far = cfs
    assert near.status == mid.status == [STATUS_OK] and far.status == [STATUS_BUDGET]
    assert near.radius[0] < 0.1  # η was halved at least once before the layers grew
    radius = mid.radius[0].item()  # the first layer (η k, η (k + 1)) holding a point beyond 0.35
    assert any(math.isclose(radius, r, abs_tol=1e-6) for r in (0.4, 0.5)) and mid.n_iter[0] == round(radius / 0.1)
    assert 0.35 <= (mid.x_cf - x[:1]).norm().item() <= radius + 1e-6  # beyond the boundary, within the layer
    assert "data range" in far.reason[0] and far.n_iter[0] < 500
    assert torch.equal(far.x_cf, x[:1])


def test_already_and_budget_statuses_and_the_budget_reason() -> None:
    bundle = halfspace_bundle(3, 100.0)  # class 1 is out of reach in [0, 1]^3
    x = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    out = make_method("growing_spheres", {"n_samples": 50, "max_layers": 3}).explain(
        QueryBatch(x, torch.tensor([0, 1, 0, 1]), torch.arange(4)), bundle)
    assert out.status == [STATUS_ALREADY, STATUS_BUDGET, STATUS_ALREADY, STATUS_BUDGET]
    assert out.n_iter.tolist() == [0, 3, 0, 3]
    assert "max_layers=3" in out.reason[1]
    assert torch.equal(out.x_cf, x)


def test_the_sampler_is_uniform_in_the_layer() -> None:
    m, d = 20000, 5
    keys = stream_keys(3, torch.zeros(m, dtype=torch.int64))
    u = counter_uniform(keys, torch.zeros(m, dtype=torch.int64),
                        torch.arange(m)[:, None] * (d + 2) + torch.arange(d + 2))
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    a0, a1 = torch.full((m,), 0.5, dtype=torch.float64), torch.full((m,), 1.0, dtype=torch.float64)
    p = layer_points(u, a0, a1, d)
    r = p.norm(dim=1)
    assert (r >= 0.5 - 1e-9).all() and (r <= 1.0 + 1e-9).all()
    # uniform in volume: P(r <= t) = (t^d - a0^d) / (a1^d - a0^d); at t = 0.9 that is 0.575
    assert abs((r <= 0.9).double().mean().item() - (0.9**d - 0.5**d) / (1 - 0.5**d)) < 0.015
    assert p.mean(0).abs().max() < 0.02  # no preferred direction
    wide = counter_uniform(keys[:100], torch.zeros(100, dtype=torch.int64), torch.arange(100 * 257).view(100, 257))
    far = layer_points(wide, 30.0 * a1[:100], 40.0 * a1[:100], 256).norm(dim=1)  # 40^256 would overflow
    assert torch.isfinite(far).all() and (far >= 30.0 - 1e-9).all() and (far <= 40.0 + 1e-9).all()


class Rule(nn.Module):
    """Class 1 when a record's `a` (column 0) exceeds 0.8 or its category `b` is "z" (column 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.maximum(x[:, 0] - 0.8, x[:, 3] - 0.5)
        return torch.stack([-s, s], 1)


def rule_bundle(schema) -> ModelBundle:
    handle = ClassifierHandle(Rule(), "rule", (schema.width,), ["no", "yes"])
    return ModelBundle(classifier=handle, schema=schema)


def test_records_switch_a_category_and_never_move_against_a_direction() -> None:
    from engine.data.schema import FeatureSpec, TabularSchema

    schema = TabularSchema(features=(
        FeatureSpec(name="a", type="continuous", range=(0.0, 1.0), direction="decrease"),
        FeatureSpec(name="b", type="categorical", categories=("x", "y", "z")),
        FeatureSpec(name="c", type="continuous", range=(0.0, 1.0), immutable=True)))
    x = torch.tensor([[0.5, 1.0, 0.0, 0.0, 0.3], [0.7, 0.0, 1.0, 0.0, 0.9]])
    out = make_method("growing_spheres", {"n_samples": 200}).explain(
        QueryBatch(x, torch.tensor([1, 1]), torch.arange(2)), rule_bundle(schema))
    # a may only fall, so the only way to class 1 is the category z, and Alg. 2 leaves nothing else changed
    assert out.status == [STATUS_OK, STATUS_OK]
    expected = x.clone()
    expected[:, 1:4] = torch.tensor([0.0, 0.0, 1.0])
    assert torch.equal(out.x_cf, expected) and out.n_features.tolist() == [1, 1]
    frozen = TabularSchema(features=tuple(f.model_copy(update={"immutable": True, "direction": "any"})
                                          for f in schema.features))
    stuck = make_method("growing_spheres").explain(QueryBatch(x, torch.tensor([1, 1]), torch.arange(2)),
                                                   rule_bundle(frozen))
    assert stuck.status == [STATUS_BUDGET, STATUS_BUDGET] and "no mutable feature" in stuck.reason[0]
    assert stuck.n_iter.tolist() == [0, 0]


def test_a_compiled_tree_ensemble_gets_valid_counterfactuals(credit, tmp_path) -> None:
    """The case the method is for: a scikit-learn gradient-boosted ensemble compiled to tensors (hummingbird),
    whose handle says it is not differentiable."""
    import warnings

    pytest.importorskip("hummingbird.ml")
    sio = pytest.importorskip("skops.io")
    from sklearn.ensemble import GradientBoostingClassifier

    from engine.models.loading import classifier_handle_from_module, load_module

    schema, bundle, _ = credit
    train, test = bundle.reference, load_dataset("german_credit", "test")
    sio.dump(GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(train.x.numpy(),
                                                                                          train.y.numpy()),
             tmp_path / "gbc.skops")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = load_module(tmp_path / "gbc.skops", format="sklearn", trust=True)
    handle = classifier_handle_from_module(module, "gbc", train.input_shape, train.class_names)
    assert not handle.differentiable
    trees = ModelBundle(classifier=handle, reference=train)
    queries = QueryBatch(test.x[:60], 1 - handle.predict(test.x[:60]), torch.arange(60), seed=0)
    cf = make_method("growing_spheres", {"n_samples": 500}).explain(queries, trees)
    assert cf.success.float().mean() >= 0.95
    assert result_columns(schema, queries.x, cf.x_cf)["l0"][cf.success.numpy()].mean() <= 2.5
    assert_records_respect_the_schema(schema, queries.x, cf.x_cf)


def test_record_candidates_are_valid_records_at_their_layer_distance(credit) -> None:
    schema, _, batch = credit
    space = RecordSpace(schema.codec())
    m = 3000
    x0 = batch.x[torch.arange(m) % len(batch.x)]
    a0, a1 = torch.full((m,), 0.6, dtype=torch.float64), torch.full((m,), 0.9, dtype=torch.float64)
    u = draw(space, stream_keys(0, torch.arange(m) % 7), torch.zeros(m, dtype=torch.int64), torch.arange(m))
    cand = space.candidates(x0, u, a0, a1)
    assert_records_respect_the_schema(schema, x0, cand)
    distance = space.distance(cand, x0)
    torch.testing.assert_close(distance, schema.codec().changes(x0, cand)["delta_scaled"].norm(dim=1))
    torch.testing.assert_close(distance.float(), torch.as_tensor(result_columns(schema, x0, cand)["l2"]))
    assert (space.changed(cand, x0) > 0).float().mean() > 0.9  # the layer moves records
    switched = schema.codec().changes(x0, cand)["changed"][:, [f.type == "categorical" for f in schema.features]]
    assert 0 < switched.any(1).float().mean() < 0.5  # at radius < 1 a category switches now and then
