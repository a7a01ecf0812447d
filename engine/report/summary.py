"""The per model x method summary of an audit, recomputed from <out>/results alone."""
from __future__ import annotations

import io

import polars as pl
import pyarrow.parquet as pq

from engine.store.results import result_files
from engine.store.uri import filesystem, join, write_bytes_atomic

SUMMARY_COLUMNS = ["model_id", "method", "queries", "validity", "mean_l0", "mean_l1", "mean_l2",
                   "mean_iterations", "seconds_per_cf"]


def read_results(out: str, columns: list[str] | None = None) -> pl.DataFrame:
    """All result rows under `out` (any fsspec URI) as one polars frame."""
    files = result_files(out)
    if not files:
        raise FileNotFoundError(f"No results under {join(out, 'results')}: run `cfaudit audit` first")
    fs, _ = filesystem(out)
    paths = [filesystem(f)[1] for f in files]
    table = pq.ParquetDataset(paths, filesystem=fs, partitioning=None).read(columns=columns)
    return pl.from_arrow(table)


def summarize(results: pl.DataFrame) -> pl.DataFrame:
    """Validity over all rows; distances over the valid counterfactuals only (an invalid one has no meaning)."""
    ok = pl.col("success")
    return (results.group_by("model_id", "method").agg(
        pl.len().alias("queries"),
        ok.mean().alias("validity"),
        pl.col("l0").filter(ok).mean().alias("mean_l0"),
        pl.col("l1").filter(ok).mean().alias("mean_l1"),
        pl.col("l2").filter(ok).mean().alias("mean_l2"),
        pl.col("n_iter").mean().alias("mean_iterations"),
        (pl.col("seconds").sum() / pl.len()).alias("seconds_per_cf"),
    ).sort("model_id", "method").select(SUMMARY_COLUMNS))


def write_summary(out: str) -> pl.DataFrame:
    columns = ["model_id", "method", "success", "l0", "l1", "l2", "n_iter", "seconds"]
    summary = summarize(read_results(out, columns))
    buffer = io.BytesIO()
    summary.write_parquet(buffer)
    write_bytes_atomic(join(out, "reports", "summary.parquet"), buffer.getvalue())
    return summary
