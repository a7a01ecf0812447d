"""Issue #8's done-criterion for the generative methods, at CI size: on three `shapes` CNNs with the marker planted
at strength 0, 0.5 and 1.0 (the 0.5 model on 10% label noise, so that it leans on the marker partly: the
`half_cnn` fixture), fleet.parquet ranks the models in the order of their planted strength for AIP and
introspection (searches of the attribute-informed generator's latent), the 1.0 model's interval excludes the
least confounded model's, and `marker` drives it (oracle change rate, and mean |Δa| in attributes.parquet).

Not asserted here: xGEM and CDeepEx stop on the classifier's boundary with a half-drawn marker the oracle reads
on either side of its threshold, so at CI size their rates are not separable; at demo size they are (README
"Bias and confounding reports", jobs/specs/generative_fleet.yaml). Exaggeration needs an explainer trained per
model (not CI-cheap; tests/methods/test_exaggeration.py checks its biased-vs-fair ordering).
"""
import json

import pytest
import torch

from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.report.bias import write_reports
from engine.report.summary import write_summary
from engine.store.uri import join, write_bytes_atomic
from tests.fixtures.results import SPEC_HASH, commit_shard

METHODS = ("aip", "introspection")  # paper defaults (AIP's images settings, introspection's 8 λ rounds)
# 32 queries, not 16: which queries flip the marker moves with a model's last bits (another CPU trains other bits),
# and at 16 the interval test has no margin. Measured on disjoint windows of the first 96 test images (seed 0):
# introspection's lo(bias1.0) − hi(reference) was 0.375 0.500 0.062 0.188 0.300 0.000 (excludes: False) at 16
# queries, 0.500 0.188 0.243 at 32 and 0.417 0.289 at 48; AIP's was ≥ 0.50 everywhere (its 1.0 rate 15/16–32/32).
N = 32


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
            commit_shard(out, model_id, method, 0, table)
    spec = {"dataset": {"name": "shapes", "options": {"confounder": "marker"}},
            "metrics": {"confidence": 0.95, "bootstrap_samples": 200}}
    write_bytes_atomic(join(out, "_job.json"), json.dumps({"spec": spec, "spec_hash": SPEC_HASH}).encode())
    return write_reports(out, summary=write_summary(out, 0.95, 200))


@pytest.mark.parametrize("method", METHODS)
def test_strongly_biased_model_ranks_first_and_marker_drives_it(reports, method):
    fleet = {r["model_id"]: r for r in reports["fleet"].iter_rows(named=True)}
    rates = {m: r["confounding_rate_by_method"][method] for m, r in fleet.items()}
    assert fleet["bias1.0"]["rank_by_method"][method] == 1, rates
    assert rates["bias1.0"] > rates["bias0.5"] > rates["bias0.0"], rates  # the planted strengths' order
    assert fleet["bias0.5"]["rank_by_method"][method] == 2 and fleet["bias0.0"]["rank_by_method"][method] == 3
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
    assert fleet["model_id"].to_list() == ["bias1.0", "bias0.5", "bias0.0"], fleet["confounding_rate"].to_list()
    assert fleet["rank"].to_list() == [1, 2, 3]
