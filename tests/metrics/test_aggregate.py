"""Mergeable group metrics: per-shard states merged equal one state over everything."""
import json

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.aggregate import Moments, Rate
from engine.metrics.fid_reference import reference_state, write_reference
from engine.metrics.frechet import FrechetState, frechet_distance
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.report.summary import summarize
from engine.store.uri import write_bytes_atomic
from tests.fixtures.results import SPEC_HASH, commit_shard

META = {"job": "t", "spec_hash": "h", "model_id": "biased", "config_hash": "c", "unit_id": "u"}


def test_moments_merge_like_one_pass():
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, 101)
    merged = Moments.of(values[:10]).merge(Moments.of(values[10:60])).merge(Moments.of(values[60:]))
    assert merged.n == 101
    assert merged.value == pytest.approx(values.mean())
    assert merged.std == pytest.approx(values.std(ddof=1))
    assert Moments.of([np.nan, 1.0, 3.0]).value == 2.0  # non-finite values are not counted


def test_rate_bootstrap_interval_needs_only_counts():
    small, large = Rate(20, 10), Rate(2000, 1000)
    lo, hi = small.interval(seed=0)
    assert lo < 0.5 < hi
    assert small.interval(seed=0) == Rate(10, 4).merge(Rate(10, 6)).interval(seed=0)
    assert large.interval()[1] - large.interval()[0] < (hi - lo) / 5  # ~ 1/sqrt(n) narrower
    assert Rate(0, 0).interval() != Rate(0, 0).interval()  # (nan, nan)


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 8).flatten(1)


@pytest.fixture(scope="module")
def unit_rows(confounded_cnn, shapes_oracle, shapes_attribute_autoencoder, shapes_biased_train, shapes_test):
    """40 real result rows of two methods with every metric that applies to them."""
    bundle = ModelBundle(classifier=confounded_cnn, generator=shapes_attribute_autoencoder, oracle=shapes_oracle,
                         reference=shapes_biased_train)
    options = MetricOptions(confounders=("marker",), extractor=_avg_pool, deletion_steps=5)
    n = 20
    tables = [explain_unit(make_method(name, params), bundle, shapes_test.x[:n], torch.arange(n),
                           shapes_test.y[:n], "flip", seed=0, meta={**META, "method": name}, metrics=options)
              for name, params in (("wachter", {"max_iter": 60}), ("fgsm", {}))]
    return tables


def test_per_query_columns_are_filled(unit_rows):
    df = pl.from_arrow(unit_rows[0])
    assert df["lpr"].null_count() == 0 and df["latent_l2"].null_count() == 0
    assert ((df["lpr"] >= 0) & (df["lpr"] <= 1)).all()
    assert df["confounded"].null_count() == 0
    assert (df["confounded"] == df["oracle_changed"].list.contains("marker")).all()
    assert df["deletion"].list.len().unique().to_list() == [6]
    valid = df.filter(pl.col("success"))
    assert valid["fid_features"].null_count() == 0 and valid["fid_features"].list.len().unique().to_list() == [48]
    assert df.filter(~pl.col("success"))["fid_features"].null_count() == df.height - valid.height
    assert valid["coherence_neighbours"].sum() > 0


def _write_out(out: str, tables, parts: int, reference: FrechetState) -> None:
    for table in tables:
        method = table.column("method")[0].as_py()
        bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
        for p in range(parts):
            commit_shard(out, "biased", method, p, table.slice(bounds[p], bounds[p + 1] - bounds[p]))
    write_bytes_atomic(f"{out}/_job.json", json.dumps({"spec_hash": SPEC_HASH}).encode())
    write_reference(out, "avgpool-test", reference)


def test_four_shards_merge_to_the_numbers_of_one(tmp_path, unit_rows, shapes_test):
    reference = reference_state(_avg_pool, shapes_test.x, 200, seed=0)
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    _write_out(one, unit_rows, 1, reference)
    _write_out(four, unit_rows, 4, reference)
    (summary_1, groups_1), (summary_4, groups_4) = summarize(one), summarize(four)
    assert summary_1.height == 2 and groups_1.height >= 2
    for a, b in ((summary_1, summary_4), (groups_1, groups_4)):
        assert a.columns == b.columns
        for column in a.columns:
            left, right = a[column].to_list(), b[column].to_list()
            if a[column].dtype.is_float():
                np.testing.assert_allclose(np.array(left, float), np.array(right, float), rtol=1e-6, atol=1e-9,  # sqrtm in FID: ~1e-8
                                           err_msg=column)
            else:
                assert left == right, column

    # ... and those numbers are the hand-computed ones of the rows.
    df = pl.concat([pl.from_arrow(t.drop_columns(["x_cf", "p_orig", "p_cf"])) for t in unit_rows])
    for method in ("wachter", "fgsm"):
        rows = df.filter(pl.col("method") == method)
        valid = rows.filter(pl.col("success"))
        got = summary_4.filter(pl.col("method") == method).row(0, named=True)
        assert got["queries"] == rows.height and got["validity"] == pytest.approx(valid.height / rows.height)
        assert got["mean_l1"] == pytest.approx(valid["l1"].mean(), rel=1e-6)
        assert got["std_l2"] == pytest.approx(valid["l2"].std(), rel=1e-5)
        assert got["mean_lpr"] == pytest.approx(valid["lpr"].mean(), rel=1e-6)
        assert got["confounding_rate"] == pytest.approx(valid["confounded"].mean())
        assert got["confounding_lo"] <= got["confounding_rate"] <= got["confounding_hi"]
        curve = np.mean(np.stack(rows["deletion"].to_list()), axis=0)
        np.testing.assert_allclose(got["deletion_curve"], curve, rtol=1e-6)
        if valid.height >= 2:
            features = FrechetState.of(np.stack(valid["fid_features"].to_list()))
            assert got["fid"] == pytest.approx(frechet_distance(features, reference), rel=1e-6)
            assert got["fid_extractor"] == "avgpool-test" and got["fid_samples"] == valid.height
            assert got["fid_reference_samples"] == 200
        changed = got["attribute_change_rate"]
        if valid.height:
            # an attribute no valid counterfactual changed has no entry: its rate is 0
            assert changed.get("marker", 0.0) == pytest.approx(valid["oracle_changed"].list.contains("marker").mean())
