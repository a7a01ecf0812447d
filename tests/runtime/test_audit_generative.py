"""An audit with the domain's generator and oracle through a real local Ray: latent methods land in Parquet
with their latent distances, attribute deltas and the oracle's reading of what changed."""
import polars as pl
import pytest

from engine.spec import AuditSpec, parse_spec
from engine.store.results import result_files
from engine.workflows.audit import audit
from tests.fixtures.zoo import SHAPES

pytestmark = pytest.mark.ray

QUERIES = 16


@pytest.fixture(scope="module")
def generative_audit(tmp_path_factory, local_ray, confounded_cnn, shapes_attribute_autoencoder, shapes_oracle):
    # Same data, architectures and training settings as the shared fixtures: the hosts hit the cache.
    out = str(tmp_path_factory.mktemp("generative"))
    spec = parse_spec(AuditSpec, {
        "name": "generative", "output": out,
        "dataset": {"name": "shapes", "options": SHAPES},
        "fleet": [{"id": "cnn-b1", "train": {"arch": "cnn", "dataset_options": {"bias": 1.0}, "epochs": 2}}],
        "generator": {"kind": "attribute_autoencoder", "train": {"epochs": 8, "train_options": {"oracle_epochs": 3}}},
        "oracle": {"train": {"epochs": 3}},
        "queries": {"count": QUERIES, "seed": 2},
        "targets": "flip",
        "methods": [{"name": "aip", "params": {"n_max": 100}}, {"name": "xgem"}],
        "runtime": {"batch_size": 8, "num_actors": 2, "num_cpus_per_actor": 1},
        "metrics": {"confounders": ["marker"], "fid": {"extractor": "domain"}},
    })
    result = audit(spec, progress=False)
    return result, pl.read_parquet(result_files(out))


def test_latent_methods_write_their_columns(generative_audit):
    result, df = generative_audit
    assert result.units_failed == [] and df.height == 2 * QUERIES
    aip = df.filter(pl.col("method") == "aip")
    xgem = df.filter(pl.col("method") == "xgem")
    assert aip["z_l2"].null_count() == 0 and xgem["z_l2"].null_count() == 0
    names = {name for row in aip["attribute_delta"].to_list() for name in row}  # polars: Map -> dict
    assert names == {"large", "red", "dark_background", "striped", "marker", "left"}
    assert xgem["attribute_delta"].null_count() == QUERIES  # xGEM searches z ⊕ a as one latent
    assert df["oracle_changed"].null_count() == 0


def test_aip_flips_the_confounder_for_the_confounded_model(generative_audit):
    _, df = generative_audit
    ok = df.filter((pl.col("method") == "aip") & pl.col("success"))
    assert ok.height >= QUERIES // 2
    assert ok["oracle_changed"].list.contains("marker").mean() > 0.5


def test_summary_carries_latent_confounding_and_domain_fid(generative_audit):
    result, df = generative_audit
    out = result.output
    summary = pl.read_parquet(f"{out}/reports/summary.parquet")
    groups = pl.read_parquet(f"{out}/reports/groups.parquet")
    assert summary["method"].to_list() == ["aip", "xgem"] and groups.height >= 2
    for row in summary.iter_rows(named=True):
        valid = df.filter((pl.col("method") == row["method"]) & pl.col("success"))
        assert row["mean_lpr"] == pytest.approx(valid["lpr"].mean(), rel=1e-5)  # shared encoder for both
        assert row["confounding_rate"] == pytest.approx(valid["confounded"].mean())  # dataset's confounder
        assert row["confounding_lo"] <= row["confounding_rate"] <= row["confounding_hi"]
        assert row["fid_extractor"].startswith("domain:shapes:") and row["fid_samples"] == valid.height
        assert row["fid"] > 0 and row["fid_reference_samples"] == 400  # every test image (n_test 400)
        assert len(row["deletion_curve"]) == 11 and 0 <= row["deletion_area"] <= 1
