"""Streamed `tabular` and `text` splits: `open_split(...).take(index)` equals `load_dataset(...).subset(index)`,
and a take reads and decodes only its rows (Parquet: only the row groups holding them)."""
from __future__ import annotations

import inspect
import io
import pickle

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.data import load_dataset, open_split
from engine.data import tabular as tabular_module
from engine.data import text as text_module
from engine.data.tabular import TabularSource
from engine.data.text import TextSource
from tests.fixtures.sources import SpyFragment, assert_same_split, assert_streamed_take_matches, shuffled_index

N_ROWS, GROUP = 120, 10


def _frame(n: int = N_ROWS) -> pl.DataFrame:
    rng = np.random.default_rng(7)
    return pl.DataFrame({
        "age": rng.integers(18, 90, n), "income": rng.normal(50_000, 10_000, n), "flag": rng.random(n) < 0.5,
        "city": rng.choice(["a", "b", "c"], n), "outcome": rng.choice(["yes", "no", "maybe"], n),
        "part": ["test" if i % 4 == 0 else "train" for i in range(n)], "code": [i % 3 for i in range(n)],
    })


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """The same table as CSV and as Parquet in row groups of GROUP rows."""
    root = tmp_path_factory.mktemp("tables")
    df = _frame()
    df.write_csv(root / "t.csv")
    pq.write_table(df.to_arrow(), root / "t.parquet", row_group_size=GROUP)
    return {"csv": str(root / "t.csv"), "parquet": str(root / "t.parquet")}


def _counting_reads(source) -> list[int]:
    """Rows of every table the source's file reader returns (what a take holds before encoding)."""
    held, read = [], source.table.read

    def counting(rows, columns):
        out = read(rows, columns)
        held.append(len(out))
        return out

    source.table.read = counting
    return held


SPEC = {"features": {"age": {"direction": "increase"}, "city": {"immutable": True}}}
TABULAR_OPTIONS = [
    {},
    {"split_column": "part", "feature_columns": ["income", "flag"]},
    {"split_column": "code", "test_partitions": [2]},
    {"test_fraction": 0.3, "seed": 2, "feature_columns": "age"},
    {"schema": "infer"},
    {"schema": SPEC, "split_column": "part"},
    {"schema": {"infer": False, "features": {"age": {}, "city": {}}}, "test_fraction": 0.5},
]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("options", TABULAR_OPTIONS, ids=lambda o: "-".join(o) or "defaults")
def test_tabular_take_equals_load_subset(tables, fmt, split, options):
    full = load_dataset("tabular", split, path=tables[fmt], label_column="outcome", **options)
    source = open_split("tabular", split, path=tables[fmt], label_column="outcome", **options)
    assert isinstance(source, TabularSource) and source.streaming and source.rows_read == 0
    assert len(source) == len(full) and torch.equal(source.labels, full.y) and len(source.info) == 0
    assert source.info.input_shape == full.input_shape and source.info.schema == full.schema
    assert_same_split(source.take(np.arange(0)), full.subset(torch.zeros(0, dtype=torch.int64)))
    index = shuffled_index(len(full))
    assert_same_split(source.take(index), full.subset(torch.as_tensor(index)))
    assert_same_split(source.take(np.array([-1, -2])), full.subset(torch.tensor([-1, -2])))
    assert_same_split(next(source.blocks(np.arange(len(full)), len(full))), full)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("schema", [None, "infer"])
def test_tabular_take_reads_only_its_rows(tables, fmt, schema):
    source = open_split("tabular", path=tables[fmt], label_column="outcome", split_column="part", schema=schema)
    assert len(source) == 90 and source.rows_read == 0  # open reads columns' statistics, no row of x
    held = _counting_reads(source)
    rows = source.take(np.array([80, 3, 3, 41, 0, 89]))
    assert len(rows) == 6 and held == [5] and source.rows_read == 5  # 5 distinct rows read, each once
    source.take([7])
    assert held == [5, 1] and source.rows_read == 6


