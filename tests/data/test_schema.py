"""Tabular feature schema: inference, user corrections and their errors, encoding, projection, changes."""
import pickle

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from engine.cli import main as cli
from engine.data import load_dataset
from engine.data.schema import TabularSchema, result_columns
from engine.data.schema_infer import infer_schema, resolve_schema


@pytest.fixture
def table() -> pl.DataFrame:
    return pl.DataFrame({
        "age": [25, 40, 33, 61],
        "income": [1200.5, 3400.0, 2100.25, 800.0],
        "job": ["clerk", "manager", "clerk", "none"],
        "sex": ["f", "m", "m", "f"],
        "owns_car": [True, False, True, True],
        "grade": ["low", "high", "mid", "low"],
        "y": [0, 1, 1, 0],
    })


SPEC = {"features": {"age": {"direction": "increase"}, "sex": {"immutable": True},
                     "grade": {"type": "ordinal", "categories": ["low", "mid", "high"]}}}


def schema_of(table: pl.DataFrame) -> TabularSchema:
    return resolve_schema(SPEC, table, [c for c in table.columns if c != "y"], "t.csv")


def test_inference_types_ranges_and_categories(table):
    s = infer_schema(table, [c for c in table.columns if c != "y"])
    by = {f.name: f for f in s.features}
    assert by["age"].type == "integer" and by["age"].range == (25.0, 61.0)
    assert by["income"].type == "continuous" and by["income"].range == (800.0, 3400.0)
    assert by["job"].type == "categorical" and by["job"].categories == ("clerk", "manager", "none")
    assert by["owns_car"].categories == ("false", "true")
    assert s.width == 1 + 1 + 3 + 2 + 2 + 3
    assert "6 features -> 12 encoded columns" in s.describe()


def test_user_corrections_merge_with_inference(table):
    s = schema_of(table)
    by = {f.name: f for f in s.features}
    assert by["age"].direction == "increase" and by["age"].range == (25.0, 61.0)  # range still inferred
    assert by["sex"].immutable and by["sex"].categories == ("f", "m")
    assert by["grade"].type == "ordinal" and by["grade"].bounds == (0.0, 2.0)
    # infer: false takes only the listed features, which must then be complete
    only = resolve_schema({"infer": False, "features": {"age": {}, "job": {"type": "categorical"}}}, table,
                          ["age"], "t.csv")
    assert only.names == ["age", "job"]


