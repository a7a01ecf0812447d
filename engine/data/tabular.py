"""`tabular`: users' tables from CSV or Parquet (chosen by extension).

Without a `schema` option every feature is numeric and min-max scaled with train statistics (no projection).
With one (engine.data.schema) features may be integer, ordinal or categorical (one-hot), immutable or
monotone; they are encoded by the schema's ranges and methods project counterfactuals onto real records.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from engine.data._common import (check_fraction, check_int, check_split, encode_labels, minmax_apply, minmax_fit,
                                 missing_column, row_partition, split_indices, url_to_fs)
from engine.data.base import ArrayDataset

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def read_table(path: str):
    """A polars DataFrame from a CSV or Parquet file (local path or fsspec URI)."""
    import polars as pl

    fmt = next((f for ext, f in FORMATS.items() if str(path).lower().endswith(ext)), None)
    if fmt is None:
        raise ValueError(f"tabular: file {path} (option 'path') must end in one of {list(FORMATS)}")
    fs, fpath = url_to_fs(path)
    if not fs.exists(fpath):
        raise FileNotFoundError(f"tabular: file {path} (option 'path') does not exist")
    with fs.open(fpath, "rb") as f:
        return pl.read_csv(f) if fmt == "csv" else pl.read_parquet(f)


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
    import polars as pl

    check_split("tabular", split)
    test_fraction = check_fraction("tabular", "test_fraction", test_fraction, open_ends=True)
    seed = check_int("tabular", "seed", seed, minimum=0)
    df = read_table(path)
    where = f"tabular {path}"
    for option, column in [("label_column", label_column), ("split_column", split_column)]:
        if column is not None and column not in df.columns:
            raise missing_column(where, option, column, df.columns)
    if schema is not None:
        return _with_schema(df, split, schema, where, label_column=label_column, feature_columns=feature_columns,
                            split_column=split_column, test_partitions=test_partitions,
                            test_fraction=test_fraction, seed=seed, path=path)
    if feature_columns is None:
        skip = {label_column, split_column}
        feature_columns = [c for c, t in df.schema.items()
                           if c not in skip and (t.is_numeric() or t == pl.Boolean)]
        if not feature_columns:
            raise ValueError(f"{where}: no numeric feature columns besides {label_column!r}; "
                             f"columns: {df.columns}")
    else:
        feature_columns = [feature_columns] if isinstance(feature_columns, str) else list(feature_columns)
        for column in feature_columns:
            if column not in df.columns:
                raise missing_column(where, "feature_columns", column, df.columns)
            dtype = df.schema[column]
            if not (dtype.is_numeric() or dtype == pl.Boolean):
                raise ValueError(f"{where}: feature column {column!r} must be numeric, got {dtype}")
    for column in [label_column, *feature_columns]:
        nulls = df[column].null_count()
        if nulls:
            raise ValueError(f"{where}: column {column!r} has {nulls} null values")

    y, class_names = encode_labels(df[label_column].to_numpy(), None, f"{where} column {label_column!r}",
                                   dense_ints=False)
    if split_column is not None:
        values = df[split_column].to_numpy()
        train = np.flatnonzero(row_partition(values, "train", test_partitions, f"{where} column {split_column!r}"))
        rows = train if split == "train" else np.flatnonzero(
            row_partition(values, "test", test_partitions, f"{where} column {split_column!r}"))
    else:
        train = split_indices(y, "train", test_fraction, seed)
        rows = train if split == "train" else split_indices(y, "test", test_fraction, seed)
    if not len(train) or not len(rows):
        raise ValueError(f"{where}: split {split!r} (or the train split its scaling needs) has no rows")
    x = df.select([pl.col(c).cast(pl.Float64) for c in feature_columns]).to_numpy()
    if not np.isfinite(x).all():
        bad = [c for c, ok in zip(feature_columns, np.isfinite(x).all(axis=0)) if not ok]
        raise ValueError(f"{where}: feature columns {bad} hold NaN or infinite values")
    lo, scale = minmax_fit(x[train])
    return ArrayDataset(
        name="tabular", x=torch.from_numpy(minmax_apply(x[rows], lo, scale)), y=torch.from_numpy(y[rows]),
        class_names=class_names, kind="tabular", feature_names=list(feature_columns),
        meta={"source": str(path), "label_column": label_column, "split_column": split_column, "seed": seed,
              "feature_min": lo.tolist(), "feature_scale": scale.tolist()})


def _split_rows(df, split: str, y: np.ndarray, where: str, split_column: Optional[str],
                test_partitions: Optional[Sequence[int]], test_fraction: float, seed: int) -> np.ndarray:
    if split_column is not None:
        values = df[split_column].to_numpy()
        rows = np.flatnonzero(row_partition(values, split, test_partitions, f"{where} column {split_column!r}"))
    else:
        rows = split_indices(y, split, test_fraction, seed)
    if not len(rows):
        raise ValueError(f"{where}: split {split!r} has no rows")
    return rows


def _with_schema(df, split: str, schema: Any, where: str, *, label_column: str,
                 feature_columns: Optional[Sequence[str]], split_column: Optional[str],
                 test_partitions: Optional[Sequence[int]], test_fraction: float, seed: int,
                 path: str) -> ArrayDataset:
    """Encode the table by its feature schema: ranges and categories describe the whole table, so a
    counterfactual record is judged against the same domain whichever split it came from."""
    from engine.data.schema_infer import resolve_schema

    if feature_columns is None:
        columns = [c for c in df.columns if c not in {label_column, split_column}]
    else:
        columns = [feature_columns] if isinstance(feature_columns, str) else list(feature_columns)
        for column in columns:
            if column not in df.columns:
                raise missing_column(where, "feature_columns", column, df.columns)
    label = df[label_column]
    if label.null_count():
        raise ValueError(f"{where}: column {label_column!r} has {label.null_count()} null values")
    resolved = resolve_schema(schema, df, columns, where)
    if label_column in resolved.names or (split_column is not None and split_column in resolved.names):
        raise ValueError(f"{where}: the schema lists the label or split column as a feature")
    y, class_names = encode_labels(label.to_numpy(), None, f"{where} column {label_column!r}", dense_ints=False)
    rows = _split_rows(df, split, y, where, split_column, test_partitions, test_fraction, seed)
    x = resolved.encode(df[rows], where)
    return ArrayDataset(
        name="tabular", x=torch.from_numpy(x), y=torch.from_numpy(y[rows]), class_names=class_names,
        kind="tabular", feature_names=resolved.columns, schema=resolved,
        meta={"source": str(path), "label_column": label_column, "split_column": split_column, "seed": seed,
              "schema": resolved.to_mapping()})
