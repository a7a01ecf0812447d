"""The results schema (one row per job, model, method, query, target) and the shard writer.

Counterfactuals are stored as an Arrow fixed-shape tensor column `x_cf` (extension type
`arrow.fixed_shape_tensor`, float32, the classifier's input shape), readable by pyarrow
(`.to_numpy_ndarray()`) and by plain polars (as an extension of a fixed-size array). A progressive
series is stored the same way, as a list of such tensors per row (`path`, `read_series`).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.store.commit import (CorruptShard, check_run, commit_unit, output_spec_hash, output_state, query_hash,
                                 sha256, shard_path)
from engine.store.uri import exists, join, write_bytes_atomic

SCHEMA_VERSION = 4  # 2: per-query metric columns (engine.metrics.per_query); 3: tabular records;
                    # 4: progressive series `path`; text sentences `text`, `text_cf`

# Scalar columns, in order; `x_cf`, `p_orig` and `p_cf` are appended with shapes known per model.
SCALAR_FIELDS: list[pa.Field] = [
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("job", pa.string(), nullable=False),
    pa.field("spec_hash", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("unit_id", pa.string(), nullable=False),
    pa.field("query_id", pa.int64(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("label", pa.int64(), nullable=False),
    pa.field("pred_orig", pa.int64(), nullable=False),
    pa.field("target", pa.int64(), nullable=False),
    pa.field("pred_cf", pa.int64(), nullable=False),
    pa.field("p_orig_pred", pa.float32(), nullable=False),   # P(pred_orig | x)
    pa.field("p_orig_target", pa.float32(), nullable=False), # P(target | x)
    pa.field("p_cf_target", pa.float32(), nullable=False),   # P(target | x_cf)
    pa.field("success", pa.bool_(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("n_iter", pa.int64(), nullable=False),
    pa.field("n_features", pa.int64(), nullable=True),
    pa.field("seconds", pa.float64(), nullable=False),       # wall time of the unit / its rows
    # Tabular data with a schema: measured on the records, per feature (a category switch counts once,
    # numeric |Δ| on the schema's [0, 1] scale); else on the input tensor entry by entry.
    pa.field("l0", pa.int64(), nullable=False),              # features changed by >= 1e-3 (GC Eq. 9)
    pa.field("l1", pa.float32(), nullable=False),
    pa.field("l2", pa.float32(), nullable=False),            # GC Eq. 10
    pa.field("l1_units", pa.float32(), nullable=True),       # tabular schema: numeric |Δ| in the data's units
    pa.field("l2_units", pa.float32(), nullable=True),
    pa.field("record_cf", pa.string(), nullable=True),       # tabular schema: the counterfactual record, JSON
    pa.field("changes", pa.list_(pa.string()), nullable=True),  # tabular schema: "feature: before -> after"
                                                                 # text: changed words "before -> after"
    pa.field("text", pa.string(), nullable=True),            # text data: the query's words, space-separated
    pa.field("text_cf", pa.string(), nullable=True),         # text data: the counterfactual's words
    pa.field("reason", pa.string(), nullable=True),          # why a query did not succeed, in words
    pa.field("z_l2", pa.float32(), nullable=True),           # ||z_cf - z0||_2 for latent-space methods
    pa.field("attribute_delta", pa.map_(pa.string(), pa.float32()), nullable=True),  # a_cf - a0 by name
    pa.field("top_attributes", pa.list_(pa.string()), nullable=True),  # the method's most-changed attributes
    pa.field("oracle_changed", pa.list_(pa.string()), nullable=True),  # attributes the oracle reads differently
    # Per-query metrics (engine.metrics.per_query); null where they do not apply to the unit.
    pa.field("confounded", pa.bool_(), nullable=True),       # a confounder attribute changed (PE Table 3)
    pa.field("latent_l2", pa.float32(), nullable=True),      # ||E(x_cf) - E(x)||_2, shared encoder
    pa.field("lpr", pa.float32(), nullable=True),            # ||E(x_cf) - E(x)||_0 / k (AIP Eq. 8)
    pa.field("latent_closest", pa.bool_(), nullable=True),   # PE Eq. 10 within the unit, same target
    pa.field("coherence", pa.float32(), nullable=True),      # GC Eq. 11 within the unit, same target
    pa.field("coherence_neighbours", pa.int32(), nullable=True),
    pa.field("desired", pa.list_(pa.float32()), nullable=True),   # f(x) + δ per step of a series
    pa.field("achieved", pa.list_(pa.float32()), nullable=True),  # f(x_δ) per step
    pa.field("compat_spearman", pa.float32(), nullable=True),
    pa.field("compat_mae", pa.float32(), nullable=True),
    pa.field("deletion", pa.list_(pa.float32()), nullable=True),  # accuracy as top pixels become noise
    pa.field("deletion_auc", pa.float32(), nullable=True),
    pa.field("fid_features", pa.list_(pa.float32()), nullable=True),  # extractor features of a valid x_cf
]


def results_schema(input_shape: Sequence[int], num_classes: int) -> pa.Schema:
    return pa.schema(SCALAR_FIELDS + [
        pa.field("p_orig", pa.list_(pa.float32(), num_classes), nullable=False),
        pa.field("p_cf", pa.list_(pa.float32(), num_classes), nullable=False),
        pa.field("x_cf", pa.fixed_shape_tensor(pa.float32(), list(input_shape)), nullable=False),
        # The progressive series x_δ of methods that produce one (`exaggeration`), S steps of the input shape
        # (S may differ between rows); null for every other method.
        pa.field("path", pa.list_(pa.fixed_shape_tensor(pa.float32(), list(input_shape))), nullable=True),
    ], metadata={"cfaudit.schema_version": str(SCHEMA_VERSION)})


def rows_to_table(columns: dict[str, np.ndarray], input_shape: Sequence[int], num_classes: int) -> pa.Table:
    """Build a results table from numpy columns (x_cf [B, *shape], p_orig/p_cf [B, K])."""
    schema = results_schema(input_shape, num_classes)
    n = len(columns["query_id"])
    arrays = []
    for f in schema:
        if f.name == "schema_version":
            arrays.append(pa.array(np.full(n, SCHEMA_VERSION, np.int16)))
        elif f.name in ("p_orig", "p_cf"):
            flat = pa.array(np.ascontiguousarray(columns[f.name], np.float32).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, num_classes))
        elif f.name == "x_cf":
            arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(
                np.ascontiguousarray(columns["x_cf"], np.float32)))
        elif f.name == "path" and columns.get("path") is not None:
            arrays.append(series_array(columns["path"], n, f.type))
        else:
            value = columns.get(f.name)
            if isinstance(value, pa.Array):
                arrays.append(value.cast(f.type))
                continue
            if value is None:
                arrays.append(pa.nulls(n, f.type))
                continue
            if isinstance(value, (str, int, float)):
                value = [value] * n
            arrays.append(pa.array(value, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def series_array(path: np.ndarray, n: int, kind: pa.DataType) -> pa.ListArray:
    """path [B, S, *shape] -> one list of S tensors per row (the `path` column's type `kind`)."""
    path = np.ascontiguousarray(path, np.float32)
    if path.ndim < 2 or path.shape[0] != n or list(path.shape[2:]) != list(kind.value_type.shape):
        raise ValueError(f"results column 'path': expected [{n}, S, {', '.join(map(str, kind.value_type.shape))}], "
                         f"got {list(path.shape)}")
    steps = pa.FixedShapeTensorArray.from_numpy_ndarray(path.reshape(-1, *path.shape[2:]))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * path.shape[1]), steps, type=kind)