@pytest.mark.parametrize("spec, message", [
    ({"features": {"salary": {}}}, r"schema features \['salary'\] are not columns"),
    ({"features": {"age": {"type": "float"}}}, r"feature 'age': type: Input should be"),
    ({"features": {"age": {"range": [9, 3]}}}, r"feature 'age'.*range.*lo <= hi"),
    ({"features": {"job": {"direction": "increase"}}}, r"feature 'job'.*categories have no order"),
    ({"features": {"age": {"immutable": True, "direction": "increase"}}}, r"feature 'age'.*cannot also"),
    ({"features": {"age": {"mutable": False}}}, r"feature 'age': mutable: Extra inputs"),
    ({"features": {"age": {"type": "integer", "range": [1.5, 90]}}}, r"feature 'age'.*must hold integers"),
    ({"featurs": {}}, r"unknown field\(s\) \['featurs'\]"),
    ({"infer": "yes"}, r"'infer' must be true or false"),
    ("nope.yaml", r"schema file nope.yaml does not exist"),
])
def test_schema_errors_name_the_feature_and_field(table, spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        resolve_schema(spec, table, ["age", "job"], "t.csv")


def test_schema_file_yaml_error_names_the_file(table, tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("features: {age: [1,\n")
    with pytest.raises(ValueError, match=r"schema file .*s.yaml is not valid YAML/JSON"):
        resolve_schema(str(bad), table, ["age"], "t.csv")


def test_encode_errors_name_feature_and_value(table):
    s = schema_of(table)
    with pytest.raises(ValueError, match=r"feature 'job' holds values \['pilot'\] outside its categories"):
        s.encode(table.with_columns(pl.lit("pilot").alias("job")))
    with pytest.raises(ValueError, match=r"feature 'age' has 4 values outside its range \[25, 61\], e.g. 99"):
        s.encode(table.with_columns(pl.lit(99).alias("age")))
    with pytest.raises(ValueError, match=r"feature 'age' is integer but holds non-integral values, e.g. 30.5"):
        s.encode(table.with_columns(pl.lit(30.5).alias("age")))
    with pytest.raises(ValueError, match=r"schema feature 'sex' is not a column"):
        s.encode(table.drop("sex"))


def test_encode_decode_round_trip_on_german_credit():
    ds = load_dataset("german_credit", "test")
    raw = pl.read_csv("engine/data/files/german_credit.csv")
    records = ds.schema.decode(ds.x)
    assert len(records) == 200 and ds.x.shape == (200, ds.schema.width)
    assert set(records[0]) == set(raw.columns) - {"credit"}
    # every decoded record is a row of the raw table
    rows = {tuple(str(v) for v in r) for r in raw.drop("credit").iter_rows()}
    assert all(tuple(str(v) for v in rec.values()) in rows for rec in records)
    assert np.allclose(ds.schema.encode(pl.DataFrame(records)), ds.x.numpy(), atol=1e-6)


def test_projection_gives_valid_records(table):
    s = schema_of(table)
    codec = s.codec()
    x0 = torch.from_numpy(s.encode(table))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.rand(x0.shape, generator=g) * 1.6 - 0.3  # also outside [0, 1]
        p = codec.project(x, x0)
        assert torch.equal(codec.project(p, x0), p)  # a fixed point: already valid
        assert p.min() >= 0 and p.max() <= 1
        recs, orig = s.decode(p), s.decode(x0)
        for r, o in zip(recs, orig):
            assert isinstance(r["age"], int) and 25 <= r["age"] <= 61 and r["age"] >= o["age"]  # direction
            assert r["sex"] == o["sex"]  # immutable
            assert r["grade"] in ("low", "mid", "high")
        groups = {"job": 3, "sex": 2, "owns_car": 2}
        start = 0
        for f in s.features:
            if f.name in groups:
                block = p[:, start:start + f.width]
                assert torch.equal(block.sum(1), torch.ones(len(p))) and set(block.unique().tolist()) <= {0.0, 1.0}
            start += f.width
        age = p[:, 0] * 36 + 25
        assert torch.allclose(age, age.round(), atol=1e-4)


def test_changes_count_a_category_switch_once(table):
    s = schema_of(table)
    x0 = torch.from_numpy(s.encode(table))
    changed = table.with_columns(pl.Series("job", ["none", "manager", "manager", "none"]),
                                 pl.Series("age", [30, 40, 33, 61]))
    x1 = torch.from_numpy(s.encode(changed))
    cols = result_columns(s, x0, x1)
    assert cols["l0"].tolist() == [2, 0, 1, 0]
    assert cols["changes"][0] == ["age: 25 -> 30", "job: clerk -> none"]
    assert cols["changes"][2] == ["job: clerk -> manager"]
    assert cols["l1_units"][0] == pytest.approx(5 + 1)
    assert cols["l1"][0] == pytest.approx(5 / 36 + 1, abs=1e-6)
    assert '"age": 30' in cols["record_cf"][0] and '"job": "none"' in cols["record_cf"][0]


def test_schema_pickles_and_compares(table):
    s = schema_of(table)
    s.codec()
    again = pickle.loads(pickle.dumps(s))
    assert again == s and hash(again) == hash(s) and again.codec().width == s.width


def test_tabular_loader_with_schema_and_cli_round_trip(table, tmp_path, capsys):
    path = tmp_path / "t.csv"
    table.write_csv(path)
    ds = load_dataset("tabular", "train", path=str(path), label_column="y", schema=SPEC, test_fraction=0.5)
    assert ds.schema == schema_of(table) and ds.feature_names == ds.schema.columns
    assert ds.x.shape == (2, ds.schema.width) and ds.meta["schema"]["features"]["sex"]["immutable"]
    out = tmp_path / "schema.yaml"
    assert cli(["schema", str(path), "--label", "y", "--out", str(out)]) == 0
    assert "6 features -> 12 encoded columns" in capsys.readouterr().err
    written = yaml.safe_load(out.read_text())
    assert written["infer"] is False and written["features"]["job"]["categories"] == ["clerk", "manager", "none"]
    again = load_dataset("tabular", "train", path=str(path), label_column="y", schema=str(out), test_fraction=0.5)
    assert again.schema == infer_schema(table, [c for c in table.columns if c != "y"])
    assert cli(["schema", str(path), "--label", "nope"]) == 2
    assert "columns ['nope'] not found" in capsys.readouterr().err


def test_german_credit_ships_with_its_schema():
    ds = load_dataset("german_credit")
    by = {f.name: f for f in ds.schema.features}
    assert ds.x.shape == (800, 57) and ds.class_names == ["bad", "good"]
    assert by["personal_status"].immutable and by["foreign_worker"].immutable
    assert by["age"].direction == "increase" and by["employment"].type == "ordinal"
    assert np.isclose(ds.y.float().mean().item(), 0.7)
