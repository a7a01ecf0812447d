"""Parquet files that are not result shards (reports, trial tables, augmentation sets), written atomically through
write_bytes_atomic and read whole or by column, at any fsspec URI."""
from __future__ import annotations

import io

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.store.uri import filesystem, write_bytes_atomic


def write_frame(uri: str, frame: pl.DataFrame) -> None:
    """`frame` as one Parquet file at `uri` (polars' defaults: zstd), written atomically."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    write_bytes_atomic(uri, buffer.getvalue())


def write_arrow(uri: str, table: pa.Table, **options) -> None:
    """`table` as one Parquet file at `uri` (pyarrow's write_table with `options`), written atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, **options)
    write_bytes_atomic(uri, buffer.getvalue())


def read_frame(uri: str) -> pl.DataFrame:
    """The whole Parquet file at `uri` as a polars DataFrame."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return pl.from_arrow(pq.read_table(handle))


def read_columns(uri: str, columns: list[str]) -> pa.Table:
    """Those of `columns` the Parquet file at `uri` has (others skipped), as an Arrow table."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        return parquet.read(columns=[c for c in columns if c in names])
