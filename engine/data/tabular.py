"""`tabular`: users' tables from CSV or Parquet (chosen by extension).

Without a `schema` option every feature is numeric and min-max scaled with train statistics (no projection).
With one (engine.data.schema) features may be integer, ordinal or categorical (one-hot), immutable or
monotone; they are encoded by the schema's ranges and methods project counterfactuals onto real records.

`open_tabular` streams a split: at open it reads the label and split columns and the statistics the
encoding needs (engine.data.table_file: Parquet by column chunks; CSV by scans of the file), and each `take`
reads and encodes only its rows. `load_tabular` is `open_tabular(...).take(every row)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from engine.data._common import (check_fraction, check_int, check_split, encode_labels, minmax_apply, minmax_fit,
                                 missing_column, row_partition, split_indices, url_to_fs)
from engine.data.base import ArrayDataset
from engine.data.schema_infer import resolve_schema
from engine.data.source import StreamingSource
from engine.data.table_file import FORMATS, ColumnView, TableFile, table_format

__all__ = ["FORMATS", "TabularSource", "load_tabular", "open_tabular", "read_table"]


def read_table(path: str):
    """A polars DataFrame from a CSV or Parquet file (local path or fsspec URI), read whole."""
    import polars as pl  # deferred: polars loads only for tabular data

    fmt = table_format(path)
    fs, fpath = url_to_fs(path)
    if not fs.exists(fpath):
        raise FileNotFoundError(f"tabular: file {path} (option 'path') does not exist")
    with fs.open(fpath, "rb") as f:
        return pl.read_csv(f) if fmt == "csv" else pl.read_parquet(f)


@dataclass(frozen=True)
class MinMaxEncoding:
    """Numeric features as float64, min-max scaled by the train split's (lo, scale) [D], clipped to [0, 1]."""

    columns: list[str]
    lo: np.ndarray
    scale: np.ndarray

    @property
    def width(self) -> int:
        return len(self.columns)

    def __call__(self, df, where: str) -> np.ndarray:
        import polars as pl  # deferred: polars loads only for tabular data

        x = df.select([pl.col(c).cast(pl.Float64) for c in self.columns]).to_numpy(order="c")  # row-major, as before
        return minmax_apply(x, self.lo, self.scale)


@dataclass(frozen=True)
class SchemaEncoding:
    """Features encoded by a TabularSchema (engine.data.schema)."""

    schema: Any

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    @property
    def width(self) -> int:
        return self.schema.width

    def __call__(self, df, where: str) -> np.ndarray:
        return self.schema.encode(df, where)


class TabularSource(StreamingSource):
    """A `tabular` split: the split's file rows and labels held; each `take` reads and encodes its rows."""

    def __init__(self, split: str, *, table: TableFile, rows: np.ndarray, y: np.ndarray, class_names: list[str],
                 encoding, feature_names: list[str], schema: Any, meta: dict) -> None:
        self.table, self.rows, self.encoding = table, rows.astype(np.int64), encoding
        self.where = f"tabular {table.path}"
        info = ArrayDataset(name="tabular", x=torch.zeros(0, encoding.width), y=torch.zeros(0, dtype=torch.int64),
                            class_names=class_names, kind="tabular", feature_names=feature_names, meta=meta,
                            schema=schema)
        super().__init__(info, torch.from_numpy(y), split)

    def _read(self, positions: np.ndarray) -> tuple[torch.Tensor, None]:
        df = self.table.read(self.rows[positions], self.encoding.columns)
        return torch.from_numpy(self.encoding(df, self.where)), None


