"""Summary reports of an audit, recomputed from <out>/results alone.

Each results shard is read once, without its tensors (x_cf, p_orig, p_cf), into mergeable GroupStates
(engine.metrics.aggregate); the merged states give
  <out>/reports/groups.parquet   one row per model x method x source class -> target class
  <out>/reports/summary.parquet  one row per model x method (every source -> target merged)
Fréchet distances compare the valid counterfactuals with the audit's real-image reference statistics
(<out>/metrics/fid_reference.npz); `fid_extractor`, `fid_samples` and `fid_reference_samples` say what
produced each figure.
"""
from __future__ import annotations

from typing import Optional

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.metrics.aggregate import BOOTSTRAP_SAMPLES, CONFIDENCE, GroupState, collapse, group_states, merge_states
from engine.metrics.fid_reference import read_reference
from engine.store.results import SCHEMA_VERSION, result_files
from engine.store.frames import write_frame
from engine.store.uri import filesystem, join

# What the audit prints (every column is in the Parquet file).
SUMMARY_COLUMNS = ["model_id", "method", "queries", "validity", "mean_l0", "mean_l2", "seconds_per_cf",
                   "mean_lpr", "confounding_rate", "confounding_lo", "confounding_hi", "deletion_area", "fid"]
TENSOR_COLUMNS = {"x_cf", "p_orig", "p_cf", "path"}


def _files(out: str) -> list[str]:
    files = result_files(out)
    if not files:
        raise FileNotFoundError(f"No results under {join(out, 'results')}: run `cfaudit audit` first")
    return files


def read_shard(uri: str) -> pl.DataFrame:
    """One results shard without its tensor columns; refuses another schema version, naming the file."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{uri}: cannot be read as a results shard ({err}); re-run the audit "
                             "(`cfaudit audit SPEC`) to write its unit again") from None
        version = (parquet.schema_arrow.metadata or {}).get(b"cfaudit.schema_version", b"?").decode()
        if version != str(SCHEMA_VERSION):
            raise ValueError(f"{uri}: results schema version {version}, this cfaudit reads version {SCHEMA_VERSION}; "
                             "re-run the audit with `overwrite: true` (or use the cfaudit that wrote it)")
        columns = [name for name in parquet.schema_arrow.names if name not in TENSOR_COLUMNS]
        return pl.from_arrow(parquet.read(columns=columns))


def audit_states(out: str) -> dict[tuple, GroupState]:
    """Every shard's group states, merged: (model_id, method, source, target) -> GroupState."""
    return merge_states(*(group_states(read_shard(uri)) for uri in _files(out)))


def state_table(states: dict[tuple, GroupState], keys: tuple[str, ...], reference=None,
                confidence: float = CONFIDENCE, bootstrap: int = BOOTSTRAP_SAMPLES) -> pl.DataFrame:
    """One row per key of `states` with every computed figure."""
    name, ref_state = reference if reference is not None else (None, None)
    rows = []
    for key, state in sorted(states.items()):
        row = dict(zip(keys, key))
        row.update(state.compute(ref_state, confidence, bootstrap))
        row["seconds_per_cf"] = row.pop("mean_seconds")
        row["fid_extractor"] = name if state.fid is not None else None
        row["fid_reference_samples"] = 0 if ref_state is None else int(ref_state.n)
        rows.append(row)
    for column in ("attribute_change_rate", "attribute_top5_share"):  # a name never seen in a group: rate 0
        names = sorted({k for row in rows if row[column] for k in row[column]})
        for row in rows:
            if row[column] is not None:
                row[column] = {k: row[column].get(k, 0.0) for k in names}
    frame = pl.from_dicts(rows, infer_schema_length=None)
    return frame.with_columns(pl.lit(SCHEMA_VERSION, pl.Int16).alias("schema_version"))


def summarize(out: str, confidence: float = CONFIDENCE, bootstrap: int = BOOTSTRAP_SAMPLES,
              states: Optional[dict[tuple, GroupState]] = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(summary per model x method, groups per model x method x source -> target); `states` as
    audit_states(out) gives them, read here when not given."""
    states = audit_states(out) if states is None else states
    reference = read_reference(out)
    groups = state_table(states, ("model_id", "method", "source", "target"), reference, confidence, bootstrap)
    summary = state_table(collapse(states), ("model_id", "method"), reference, confidence, bootstrap)
    return summary, groups


def write_summary(out: str, confidence: Optional[float] = None, bootstrap: Optional[int] = None,
                  states: Optional[dict[tuple, GroupState]] = None) -> pl.DataFrame:
    summary, groups = summarize(out, confidence or CONFIDENCE, bootstrap or BOOTSTRAP_SAMPLES, states)
    for name, frame in (("summary", summary), ("groups", groups)):
        write_frame(join(out, "reports", f"{name}.parquet"), frame)
    return summary


def headline(summary: pl.DataFrame) -> str:
    """The summary as the audit prints it: the main columns, then which extractor the FID column used."""
    with pl.Config(tbl_rows=100, tbl_cols=len(SUMMARY_COLUMNS), tbl_width_chars=220, float_precision=3,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        text = str(summary.select([c for c in SUMMARY_COLUMNS if c in summary.columns]))
    extractors = sorted(set(summary["fid_extractor"].drop_nulls().to_list())) if "fid_extractor" in summary.columns else []
    if extractors:
        samples = int(summary["fid_reference_samples"].max())
        text += f"\nfid: {', '.join(extractors)} features, valid counterfactuals vs {samples} real images"
    return text
