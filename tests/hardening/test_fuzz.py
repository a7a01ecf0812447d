"""Property-based: random specs and random tensors find no crash other than the documented errors.

- The spec loader, given random YAML text, random documents, or a valid spec with one field replaced by a
  random value, either returns a spec or raises SpecError (never a KeyError, TypeError, a pydantic
  ValidationError or a crash in a validator).
- The per-query metrics, given random units (NaN, inf, huge values in x_cf and latents; no, one, every or any
  query successful; one target class, each query its own, or any; one query or several), return one value
  per query, each finite or null and null wherever a metric needs a valid counterfactual the row lacks.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from engine.explain import cf_to_table
from engine.metrics.distances import input_distances
from engine.metrics.per_query import MetricOptions, per_query_columns
from engine.models.handles import ClassifierHandle, GeneratorHandle, ModelBundle
from engine.spec import AuditSpec, SpecError, load_spec, parse_spec
from engine.spec.sweep import SweepSpec
from engine.types import CFBatch, QueryBatch
from tests.fixtures.s3 import tiny_audit_spec

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)  # a fixed example sequence: CI runs are repeatable

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["gradual_construction", "flip", "s3://", "../x", "cnn"]))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


def _paths(node, prefix=()):
    """Every (path) to a value inside a nested dict/list spec."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


BASE = tiny_audit_spec("out")
PATHS = [p for p in _paths(BASE) if p]


def _replaced(path, value):
    spec = yaml.safe_load(yaml.safe_dump(BASE))
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return spec


def _accepts_or_spec_error(model, data) -> None:
    try:
        parse_spec(model, data)
    except SpecError as err:
        assert str(err).strip()


@FAST
@given(st.sampled_from(PATHS), documents)
def test_one_bad_field_gives_a_spec_error(path, value):
    _accepts_or_spec_error(AuditSpec, _replaced(path, value))


@FAST
@given(documents)
def test_any_document_gives_a_spec_or_a_spec_error(document):
    _accepts_or_spec_error(AuditSpec, document)
    _accepts_or_spec_error(SweepSpec, document)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_any_text_file_gives_a_spec_or_a_spec_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("spec") / "spec.yaml"
    path.write_text(text)
    try:
        load_spec(AuditSpec, path)
    except SpecError as err:
        assert str(path) in str(err)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class Encoder(nn.Module):
    """A fixed linear encoder [B, 3, 2, 2] -> [B, 4]; its gain makes a 1e30 input a ±inf or NaN latent."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.linspace(-1e9, 1e9, 48).view(4, 12))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.weight).view(-1, 3, 2, 2)


HANDLE = ClassifierHandle(Tiny().eval(), "tiny", (3, 2, 2), list("abcdef"))
BUNDLE = ModelBundle(classifier=HANDLE, generator=GeneratorHandle(Encoder(), "linear", 4))
META = {"job": "t", "spec_hash": "h", "model_id": "tiny", "method": "m", "config_hash": "c", "unit_id": "u"}
NEED_VALID = ("latent_closest", "coherence", "fid_features")  # null on a row without a valid counterfactual
values = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, 1e30, -1e30]))  # NaN, ±inf, huge and plain


def tensors(draw, *shape):
    return torch.tensor(draw(st.lists(values, min_size=math.prod(shape), max_size=math.prod(shape)))).view(shape)


@st.composite
def units(draw):
    """1-6 queries of which none, one, all or any succeeded, aimed at one class, each at its own, or any."""
    n = draw(st.integers(1, 6))
    x = torch.tensor(draw(st.lists(st.floats(0, 1, width=32), min_size=n * 12, max_size=n * 12))).view(n, 3, 2, 2)
    succeeded = draw(st.sampled_from(["none", "one", "all", "any"]))
    aimed = draw(st.sampled_from(["one", "each", "any"]))
    event(f"succeeded: {succeeded}, targets: {aimed}, size {'1' if n == 1 else '> 1'}")
    if succeeded == "one":
        success = torch.arange(n) == draw(st.integers(0, n - 1))
    elif succeeded == "any":
        success = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    else:
        success = torch.full((n,), succeeded == "all")
    target = (torch.full((n,), draw(st.integers(0, 5))) if aimed == "one" else torch.arange(n) if aimed == "each"
              else torch.tensor(draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))))
    probs = torch.full((n, 6), 1 / 6)
    series = {"desired": tensors(draw, n, 3), "achieved": tensors(draw, n, 3)} if draw(st.booleans()) else {}
    cf = CFBatch(x_cf=tensors(draw, n, 3, 2, 2), success=success, p_orig=probs, p_cf=probs, target=target,
                 n_iter=torch.zeros(n, dtype=torch.long), status=["ok"] * n, **series,
                 explanation=tensors(draw, n, 3, 2, 2) if draw(st.booleans()) else None)
    return QueryBatch(x=x, target=target, query_id=torch.arange(n), label=torch.full((n,), -1), seed=0), cf


def _finite_or_null(value) -> bool:
    """None, a flag, or a number (or list of them) finite as the float32 the results store."""
    if value is None or isinstance(value, bool):
        return True
    return bool((np.abs(np.asarray(value, dtype=np.float64)) <= np.finfo(np.float32).max).all())


@FAST
@given(units(), st.sampled_from(["l0", "l1", "l2"]), st.integers(0, 4))
def test_per_query_metrics_give_one_finite_or_null_value_per_query(unit, norm, steps):
    batch, cf = unit
    n = len(batch)
    options = MetricOptions(coherence_norm=norm, deletion_steps=steps, confounders=("marker",),
                            extractor=lambda v: BUNDLE.generator.encode(v)[0])
    changed = [["marker"] if i % 2 else [] for i in range(n)]
    columns = per_query_columns(batch, cf, BUNDLE, options, oracle_changed=changed)
    assert {"latent_l2", "lpr", "latent_closest", "confounded", "fid_features"} <= set(columns)
    table = cf_to_table(batch, cf.p_orig, cf, 0.0, {**META, **columns})  # what a shard stores
    assert table.num_rows == n and table.column("success").to_pylist() == cf.success.tolist()
    for name, column in columns.items():
        assert len(column) == n, name
        stored = table.column(name).to_pylist()
        assert all(_finite_or_null(v) for v in stored), (name, stored)
        if name in NEED_VALID:
            assert all(v is None for v, ok in zip(stored, cf.success.tolist()) if not ok), (name, stored)
    distances = input_distances(batch.x, torch.nan_to_num(cf.x_cf))
    assert all(d.shape == (n,) for d in distances.values())


def test_the_property_catches_an_undocumented_error():
    """Not vacuous: a validator that raised a plain TypeError would fail the spec properties."""
    class Broken(AuditSpec):
        @classmethod
        def model_validate(cls, obj, **kwargs):
            raise TypeError("a crash inside a validator")

    with pytest.raises(TypeError):
        _accepts_or_spec_error(Broken, BASE)