@pytest.mark.parametrize("schema", [None, SPEC])
def test_tabular_parquet_take_reads_only_the_row_groups_holding_the_rows(tables, schema):
    source = open_split("tabular", path=tables["parquet"], label_column="outcome", split_column="part",
                        schema=schema)
    seen = []
    source.table.index.fragments = [SpyFragment(f, seen) for f in source.table.index.fragments]
    index = np.array([80, 3, 41, 4])
    file_rows = source.rows[index]
    source.take(index)
    assert seen == sorted(set((file_rows // GROUP).tolist())) and len(seen) < N_ROWS // GROUP


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_tabular_fsspec_memory_and_pickled_source(fmt):
    import fsspec

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    df = _frame(60)
    df.write_csv(buf) if fmt == "csv" else pq.write_table(df.to_arrow(), buf, row_group_size=8)
    fs.pipe(f"/cfaudit-tables/t.{fmt}", buf.getvalue())
    try:
        options = {"path": f"memory://cfaudit-tables/t.{fmt}", "label_column": "city", "split_column": "part"}
        for schema in (None, "infer"):
            assert_streamed_take_matches("tabular", "test", schema=schema, seed=1, pickled=True, **options)
    finally:
        fs.rm("/cfaudit-tables", recursive=True)


def test_tabular_s3_csv_and_parquet(s3):
    import fsspec

    fs = fsspec.filesystem("s3")
    df = _frame(60)
    for fmt in ("csv", "parquet"):
        buf = io.BytesIO()
        df.write_csv(buf) if fmt == "csv" else pq.write_table(df.to_arrow(), buf, row_group_size=8)
        fs.pipe(s3.url("tables", f"t.{fmt}"), buf.getvalue())
        options = {"path": s3.url("tables", f"t.{fmt}"), "label_column": "outcome", "schema": SPEC}
        assert_streamed_take_matches("tabular", seed=2, **options)


def _message(call) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        call()
    return str(err.value)


@pytest.mark.parametrize("options", [
    {"label_column": "target"},
    {"label_column": "outcome", "feature_columns": ["age", "weight"]},
    {"label_column": "outcome", "feature_columns": ["city"]},
    {"label_column": "outcome", "split_column": "nope"},
    {"label_column": "outcome", "schema": {"features": {"salary": {}}}},
    {"label_column": "outcome", "schema": {"features": {"outcome": {}}}},
    {"label_column": "outcome", "test_fraction": 1.0},
])
def test_tabular_errors_match_load_dataset(tables, options):
    message = _message(lambda: load_dataset("tabular", path=tables["csv"], **options))
    assert _message(lambda: open_split("tabular", path=tables["csv"], **options)) == message


def test_tabular_bad_values_named_as_before(tmp_path):
    df = pl.DataFrame({"a": [1.0, float("nan"), 3.0, 4.0], "b": [1, None, 3, 4], "y": [0, 1, 0, 1]})
    df.write_parquet(tmp_path / "t.parquet")
    path = str(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: column 'b' has 1 null values"):
        open_split("tabular", path=path, label_column="y")
    with pytest.raises(ValueError, match=r"feature columns \['a'\] hold NaN or infinite values"):
        open_split("tabular", path=path, label_column="y", feature_columns=["a"])
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        open_split("tabular", path=str(tmp_path / "missing.csv"), label_column="y")
    with pytest.raises(ValueError, match=r"must end in one of"):
        open_split("tabular", path=str(tmp_path / "t.xlsx"), label_column="y")


def test_openers_signatures_match_the_loaders():
    for opener, loader in [(tabular_module.open_tabular, tabular_module.load_tabular),
                           (text_module.open_text, text_module.load_text)]:
        assert inspect.signature(opener).parameters == inspect.signature(loader).parameters


# text -----------------------------------------------------------------------------------------------------

WORDS = ["the", "movie", "film", "is", "good", "great", "bad", "awful", "not", "do", "n't", "it", "'s", ".", ",",
         "pad", "after", "-", "effects", "a", "plot"]
SENTENCES = [("The movie is good.", "pos"), ("The film is great, it's good.", "pos"), ("Bad.", "neg"),
             ("The plot is awful; I don't care.", "neg"), ("After-effects: good good good good good good", "pos"),
             ("It's not bad", "neg"), ("A great film.", "pos"), ("Awful movie.", "neg"), ("A good film.", "pos"),
             ("Not a great plot.", "meh"), ("The film is a film.", "meh"), ("It is not awful.", "meh"),
             ("Good plot, bad film.", "meh"), ("The movie is bad.", "neg"), ("Great great movie.", "pos")]


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """A 4-d GloVe-format directory and two corpora: binary (pos/neg) and three classes."""
    root = tmp_path_factory.mktemp("text")
    vectors = np.random.default_rng(0).normal(size=(len(WORDS), 4)).astype(np.float32)
    np.save(root / "glove_6B_50d_emb.npy", vectors)
    pq.write_table(pa.table({"index": WORDS}), root / "glove_6B_index.parquet")
    for name, rows in [("binary", [r for r in SENTENCES if r[1] != "meh"]), ("three", SENTENCES)]:
        (root / f"{name}.csv").write_text("sentence,sentiment\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    return root


TEXT_OPTIONS = [{}, {"max_length": 6, "test_fraction": 0.25}, {"limit": 3, "seed": 2, "metric": "cosine"}]


@pytest.mark.parametrize("corpus", ["binary", "three"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("options", TEXT_OPTIONS, ids=lambda o: "-".join(o) or "defaults")
def test_text_take_equals_load_subset(text_files, corpus, split, options):
    options = {"corpus": str(text_files / f"{corpus}.csv"), "glove": str(text_files), "text_column": "sentence",
               "label_column": "sentiment", **options}
    full = load_dataset("text", split, **options)
    source = open_split("text", split, **options)
    assert isinstance(source, TextSource) and source.streaming and source.rows_read == 0
    assert len(source) == len(full) and torch.equal(source.labels, full.y) and "texts" not in source.info.meta
    assert source.info.input_shape == full.input_shape and source.info.schema is full.schema
    assert (full.attributes is not None) == (corpus == "binary")
    index = shuffled_index(len(full))
    want = full.subset(torch.as_tensor(index))
    assert_same_split(source.take(index), want, texts=[full.meta["texts"][i] for i in index.tolist()])
    assert_same_split(source.take(np.arange(0)), want.subset(torch.zeros(0, dtype=torch.int64)), texts=[])
    assert_same_split(source.take(np.arange(len(full))), full)


def test_text_take_embeds_only_its_rows(text_files, monkeypatch):
    source = open_split("text", corpus=str(text_files / "three.csv"), glove=str(text_files),
                        text_column="sentence", label_column="sentiment")
    again = pickle.loads(pickle.dumps(source))  # the split's sentences and token ids travel, no vectors [N, L, E]
    assert torch.equal(again.take([1]).x, source.take([1]).x) and source.rows_read == 1
    embedded, embed = [], source.vocab.embed

    def counting(ids):
        embedded.append(len(ids))
        return embed(ids)

    monkeypatch.setattr(source.vocab, "embed", counting)
    rows = source.take([4, 0, 4, 2])
    assert rows.x.shape[0] == 4 and embedded == [3] and source.rows_read == 1 + 3
    assert rows.meta["texts"] == [source.texts[i] for i in (4, 0, 4, 2)]
