import os

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from engine.store.commit import Claim
from engine.store.results import (SCHEMA_VERSION, finished_units, result_files, rows_to_table, shard_uri, write_shard,
                                  write_unit)
from engine.store.uri import read_bytes, write_bytes_atomic


def make_table(n=3, shape=(3, 4, 4), k=2):
    rng = np.random.default_rng(0)
    cols = {
        "job": "j", "spec_hash": "h", "model_id": "m", "method": "wachter", "config_hash": "c", "unit_id": "u",
        "query_id": np.arange(n), "seed": np.zeros(n, np.int64), "label": np.zeros(n, np.int64),
        "pred_orig": np.zeros(n, np.int64), "target": np.ones(n, np.int64), "pred_cf": np.ones(n, np.int64),
        "p_orig_pred": rng.random(n), "p_orig_target": rng.random(n), "p_cf_target": rng.random(n),
        "success": np.array([True, False, True][:n]), "status": ["ok", "budget", "ok"][:n],
        "n_iter": np.full(n, 7), "n_features": np.full(n, 2), "seconds": np.full(n, 0.1),
        "l0": np.full(n, 5), "l1": rng.random(n), "l2": rng.random(n),
        "p_orig": rng.random((n, k)), "p_cf": rng.random((n, k)), "x_cf": rng.random((n, *shape)),
    }
    return rows_to_table(cols, shape, k), cols


def test_roundtrip_pyarrow_and_polars(tmp_path):
    table, cols = make_table()
    uri = shard_uri(str(tmp_path), "m", "wachter", 3)
    write_shard(uri, table)
    back = pq.read_table(uri)
    assert back.schema.equals(table.schema)
    assert np.allclose(back.column("x_cf").combine_chunks().to_numpy_ndarray(), cols["x_cf"])
    df = pl.read_parquet(uri)
    assert df.height == 3 and df["schema_version"].to_list() == [SCHEMA_VERSION] * 3
    assert df["status"].to_list() == ["ok", "budget", "ok"]
    assert [f for f in os.listdir(os.path.dirname(uri))] == ["part-00003.parquet"]  # no temporary left
    write_bytes_atomic(str(tmp_path / "_job.json"), b'{"spec_hash": "h"}')
    assert finished_units(str(tmp_path)) == set()  # written, not yet committed: it would run again
    assert result_files(str(tmp_path)) == []  # and readers do not take it
    with Claim(str(tmp_path), "run-1").acquire() as claim:
        write_unit(str(tmp_path), table, model_id="m", method="wachter", part=3, query_ids=np.arange(3),
                   spec_hash="h", run_id=claim.run_id)
    assert finished_units(str(tmp_path)) == {("m", "wachter", 3)}
    assert result_files(str(tmp_path)) == [uri]


def test_memory_filesystem():
    table, _ = make_table()
    out = "memory://cfaudit-test-store"
    write_bytes_atomic(out + "/_job.json", b'{"spec_hash": "h"}')
    with Claim(out, "run-1").acquire():
        write_unit(out, table, model_id="m", method="gc", part=0, query_ids=np.arange(3), spec_hash="h",
                   run_id="run-1")
    assert finished_units(out) == {("m", "gc", 0)}
    assert len(result_files(out)) == 1
    assert len(read_bytes(result_files(out)[0])) > 100


def test_wrong_column_length_is_rejected():
    _, cols = make_table()
    cols["query_id"] = np.arange(5)
    with pytest.raises(Exception):
        rows_to_table(cols, (3, 4, 4), 2)
