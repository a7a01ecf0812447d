"""A unit in which no query finds a counterfactual still gives one row per query (issue 22, item 7).

On a fleet, `introspection` units whose 10 queries all failed raised IndexError in latent closeness
(a min over no explanations) and their rows vanished.
"""
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ClassifierHandle, GeneratorHandle, ModelBundle
from engine.store.results import results_schema

META = {"job": "t", "spec_hash": "h", "model_id": "stubborn", "method": "introspection", "config_hash": "c",
        "unit_id": "u"}
NEED_VALID = ("latent_closest", "coherence", "fid_features")  # metrics of a valid counterfactual only


class Stubborn(nn.Module):
    """A classifier with class 1 out of reach: every query is predicted 0 and `flip` asks for 1."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) - torch.tensor([0.0, 1e4])


def test_a_unit_where_every_query_fails_writes_every_row(confounded_cnn, shapes_attribute_autoencoder,
                                                         shapes_oracle, shapes_test):
    h = confounded_cnn
    classifier = ClassifierHandle(Stubborn(h.module), "stubborn", h.input_shape, h.class_names, h.value_range)
    bundle = ModelBundle(classifier=classifier, generator=shapes_attribute_autoencoder, oracle=shapes_oracle)
    options = MetricOptions(confounders=("marker",), extractor=lambda x: F.avg_pool2d(x, 8).flatten(1),
                            deletion_steps=4)
    n = 10
    table = explain_unit(make_method("introspection", {"n_rounds": 1, "steps": 3}), bundle, shapes_test.x[:n],
                         torch.arange(n), shapes_test.y[:n], "flip", seed=0, meta=META, metrics=options)
    df = pl.from_arrow(table)
    assert df.height == n and df["query_id"].to_list() == list(range(n))
    assert not df["success"].any() and (df["target"] == 1).all()
    for name in NEED_VALID:
        assert df[name].null_count() == n, name
    assert df["lpr"].null_count() == 0 and df["deletion"].list.len().unique().to_list() == [5]


class Linear(nn.Module):
    """A fixed linear autoencoder over [B, 1, 2, 2] (latent 2), and a linear 2-class head as `forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return (z @ self.weight).view(-1, 1, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


def test_a_single_query_that_fails_gives_its_row():
    classifier = ClassifierHandle(Stubborn(Linear()), "stubborn", (1, 2, 2), ["a", "b"])
    bundle = ModelBundle(classifier=classifier, generator=GeneratorHandle(Linear(), "linear", 2))
    method = make_method("introspection", {"n_rounds": 1, "steps": 3})
    x, query_id, label = torch.full((1, 1, 2, 2), 0.5), torch.arange(1), torch.zeros(1, dtype=torch.long)
    table = explain_unit(method, bundle, x, query_id, label, "flip", seed=0, meta=META,
                         metrics=MetricOptions(extractor=lambda v: v.flatten(1), deletion_steps=2))
    assert table.schema.equals(results_schema((1, 2, 2), 2)) and table.num_rows == 1
    row = table.to_pylist()[0]
    assert row["success"] is False and row["reason"] and row["lpr"] is not None
    assert [row[name] for name in NEED_VALID] == [None, None, None]
