"""Bias and confounding reports on a small fleet: planted marker strength 0, 0.5 and 1.0 on `shapes`."""
import json

import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from engine.cli import demo_spec_path
from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.report.bias import REPORTS, confounding_table, read_report, write_reports
from engine.report.summary import audit_states, write_summary
from engine.spec.audit import AuditSpec
from engine.store.uri import join, write_bytes_atomic
from tests.fixtures.results import SPEC_HASH, commit_shard

METHOD = "gradual_construction"
N = 12


@pytest.fixture(scope="module")
def audit_out(tmp_path_factory, fair_cnn, half_cnn, confounded_cnn, shapes_oracle, shapes_biased_train,
              shapes_test):
    """An audit output of gradual construction on the three models, written as results shards."""
    out = str(tmp_path_factory.mktemp("audit"))
    options = MetricOptions(confounders=("marker",), deletion_steps=0)
    for model_id, handle in (("bias0.0", fair_cnn), ("bias0.5", half_cnn), ("bias1.0", confounded_cnn)):
        bundle = ModelBundle(classifier=handle, oracle=shapes_oracle, reference=shapes_biased_train)
        meta = {"job": "t", "spec_hash": "h", "model_id": model_id, "method": METHOD, "config_hash": "c",
                "unit_id": model_id}
        table = explain_unit(make_method(METHOD, {"sigma": 20}), bundle, shapes_test.x[:N], torch.arange(N),
                             shapes_test.y[:N], "flip", seed=0, meta=meta, metrics=options)
        commit_shard(out, model_id, METHOD, 0, table)
    spec = {"dataset": {"name": "shapes", "options": {"confounder": "marker"}},
            "metrics": {"confidence": 0.95, "bootstrap_samples": 200}}
    write_bytes_atomic(join(out, "_job.json"), json.dumps({"spec": spec, "spec_hash": SPEC_HASH}).encode())
    summary = write_summary(out, 0.95, 200)
    return out, write_reports(out, summary=summary)


def test_fleet_ranks_models_by_planted_strength(audit_out):
    _, reports = audit_out
    fleet = reports["fleet"]
    assert fleet.height == 3
    ranks = {r["model_id"]: r["rank_by_method"][METHOD] for r in fleet.iter_rows(named=True)}
    rates = {r["model_id"]: r["confounding_rate_by_method"][METHOD] for r in fleet.iter_rows(named=True)}
    assert ranks["bias1.0"] < ranks["bias0.5"] < ranks["bias0.0"], rates
    assert fleet["model_id"].to_list() == ["bias1.0", "bias0.5", "bias0.0"]  # sorted by the pooled rank


def test_marker_drives_the_confounded_model(audit_out):
    _, reports = audit_out
    row = reports["fleet"].filter(model_id="bias1.0").row(0, named=True)
    assert row["driver"] == "marker" and row["driver_by_method"][METHOD] == "marker"
    ranked = reports["attributes"].filter(model_id="bias1.0", method=METHOD).sort("rank")
    assert ranked["attribute"][0] == "marker" and ranked["ranked_by"][0] == "oracle"


def test_confounding_interval_and_reference(audit_out):
    out, reports = audit_out
    conf = reports["confounding"].filter(attribute="marker")
    assert set(conf["reference_model"].to_list()) == {"bias0.0"}  # the least confounded
    strong = conf.filter(model_id="bias1.0").row(0, named=True)
    fair = conf.filter(model_id="bias0.0").row(0, named=True)
    assert strong["confounding_lo"] <= strong["confounding_rate"] <= strong["confounding_hi"]
    assert strong["excludes_reference"] and not fair["excludes_reference"] and fair["ratio_to_reference"] == 1.0
    assert strong["ratio_to_reference"] > 1.0
    fleet = reports["fleet"]
    assert fleet.filter(model_id="bias1.0")["excludes_reference"].item()
    assert not fleet.filter(model_id="bias0.0")["excludes_reference"].item()
    # The summary's PE Table 3 rate (one confounder) is this per-attribute rate.
    summary = pl.read_parquet(join(out, "reports", "summary.parquet"))
    assert summary.filter(model_id="bias1.0")["confounding_rate"].item() == pytest.approx(strong["confounding_rate"])
    declared = confounding_table(audit_states(out), ["marker"], reference_model="bias1.0", bootstrap=200)
    assert set(declared["reference_model"].to_list()) == {"bias1.0"}
    assert declared.filter(model_id="bias0.0")["excludes_reference"].item()


def test_reports_round_trip_and_refuse_other_versions(audit_out, tmp_path):
    out, reports = audit_out
    for name in REPORTS:
        frame = read_report(join(out, "reports", f"{name}.parquet"))
        assert frame.equals(reports[name]), name
        assert frame["schema_version"].unique().to_list() == [1]
    table = pq.read_table(join(out, "reports", "fleet.parquet"))
    for version in (0, 2):
        meta = {**table.schema.metadata, b"cfaudit.report_schema_version": str(version).encode()}
        path = tmp_path / f"fleet-v{version}.parquet"
        pq.write_table(table.replace_schema_metadata(meta), path)
        with pytest.raises(ValueError, match=rf"fleet-v{version}.parquet: report schema version {version} .*"
                                             r"reads version 1"):
            read_report(str(path))


def test_reference_model_must_be_a_fleet_id():
    spec = yaml.safe_load(demo_spec_path().read_text())
    spec["metrics"]["reference_model"] = "cnn-bias0.0"
    assert AuditSpec.model_validate(spec).metrics.reference_model == "cnn-bias0.0"
    spec["metrics"]["reference_model"] = "nope"
    with pytest.raises(ValueError, match="metrics.reference_model: expected one of the fleet ids"):
        AuditSpec.model_validate(spec)
