"""A CSV or Parquet table (local path or fsspec URI) read a few columns or a few rows at a time.

Parquet: queries over every row stream by row group (polars for a local file, Arrow's scanner through
fsspec otherwise), and `read` takes rows from the row groups holding them (`RowGroupIndex`).
CSV has no random access: every query, each `read` included, scans the whole file with polars' streaming
engine, keeping only the rows or aggregates asked for; polars (2.x) holds the file's bytes while it scans
(not its decoded rows), and a file behind another fsspec protocol is fetched for each scan.
Parquet is the format for large tables.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from engine.data._common import url_to_fs
from engine.data.parquet_rows import RowGroupIndex

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def table_format(path: str) -> str:
    """"csv" or "parquet", by the file's extension."""
    fmt = next((f for ext, f in FORMATS.items() if str(path).lower().endswith(ext)), None)
    if fmt is None:
        raise ValueError(f"tabular: file {path} (option 'path') must end in one of {list(FORMATS)}")
    return fmt


class TableFile:
    """One table file: its polars `schema`, lazy queries over every row (`collect`), one whole column
    (`column`) and a set of rows (`read`). Picklable: it holds the path, never the rows."""

    def __init__(self, path: str) -> None:
        import fsspec.implementations.local as local  # deferred: fsspec and polars load only when a table is opened
        import polars as pl  # deferred: polars loads only for tabular data

        self.path, self.format = str(path), table_format(path)
        self.fs, self.fpath = url_to_fs(path)
        if not self.fs.exists(self.fpath):
            raise FileNotFoundError(f"tabular: file {path} (option 'path') does not exist")
        self.local = isinstance(self.fs, local.LocalFileSystem)
        self.local_file = self.local and self.fs.isfile(self.fpath)
        if self.format == "parquet":
            self.data, self.index = self._open_parquet()
        with self._scan() as lf:
            self.schema: pl.Schema = lf.collect_schema()

    def _open_parquet(self):
        import pyarrow as pa  # deferred: pyarrow loads only for a Parquet table
        import pyarrow.dataset as pads  # deferred: pyarrow.dataset loads only when a Parquet table is scanned

        try:
            data = pads.dataset(self.fpath, filesystem=self.fs, format="parquet")
            return data, RowGroupIndex(data, where=f"tabular {self.path}")
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"tabular {self.path} (option 'path'): cannot be read as Parquet: "
                             f"{str(err).splitlines()[-1]}") from None

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names())

    def free_name(self) -> str:
        """A column name the table does not use (for a row index)."""
        name = "__row"
        while name in self.schema:
            name += "_"
        return name

    @contextmanager
    def _scan(self) -> Iterator:
        """A polars LazyFrame over every row (for a remote CSV, valid inside the context only)."""
        import polars as pl  # deferred: polars loads only for tabular data

        if self.format == "parquet":
            # polars' own reader streams a local file by row group; Arrow's scanner serves fsspec and directories
            yield pl.scan_parquet(self.fpath) if self.local_file else pl.scan_pyarrow_dataset(self.data)
        elif self.local:
            yield pl.scan_csv(self.fpath)
        else:
            with self.fs.open(self.fpath, "rb") as handle:
                yield pl.scan_csv(handle)

    def collect(self, query: Callable):
        """`query(LazyFrame over every row) -> LazyFrame`, run by the streaming engine -> DataFrame."""
        with self._scan() as lf:
            return query(lf).collect(engine="streaming")

    def column(self, name: str):
        """One whole column as a polars Series (a pass over the file for CSV, its chunks for Parquet)."""
        return self.collect(lambda lf: lf.select(name)).to_series()

    def read(self, rows: np.ndarray, columns: list[str]):
        """Sorted distinct file rows [K] -> a DataFrame of their `columns` in that order, holding ~K rows."""
        import polars as pl  # deferred: polars loads only for tabular data

        columns = list(dict.fromkeys(columns))
        if self.format == "parquet":
            return pl.from_arrow(self.index.read(rows, columns, self.data.schema))
        row = self.free_name()
        wanted = pl.Series(rows, dtype=pl.get_index_type()).implode()
        df = self.collect(lambda lf: lf.with_row_index(row).filter(pl.col(row).is_in(wanted))
                          .select([row, *columns])).sort(row)
        if len(df) != len(rows):
            raise ValueError(f"tabular {self.path}: read {len(df)} of {len(rows)} rows; "
                             f"the file changed since the split was opened")
        return df.drop(row)


class ColumnView:
    """What `resolve_schema`/`infer_schema` read of a table, `columns` and `view[name]` (one whole column),
    so inference holds one column at a time, never the table. Each `[]` is a pass over a CSV file."""

    def __init__(self, table: TableFile) -> None:
        self.table = table

    @property
    def columns(self) -> list[str]:
        return self.table.columns

    def __getitem__(self, name: str):
        return self.table.column(name)
