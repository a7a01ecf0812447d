"""Row-level reads of Parquet datasets: only the row groups that hold the rows asked for are read."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

# Rows per Arrow batch when reading a row group: a writer's default group can hold a whole file, so a group
# is streamed and only the wanted rows of each batch are kept (transient bytes ~ this many rows).
_READ_BATCH = 256


def _streamed_pages():
    """Scan options that read a column chunk page by page instead of whole (Arrow's default pre-buffers it)."""
    import pyarrow.dataset as pads  # deferred: pyarrow.dataset loads only when a Parquet split is scanned

    return pads.ParquetFragmentScanOptions(use_buffered_stream=True, buffer_size=1 << 20, pre_buffer=False)


class RowGroupIndex:
    """Where each row of a Parquet dataset lives, from the files' footers: row group k (of file
    `fragment[k]`, id `row_group[k]` there) holds the dataset's rows [starts[k], starts[k + 1]).

    where: the dataset named in errors (e.g. "parquet_images").
    """

    def __init__(self, data, where: str = "parquet_images") -> None:
        self.where = where
        self.fragments = list(data.get_fragments())  # dataset order = the row order of data.to_table()
        fragment, row_group, counts = [], [], []
        for f, frag in enumerate(self.fragments):
            frag.ensure_complete_metadata()
            for rg in frag.row_groups:
                fragment.append(f)
                row_group.append(rg.id)
                counts.append(rg.num_rows)
        self.fragment = np.array(fragment, dtype=np.int64)
        self.row_group = np.array(row_group, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def read(self, rows: np.ndarray, columns: list[str], schema: pa.Schema) -> pa.Table:
        """Global rows [K] (any order) -> their `columns`, reading only the row groups that hold them."""
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        group = np.searchsorted(self.starts, ordered, side="right") - 1
        batches = []
        for lo, hi in _runs(group):
            k = group[lo]
            offsets = ordered[lo:hi] - self.starts[k]
            part = self.fragments[self.fragment[k]].subset(row_group_ids=[int(self.row_group[k])])
            start = 0
            for batch in part.to_batches(schema=schema, columns=columns, batch_size=_READ_BATCH,
                                         batch_readahead=1, fragment_readahead=1,
                                         fragment_scan_options=_streamed_pages()):
                first, last = np.searchsorted(offsets, [start, start + batch.num_rows])
                if last > first:
                    batches.append(batch.take(pa.array(offsets[first:last] - start)))
                start += batch.num_rows
                if start > offsets[-1]:
                    break  # the rest of the group holds no wanted row
        table = pa.Table.from_batches(batches)
        if table.num_rows != len(rows):
            raise ValueError(f"{self.where}: read {table.num_rows} of {len(rows)} rows; "
                             f"the files changed since the split was opened")
        return table if (order == np.arange(len(rows))).all() else table.take(pa.array(np.argsort(order)))


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """Sorted values [K] -> [(lo, hi)] of each run of equal values."""
    cuts = np.flatnonzero(np.diff(values)) + 1
    edges = np.concatenate([[0], cuts, [len(values)]])
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))
