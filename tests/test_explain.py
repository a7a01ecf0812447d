"""One unit end to end without Ray: targets -> method -> metrics -> Arrow rows, with the oracle's reading."""
import polars as pl
import pyarrow as pa
import torch

from engine.explain import explain_unit
from engine.methods import make_method
from engine.models.handles import ModelBundle
from engine.store.results import results_schema

META = {"job": "t", "spec_hash": "h", "model_id": "m", "method": "gradual_construction", "config_hash": "c",
        "unit_id": "u"}


def test_gc_counterfactuals_of_the_confounded_model_flip_the_marker(confounded_cnn, shapes_oracle,
                                                                    shapes_biased_train, shapes_test):
    bundle = ModelBundle(classifier=confounded_cnn, oracle=shapes_oracle, reference=shapes_biased_train)
    n = 12
    table = explain_unit(make_method("gradual_construction", {"sigma": 20}), bundle, shapes_test.x[:n],
                         torch.arange(n), shapes_test.y[:n], "flip", seed=0, meta=META)
    assert table.schema.equals(results_schema((3, 32, 32), 2))
    df = pl.from_arrow(table)
    ok = df.filter(pl.col("success"))
    assert ok.height >= 0.8 * n
    assert (ok["pred_cf"] == ok["target"]).all() and (ok["target"] != ok["pred_orig"]).all()
    # The oracle reads the planted confounder as changed in (nearly) every valid counterfactual.
    marker = ok["oracle_changed"].list.contains("marker").mean()
    assert marker > 0.8, ok["oracle_changed"].to_list()
    assert df["reason"].null_count() == ok.height  # a reason for every row that did not succeed
    assert df["z_l2"].null_count() == n  # an input-space method has no latent


def test_all_targets_expand_rows(fair_cnn, shapes_test):
    bundle = ModelBundle(classifier=fair_cnn)
    table = explain_unit(make_method("wachter", {"max_iter": 5}), bundle, shapes_test.x[:3], torch.arange(3),
                         shapes_test.y[:3], "all", seed=0, meta={**META, "method": "wachter"})
    assert isinstance(table, pa.Table) and table.num_rows == 3  # 2 classes: one other class each
