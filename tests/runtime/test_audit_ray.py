"""A small audit end to end through a real local Ray: shards, schema, validity, resume, refusal."""
import subprocess

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from engine.data import load_dataset
from engine.spec import AuditSpec, parse_spec
from engine.store.results import result_files
from engine.workflows.audit import audit

pytestmark = pytest.mark.ray

QUERIES = 40


def small_spec(out: str, **changes) -> AuditSpec:
    data = {
        "name": "small",
        "output": out,
        "dataset": {"name": "shapes", "options": {"size": 32, "n_train": 1500, "n_test": 200, "seed": 3}},
        "fleet": [{"id": "cnn-b0", "train": {"arch": "cnn", "dataset_options": {"bias": 0.0}, "epochs": 3}},
                  {"id": "cnn-b1", "train": {"arch": "cnn", "dataset_options": {"bias": 1.0}, "epochs": 3}}],
        "queries": {"count": QUERIES, "seed": 1},
        "targets": "flip",
        "methods": [{"name": "gradual_construction", "params": {"sigma": 30}},
                    {"name": "wachter", "params": {"max_iter": 200}}],
        "runtime": {"batch_size": 16, "num_actors": 2, "num_cpus_per_actor": 1},
        "metrics": {"fid": {"extractor": "none"}},  # FID through a real audit: test_audit_generative
        **changes,
    }
    return parse_spec(AuditSpec, data)


@pytest.fixture(scope="module")
def audited(tmp_path_factory, local_ray):
    out = str(tmp_path_factory.mktemp("audit"))
    return out, audit(small_spec(out), progress=False)


def test_shards_rows_and_schema(audited):
    out, result = audited
    assert result.units_failed == []
    assert result.units_done == result.units_total == 2 * 2 * 3  # 2 models x 2 methods x ceil(40 / 16)
    files = result_files(out)
    assert len(files) == 12
    assert all("/results/model=cnn-b" in f and "/method=" in f for f in files)
    df = pl.read_parquet(files)  # plain polars reads every shard
    assert df.height == 2 * 2 * QUERIES
    assert df.group_by("model_id", "method").len()["len"].to_list() == [QUERIES] * 4
    assert df["query_id"].n_unique() == QUERIES
    assert set(df["status"].unique()) <= {"ok", "budget", "nan", "already"}
    table = pq.read_table(files[0])
    assert table.schema.field("x_cf").type.shape == [3, 32, 32]
    x_cf = table.column("x_cf").combine_chunks().to_numpy_ndarray()
    assert x_cf.shape[1:] == (3, 32, 32) and np.isfinite(x_cf).all()
    # success means the classifier really predicts the target on the stored counterfactual
    assert (df.filter(pl.col("success"))["pred_cf"] == df.filter(pl.col("success"))["target"]).all()


def test_gradual_construction_validity(audited):
    out, result = audited
    summary = result.summary
    gc = summary.filter(pl.col("method") == "gradual_construction")
    assert (gc["validity"] > 0.8).all()
    assert pl.read_parquet(f"{out}/reports/summary.parquet").height == 4


def corner_share(out: str, model_id: str) -> float:
    """Mean share of GC's |x_cf - x| that falls in the 4x4 top-left corner where `marker` is drawn."""
    files = [f for f in result_files(out) if f"model={model_id}/method=gradual_construction" in f]
    table = pq.read_table(files, partitioning=None)
    x_cf = table.column("x_cf").combine_chunks().to_numpy_ndarray()
    data = load_dataset("shapes", "test", size=32, n_train=1500, n_test=200, seed=3)
    x = data.x[table.column("query_id").to_numpy()].numpy()
    diff = np.abs(x_cf - x)
    return float((diff[:, :, :4, :4].sum((1, 2, 3)) / diff.sum((1, 2, 3))).mean())


def test_audit_finds_the_planted_confounder(audited):
    """GC's counterfactuals for the model trained with marker <=> square edit the marker corner;
    for the model trained without the confounder they edit the object instead."""
    out, _ = audited
    assert corner_share(out, "cnn-b1") > 0.5
    assert corner_share(out, "cnn-b0") < 0.2


def test_rerun_resumes_without_recomputing(audited):
    out, _ = audited
    again = audit(small_spec(out), progress=False)
    assert again.units_skipped == again.units_total and again.units_done == 0


def test_output_of_another_spec_is_refused(audited):
    out, _ = audited
    with pytest.raises(ValueError, match="holds results of a different spec"):
        audit(small_spec(out, seed=99), progress=False)


def test_ray_stays_on_loopback(audited):
    """Every TCP connection of this process and its descendants (raylet, GCS, workers) is on loopback."""
    import os

    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    lines = subprocess.run(["ss", "-tnp"], capture_output=True, text=True).stdout.splitlines()[1:]
    mine = [line for line in lines if any(f"pid={pid}," in line for pid in ours)]
    assert mine, "expected Ray's own connections to be visible"
    loopback = ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")
    remote = [line for line in mine if line.split()[4].rsplit(":", 1)[0] not in loopback
              or line.split()[3].rsplit(":", 1)[0] not in loopback]
    assert remote == [], remote


def test_audit_ends_with_the_bias_reports(audited):
    out, _ = audited
    from engine.report.bias import read_report

    fleet = read_report(f"{out}/reports/fleet.parquet")
    assert sorted(fleet["model_id"].to_list()) == ["cnn-b0", "cnn-b1"]
    # bias: one row per model x method x source -> target, source being the model's prediction on the query.
    rows = pl.read_parquet(result_files(out), columns=["model_id", "method", "pred_orig", "target"])
    groups = rows.rename({"pred_orig": "source"}).unique().sort(["model_id", "method", "source", "target"])
    bias = read_report(f"{out}/reports/bias.parquet")
    assert set(bias["method"].unique()) == {"gradual_construction", "wachter"}
    keys = bias.select(groups.columns).with_columns([pl.col(c).cast(groups[c].dtype) for c in groups.columns])
    assert keys.sort(groups.columns).equals(groups)
    # This spec names no oracle: no attribute is read, so both attribute reports are empty, with their columns.
    for name, columns in (("confounding", {"attribute", "confounding_rate", "excludes_reference"}),
                          ("attributes", {"attribute", "rank", "movement"})):
        report = read_report(f"{out}/reports/{name}.parquet")
        assert report.height == 0 and columns <= set(report.columns), (name, report)
