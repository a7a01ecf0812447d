"""Property-based: random specs and random tensors find no crash other than the documented errors.

- The spec loader, given random YAML text, random documents, or a valid spec with one field replaced by a
  random value, either returns a spec or raises SpecError (never a KeyError, TypeError, a pydantic
  ValidationError or a crash in a validator).
- The per-query metrics, given random queries and counterfactuals (NaN, inf, huge values, any success mask),
  return one value per query, each finite or null.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from engine.metrics.distances import input_distances
from engine.metrics.per_query import MetricOptions, per_query_columns
from engine.models.handles import ClassifierHandle, ModelBundle
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
        self.linear = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


HANDLE = ClassifierHandle(Tiny().eval(), "tiny", (3, 2, 2), ["a", "b", "c"])
values = st.one_of(st.floats(width=32), st.sampled_from([0.0, 1.0, 1e30, -1e30]))  # NaN, ±inf, huge and plain


@st.composite
def units(draw):
    n = draw(st.integers(1, 6))
    x = torch.tensor(draw(st.lists(st.floats(0, 1, width=32), min_size=n * 12, max_size=n * 12))).view(n, 3, 2, 2)
    x_cf = torch.tensor(draw(st.lists(values, min_size=n * 12, max_size=n * 12))).view(n, 3, 2, 2)
    success = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    target = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)))
    return x, x_cf, success, target


@FAST
@given(units(), st.sampled_from(["l0", "l1", "l2"]), st.integers(0, 4))
def test_per_query_metrics_give_one_finite_or_null_value_per_query(unit, norm, steps):
    x, x_cf, success, target = unit
    n = len(x)
    batch = QueryBatch(x=x, target=target, query_id=torch.arange(n), label=torch.full((n,), -1), seed=0)
    probs = torch.full((n, 3), 1 / 3)
    cf = CFBatch(x_cf=x_cf, success=success, p_orig=probs, p_cf=probs, target=target,
                 n_iter=torch.zeros(n, dtype=torch.long), status=["ok"] * n)
    options = MetricOptions(coherence_norm=norm, deletion_steps=steps)
    columns = per_query_columns(batch, cf, ModelBundle(classifier=HANDLE), options)
    for name, column in columns.items():
        assert len(column) == n, name
        for value in np.asarray(column, dtype=object).ravel():
            if isinstance(value, (list, np.ndarray)):
                assert np.isfinite(np.asarray(value, dtype=float)).all(), name
            elif value is not None and not isinstance(value, (bool, np.bool_)):
                assert math.isfinite(float(value)), (name, value)
    distances = input_distances(x, torch.nan_to_num(x_cf))
    assert all(d.shape == (n,) for d in distances.values())


def test_the_property_catches_an_undocumented_error():
    """Not vacuous: a validator that raised a plain TypeError would fail the spec properties."""
    class Broken(AuditSpec):
        @classmethod
        def model_validate(cls, obj, **kwargs):
            raise TypeError("a crash inside a validator")

    with pytest.raises(TypeError):
        _accepts_or_spec_error(Broken, BASE)
