"""Issue #8's done-criterion for the generative methods, at CI size: on three `shapes` CNNs with the marker planted
at strength 0, 0.5 and 1.0, fleet.parquet ranks the 1.0 model first for AIP and introspection (searches of the
attribute-informed generator's latent), with its interval excluding the least confounded model's, and `marker`
drives it (oracle change rate, and mean |Δa| in attributes.parquet).

What is not asserted, and why (README "Bias and confounding reports", measured on jobs/specs/generative_fleet.yaml):
the 0.5 model does not rely on the marker (adding or removing it on the same test images moves its P(square) by
0.006 on average and flips no prediction, like the 0.0 model's 0.005), so its order against the 0.0 model is noise
that no method can recover. xGEM and CDeepEx stop on the classifier's boundary, with a half-drawn marker the oracle
reads on either side of its threshold: on these fixture models (24 queries) the 1.0 model's rate is 0.13 for xGEM,
below the 0.5 model's 0.33, and 0.25 for CDeepEx, not separable from the others' 0.09-0.13 (at demo size the 1.0
model's is 0.49-0.58 against at most 0.27). Exaggeration needs an explainer trained per model (not CI-cheap).
"""
import json

import pytest
import torch

from engine.data import load_dataset
from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.models.loading import classifier_handle_from_module
from engine.report.bias import write_reports
from engine.report.summary import write_summary
from engine.store.results import shard_uri, write_shard
from engine.store.uri import join, write_bytes_atomic
from tests.fixtures.zoo import SHAPES, _train

METHODS = ("aip", "introspection")  # paper defaults (AIP's images settings, introspection's 8 λ rounds)
N = 16


@pytest.fixture(scope="module")
def half_cnn():
    """CNN trained with the marker planted at strength 0.5 (as in test_bias_reports.py: one cached model)."""
    data = load_dataset("shapes", "train", bias=0.5, **SHAPES)
    module = _train("classifier", "cnn", data, {"epochs": 4, "batch_size": 32})
    return classifier_handle_from_module(module, "cnn-half", data.input_shape, data.class_names, data.value_range)


@pytest.fixture(scope="module")
def reports(tmp_path_factory, fair_cnn, half_cnn, confounded_cnn, shapes_oracle, shapes_attribute_autoencoder,
            shapes_test):
    out = str(tmp_path_factory.mktemp("generative-fleet"))
    options = MetricOptions(confounders=("marker",), deletion_steps=0)
    for model_id, handle in (("bias0.0", fair_cnn), ("bias0.5", half_cnn), ("bias1.0", confounded_cnn)):
        bundle = ModelBundle(classifier=handle, generator=shapes_attribute_autoencoder, oracle=shapes_oracle)
        for method in METHODS:
            meta = {"job": "t", "spec_hash": "h", "model_id": model_id, "method": method, "config_hash": "c",
                    "unit_id": f"{model_id}-{method}"}
            table = explain_unit(make_method(method), bundle, shapes_test.x[:N], torch.arange(N), shapes_test.y[:N],
                                 "flip", seed=0, meta=meta, metrics=options)
            write_shard(shard_uri(out, model_id, method, 0), table)
    spec = {"dataset": {"name": "shapes", "options": {"confounder": "marker"}},
            "metrics": {"confidence": 0.95, "bootstrap_samples": 200}}
    write_bytes_atomic(join(out, "_job.json"), json.dumps({"spec": spec}).encode())
    return write_reports(out, summary=write_summary(out, 0.95, 200))


@pytest.mark.parametrize("method", METHODS)
def test_strongly_biased_model_ranks_first_and_marker_drives_it(reports, method):
    fleet = {r["model_id"]: r for r in reports["fleet"].iter_rows(named=True)}
    rates = {m: r["confounding_rate_by_method"][method] for m, r in fleet.items()}
    assert fleet["bias1.0"]["rank_by_method"][method] == 1, rates
    assert rates["bias1.0"] > max(rates["bias0.0"], rates["bias0.5"]), rates
    assert fleet["bias1.0"]["flip_ratio"][method] >= 0.75  # the rate rests on most queries
    conf = reports["confounding"].filter(model_id="bias1.0", method=method, attribute="marker").row(0, named=True)
    assert conf["excludes_reference"] and conf["reference_model"] != "bias1.0", conf
    assert fleet["bias1.0"]["driver_by_method"][method] == "marker"
    ranked = reports["attributes"].filter(model_id="bias1.0", method=method).sort("rank")
    assert ranked["attribute"][0] == "marker" and ranked["ranked_by"][0] == "attribute_delta"  # AIP Fig. 9's reading


def test_fleet_pools_the_methods(reports):
    fleet = reports["fleet"]
    assert fleet["model_id"][0] == "bias1.0" and fleet["rank"][0] == 1
    assert fleet["driver"][0] == "marker" and fleet["excludes_reference"][0]
    assert fleet["confounding_rate"][0] > 2 * fleet["confounding_rate"][1:].max()