def read_series(column: pa.ChunkedArray | pa.Array, rows: Sequence[int]) -> list[np.ndarray | None]:
    """The series [S, *shape] of the given rows of a `path` column (None where the row has none)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    picked = column.take(pa.array(list(rows), pa.int64()))
    return [None if value.values is None else value.values.to_numpy_ndarray() for value in picked]


def shard_uri(out: str, model_id: str, method: str, part: int) -> str:
    return join(out, shard_path(model_id, method, part))


def shard_bytes(table: pa.Table) -> bytes:
    """A results table as the bytes of one Parquet shard (zstd)."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def write_shard(uri: str, table: pa.Table) -> None:
    """Serialise to Parquet in memory, then write atomically (readers never see half a file)."""
    write_bytes_atomic(uri, shard_bytes(table))


def write_unit(out: str, table: pa.Table, *, model_id: str, method: str, part: int, query_ids: np.ndarray,
               spec_hash: str, run_id: str, **extra) -> dict:
    """Write a unit's shard, then commit it (engine/store/commit.py), unless run `run_id` lost the output's claim.
    Returns the manifest entry; `extra` (rows, seconds, ...) is recorded in it."""
    data = shard_bytes(table)
    check_run(out, run_id)  # a run that lost its claim writes nothing more
    write_bytes_atomic(shard_uri(out, model_id, method, part), data)
    entry = {**extra, "unit_id": f"{model_id}/{method}/{part:05d}", "model_id": model_id, "method": method,
             "part": int(part), "queries": query_hash(query_ids), "n": len(query_ids), "size": len(data),
             "sha256": sha256(data), "spec_hash": spec_hash, "run_id": run_id}
    commit_unit(out, entry)
    return entry


def _spec_hash(out: str) -> str | None:
    return output_spec_hash(out) if exists(join(out, "_job.json")) else None


def finished_units(out: str) -> set[tuple[str, str, int]]:
    """(model_id, method, part) of every unit committed for the output's spec, its shard present and whole."""
    spec_hash = _spec_hash(out)
    return set() if spec_hash is None else set(output_state(out, spec_hash).committed)


def result_files(out: str) -> list[str]:
    """URIs of the committed results shards of the output's spec, each checked against its manifest entry
    (size and SHA-256). Uncommitted shards and other specs' are not results; a committed unit whose shard is
    missing or corrupt raises CorruptShard naming the files (re-running the audit repairs them)."""
    spec_hash = _spec_hash(out)
    if spec_hash is None:
        return []
    state = output_state(out, spec_hash, verify=True)
    if state.problems:
        listed = "\n  ".join(sorted(state.problems.values())[:10])
        raise CorruptShard(f"results under {out!r} are incomplete: {len(state.problems)} committed unit(s) do not "
                           f"hold up\n  {listed}\nre-run the audit (`cfaudit audit SPEC`): it writes those units again")
    return sorted(c.uri for c in state.committed.values())
