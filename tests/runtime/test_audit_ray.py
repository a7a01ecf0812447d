"""A small audit end to end through a real local Ray: shards, schema, validity, resume, refusal."""
import subprocess

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

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
        "fleet": [{"id": "cnn-b1", "train": {"arch": "cnn", "dataset_options": {"bias": 1.0}, "epochs": 3}}],
        "queries": {"count": QUERIES, "seed": 1},
        "targets": "flip",
        "methods": [{"name": "gradual_construction", "params": {"sigma": 30}},
                    {"name": "wachter", "params": {"max_iter": 200}}],
        "runtime": {"batch_size": 16, "num_actors": 2, "num_cpus_per_actor": 1},
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
    assert result.units_done == result.units_total == 2 * 3  # 2 methods x ceil(40 / 16) units
    files = result_files(out)
    assert len(files) == 6
    assert all("/results/model=cnn-b1/method=" in f for f in files)
    df = pl.read_parquet(files)  # plain polars reads every shard
    assert df.height == 2 * QUERIES
    assert df.group_by("method").len().sort("method")["len"].to_list() == [QUERIES, QUERIES]
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
    assert gc["validity"][0] > 0.8
    assert pl.read_parquet(f"{out}/reports/summary.parquet").height == 2


def test_rerun_resumes_without_recomputing(audited):
    out, _ = audited
    again = audit(small_spec(out), progress=False)
    assert again.units_skipped == again.units_total and again.units_done == 0


def test_output_of_another_spec_is_refused(audited):
    out, _ = audited
    with pytest.raises(ValueError, match="holds results of a different spec"):
        audit(small_spec(out, seed=99), progress=False)


def test_ray_stays_on_loopback(audited):
    lines = subprocess.run(["ss", "-tnp"], capture_output=True, text=True).stdout.splitlines()[1:]
    ours = [line for line in lines if "ray" in line or "raylet" in line or "gcs_server" in line or "python" in line]
    remote = [line for line in ours if line.split()[4].rsplit(":", 1)[0] not in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]")]
    assert remote == [], remote