def open_tabular(split: str = "train", *, path: str, label_column: str,
                 feature_columns: Optional[Sequence[str]] = None, split_column: Optional[str] = None,
                 test_partitions: Optional[Sequence[int]] = None, test_fraction: float = 0.2,
                 seed: int = 0, schema: Any = None) -> TabularSource:
    """Open a split for `take` (options and errors as `load_tabular`); reads the label and split columns and
    the encoding's statistics, never the table whole (a `schema` inference reads one column at a time)."""
    check_split("tabular", split)
    test_fraction = check_fraction("tabular", "test_fraction", test_fraction, open_ends=True)
    seed = check_int("tabular", "seed", seed, minimum=0)
    table = TableFile(path)
    where = f"tabular {path}"
    for option, column in [("label_column", label_column), ("split_column", split_column)]:
        if column is not None and column not in table.columns:
            raise missing_column(where, option, column, table.columns)
    meta = {"source": str(path), "label_column": label_column, "split_column": split_column, "seed": seed}
    split_rows = _SplitRows(split_column, test_partitions, test_fraction, seed, where)
    if schema is not None:
        return _open_with_schema(table, split, schema, where, label_column, feature_columns, split_rows, meta)
    features = _numeric_features(table, feature_columns, label_column, split_column, where)
    _check_nulls(table, [label_column, *features], where)
    keys = _keys(table, label_column, split_column)
    y, class_names = encode_labels(keys[label_column].to_numpy(), None, f"{where} column {label_column!r}",
                                   dense_ints=False)
    train, rows = split_rows(keys, y, "train"), split_rows(keys, y, split)
    if not len(train) or not len(rows):
        raise ValueError(f"{where}: split {split!r} (or the train split its scaling needs) has no rows")
    lo, scale = _train_minmax(table, features, train, where)
    return TabularSource(split, table=table, rows=rows, y=y[rows], class_names=class_names,
                         encoding=MinMaxEncoding(features, lo, scale), feature_names=features, schema=None,
                         meta={**meta, "feature_min": lo.tolist(), "feature_scale": scale.tolist()})


def load_tabular(split: str = "train", *, path: str, label_column: str,
                 feature_columns: Optional[Sequence[str]] = None, split_column: Optional[str] = None,
                 test_partitions: Optional[Sequence[int]] = None, test_fraction: float = 0.2,
                 seed: int = 0, schema: Any = None) -> ArrayDataset:
    """x [N, D] float32 in [0, 1] (min-max by the train split; test clipped); y [N] int64.

    feature_columns: default every numeric or boolean column other than the label and split columns.
    Label values map to class indices in sorted order (class_names are their strings).
    schema: None, "infer", a mapping or a YAML/JSON file path (engine.data.schema); then feature_columns
    default every column but the label and split columns, of any type, and x holds the schema's encoding.
    Splits: `split_column` ("train"/"test" or 0 = train, test = `test_partitions`, default non-zero codes),
    else a stratified `test_fraction` split by `seed`.
    """
    source = open_tabular(split, path=path, label_column=label_column, feature_columns=feature_columns,
                          split_column=split_column, test_partitions=test_partitions, test_fraction=test_fraction,
                          seed=seed, schema=schema)
    return source.take(np.arange(len(source)))


@dataclass(frozen=True)
class _SplitRows:
    """A split's sorted file rows, from the split column's values or a stratified split of the labels."""

    split_column: Optional[str]
    test_partitions: Optional[Sequence[int]]
    test_fraction: float
    seed: int
    where: str

    def __call__(self, keys, y: np.ndarray, split: str) -> np.ndarray:
        if self.split_column is None:
            return split_indices(y, split, self.test_fraction, self.seed)
        return np.flatnonzero(row_partition(keys[self.split_column].to_numpy(), split, self.test_partitions,
                                            f"{self.where} column {self.split_column!r}"))


def _keys(table: TableFile, label_column: str, split_column: Optional[str]):
    """The label and split columns, whole (one pass)."""
    return table.collect(lambda lf: lf.select(list(dict.fromkeys([label_column, split_column] if split_column
                                                                   else [label_column]))))


def _numeric_features(table: TableFile, feature_columns: Optional[Sequence[str]], label_column: str,
                      split_column: Optional[str], where: str) -> list[str]:
    """The feature columns asked for (each numeric or boolean), or by default every such column."""
    import polars as pl  # deferred: polars loads only for tabular data

    if feature_columns is None:
        skip = {label_column, split_column}
        features = [c for c, t in table.schema.items() if c not in skip and (t.is_numeric() or t == pl.Boolean)]
        if not features:
            raise ValueError(f"{where}: no numeric feature columns besides {label_column!r}; "
                             f"columns: {table.columns}")
        return features
    features = [feature_columns] if isinstance(feature_columns, str) else list(feature_columns)
    for column in features:
        if column not in table.columns:
            raise missing_column(where, "feature_columns", column, table.columns)
        dtype = table.schema[column]
        if not (dtype.is_numeric() or dtype == pl.Boolean):
            raise ValueError(f"{where}: feature column {column!r} must be numeric, got {dtype}")
    return features


def _check_nulls(table: TableFile, columns: list[str], where: str) -> None:
    """ValueError naming the first of `columns` holding nulls (one pass)."""
    import polars as pl  # deferred: polars loads only for tabular data

    counts = table.collect(lambda lf: lf.select([pl.col(c).null_count().alias(str(i))
                                                 for i, c in enumerate(columns)])).row(0)
    for column, nulls in zip(columns, counts):
        if nulls:
            raise ValueError(f"{where}: column {column!r} has {nulls} null values")


def _train_minmax(table: TableFile, features: list[str], train: np.ndarray,
                  where: str) -> tuple[np.ndarray, np.ndarray]:
    """`minmax_fit` of the features' float64 values on the train rows [D], in one pass that also checks every
    row is finite: the column minima and maxima are exact, so minmax_fit([lo, hi]) gives its (lo, scale)."""
    import polars as pl  # deferred: polars loads only for tabular data

    row = table.free_name()
    is_train = pl.col(row).is_in(pl.Series(train, dtype=pl.get_index_type()).implode())
    values = [pl.col(c).cast(pl.Float64) for c in features]
    d = len(features)
    stats = table.collect(lambda lf: lf.with_row_index(row).select(
        [v.is_finite().all().alias(f"ok{i}") for i, v in enumerate(values)]
        + [v.filter(is_train).min().alias(f"lo{i}") for i, v in enumerate(values)]
        + [v.filter(is_train).max().alias(f"hi{i}") for i, v in enumerate(values)])).row(0)
    ok = np.array(stats[:d], dtype=bool)
    if not ok.all():
        raise ValueError(f"{where}: feature columns {[c for c, good in zip(features, ok) if not good]} "
                         f"hold NaN or infinite values")
    lo, hi = np.array(stats[d:2 * d], dtype=np.float64), np.array(stats[2 * d:], dtype=np.float64)
    return minmax_fit(np.stack([lo, hi]))


def _open_with_schema(table: TableFile, split: str, schema: Any, where: str, label_column: str,
                      feature_columns: Optional[Sequence[str]], split_rows: _SplitRows, meta: dict) -> TabularSource:
    """Encode the table by its feature schema: ranges and categories describe the whole table, so a
    counterfactual record is judged against the same domain whichever split it came from."""
    split_column = split_rows.split_column
    if feature_columns is None:
        columns = [c for c in table.columns if c not in {label_column, split_column}]
    else:
        columns = [feature_columns] if isinstance(feature_columns, str) else list(feature_columns)
        for column in columns:
            if column not in table.columns:
                raise missing_column(where, "feature_columns", column, table.columns)
    keys = _keys(table, label_column, split_column)
    label = keys[label_column]
    if label.null_count():
        raise ValueError(f"{where}: column {label_column!r} has {label.null_count()} null values")
    resolved = resolve_schema(schema, ColumnView(table), columns, where)
    if label_column in resolved.names or (split_column is not None and split_column in resolved.names):
        raise ValueError(f"{where}: the schema lists the label or split column as a feature")
    y, class_names = encode_labels(label.to_numpy(), None, f"{where} column {label_column!r}", dense_ints=False)
    rows = split_rows(keys, y, split)
    if not len(rows):
        raise ValueError(f"{where}: split {split!r} has no rows")
    return TabularSource(split, table=table, rows=rows, y=y[rows], class_names=class_names,
                         encoding=SchemaEncoding(resolved), feature_names=resolved.columns, schema=resolved,
                         meta={**meta, "schema": resolved.to_mapping()})
