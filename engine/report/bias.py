"""Bias and confounding reports of an audit, recomputed from <out>/results alone (issue #8).

From the merged group states (engine.report.summary.audit_states):
  <out>/reports/bias.parquet         model x method x source -> target: validity, distances, iterations, time,
                                     per-attribute oracle change rates
  <out>/reports/confounding.parquet  model x method x confounder: PE Table 3 rate, bootstrap interval, and its
                                     ratio to the reference model (declared, or the fleet's least confounded)
  <out>/reports/attributes.parquet   model x method x attribute: how much counterfactuals move it, ranked
  <out>/reports/fleet.parquet        one row per model: rank by confounding, driving attribute, per-method figures
Every report carries `schema_version` (a column and Parquet metadata); `read_report` refuses another version.
"""
from __future__ import annotations

import json
import math
from typing import Any, Optional, Sequence

import polars as pl
import pyarrow.parquet as pq

from engine.metrics.aggregate import BOOTSTRAP_SAMPLES, CONFIDENCE, GROUP_KEYS, GroupState, Rate, collapse
from engine.report.summary import audit_states, state_table, summarize
from engine.store.frames import write_arrow
from engine.store.uri import exists, filesystem, join, read_bytes

REPORT_SCHEMA_VERSION = 1  # 1: bias, confounding, attributes, fleet as first written (issue #8)
REPORTS = ("bias", "confounding", "attributes", "fleet")
VERSION_KEY = b"cfaudit.report_schema_version"
BIAS_COLUMNS = ["model_id", "method", "source", "target", "queries", "valid", "validity",
                "mean_l0", "std_l0", "mean_l1", "std_l1", "mean_l2", "std_l2", "mean_z_l2", "std_z_l2",
                "mean_n_iter", "std_n_iter", "seconds_per_cf", "std_seconds", "attribute_change_rate"]
FLEET_COLUMNS = ["model_id", "rank", "confounding_rate", "driver", "driver_rate", "excludes_reference",
                 "rank_by_method", "flip_ratio", "fid"]  # what the audit prints


def _versioned(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.lit(REPORT_SCHEMA_VERSION, pl.Int16).alias("schema_version"))


def bias_table(states: dict[tuple, GroupState]) -> pl.DataFrame:
    """One row per model x method x source -> target (the keys of `states`)."""
    frame = state_table(states, GROUP_KEYS, bootstrap=10)  # its confounding interval is not kept here
    return _versioned(frame.select([c for c in BIAS_COLUMNS if c in frame.columns]))


def _attribute_names(states: dict[tuple, GroupState]) -> list[str]:
    names: set[str] = set()
    for s in states.values():
        names |= set(s.attribute_changed) | set(s.attribute_delta) | set(s.attribute_top5)
    return sorted(names)


def confounding_table(states: dict[tuple, GroupState], confounders: Sequence[str] = (),
                      reference_model: Optional[str] = None, confidence: float = CONFIDENCE,
                      bootstrap: int = BOOTSTRAP_SAMPLES) -> pl.DataFrame:
    """One row per model x method x confounder attribute. The rate is the share of valid counterfactuals read
    by the oracle whose reading of that attribute changed (PE Table 3); the reference of each (method,
    attribute) is `reference_model`, else the model with the lowest rate (ties: the first model id).
    No confounders given: every attribute the oracle saw change."""
    merged = collapse(states)
    names = list(confounders) or _attribute_names(merged)
    rows = []
    for (model, method), s in sorted(merged.items()):
        for name in names:
            rate = Rate(s.oracle_read, s.attribute_changed.get(name, 0))
            lo, hi = rate.interval(confidence, bootstrap)
            rows.append({"model_id": model, "method": method, "attribute": name, "confounded_n": rate.n,
                         "confounded_k": rate.k, "confounding_rate": rate.value, "confounding_lo": lo,
                         "confounding_hi": hi})
    for row in rows:
        peers = [r for r in rows if r["method"] == row["method"] and r["attribute"] == row["attribute"]
                 and r["confounded_n"] > 0]
        if reference_model is not None:
            ref = next((r for r in peers if r["model_id"] == reference_model), None)
        else:
            ref = min(peers, key=lambda r: (r["confounding_rate"], r["model_id"]), default=None)
        row["reference_model"] = None if ref is None else ref["model_id"]
        row["reference_rate"] = float("nan") if ref is None else ref["confounding_rate"]
        row["ratio_to_reference"] = _ratio(row["confounding_rate"], row["reference_rate"])
        row["excludes_reference"] = (ref is not None and ref is not row and row["confounded_n"] > 0
                                     and (row["confounding_lo"] > ref["confounding_hi"]
                                          or row["confounding_hi"] < ref["confounding_lo"]))
    schema = {"model_id": pl.String, "method": pl.String, "attribute": pl.String, "confounded_n": pl.Int64,
              "confounded_k": pl.Int64, "confounding_rate": pl.Float64, "confounding_lo": pl.Float64,
              "confounding_hi": pl.Float64, "reference_model": pl.String, "reference_rate": pl.Float64,
              "ratio_to_reference": pl.Float64, "excludes_reference": pl.Boolean}
    return _versioned(pl.DataFrame(rows, schema=schema))


def _ratio(rate: float, reference: float) -> float:
    """rate / reference; a zero reference gives inf (or 1.0 when the rate is zero too), no data NaN."""
    if math.isnan(rate) or math.isnan(reference):
        return float("nan")
    if reference == 0:
        return 1.0 if rate == 0 else float("inf")
    return rate / reference


def attributes_table(states: dict[tuple, GroupState]) -> pl.DataFrame:
    """One row per model x method x attribute, ranked (1 = moved most) by `movement`: the mean |Δa| for a
    method that edits attributes (AIP Fig. 9), else the oracle change rate; top-5 share as GCI Fig. 6."""
    merged = collapse(states)
    names = _attribute_names(merged)
    rows = []
    for (model, method), s in sorted(merged.items()):
        by_delta = bool(s.attribute_delta)
        part = []
        for name in names:
            delta = s.attribute_delta.get(name)
            change = s.attribute_changed.get(name, 0) / s.oracle_read if s.oracle_read else float("nan")
            mean_delta = delta.value if delta is not None else float("nan")
            part.append({"model_id": model, "method": method, "attribute": name,
                         "ranked_by": "attribute_delta" if by_delta else "oracle",
                         "movement": mean_delta if by_delta else change,
                         "mean_abs_delta": mean_delta, "delta_n": 0 if delta is None else delta.n,
                         "top5_share": s.attribute_top5.get(name, 0) / s.top_read if s.top_read else float("nan"),
                         "change_rate": change, "oracle_read": s.oracle_read})
        part.sort(key=lambda r: (-(r["movement"] if not math.isnan(r["movement"]) else -math.inf), r["attribute"]))
        for i, row in enumerate(part):
            row["rank"] = i + 1
        rows += part
    schema = {"model_id": pl.String, "method": pl.String, "attribute": pl.String, "ranked_by": pl.String,
              "movement": pl.Float64, "mean_abs_delta": pl.Float64, "delta_n": pl.Int64, "top5_share": pl.Float64,
              "change_rate": pl.Float64, "oracle_read": pl.Int64, "rank": pl.Int64}
    return _versioned(pl.DataFrame(rows, schema=schema).select(["model_id", "method", "rank", *list(schema)[2:-1]]))


def fleet_table(confounding: pl.DataFrame, summary: pl.DataFrame, attributes: pl.DataFrame) -> pl.DataFrame:
    """One row per model. `rank` orders the fleet by its confounding rate pooled over methods (1 = most
    confounded); per-method figures are struct columns with one field per method."""
    methods = sorted(set(summary["method"].to_list()))
    models = sorted(set(summary["model_id"].to_list()))
    rows: dict[str, dict[str, Any]] = {m: {"model_id": m} for m in models}
    by_method: dict[str, dict[str, dict[str, Any]]] = {k: {m: {} for m in models} for k in
                                                       ("rank_by_method", "confounding_rate_by_method",
                                                        "driver_by_method", "flip_ratio", "fid",
                                                        "excludes_reference_by_method")}
    for method in methods:
        part = summary.filter(pl.col("method") == method)
        rates = {r["model_id"]: r for r in part.iter_rows(named=True)}
        order = _ranks({m: (r["confounding_rate"], r["confounded_n"]) for m, r in rates.items()})
        for model in models:
            r = rates.get(model)
            by_method["rank_by_method"][model][method] = order.get(model)
            by_method["confounding_rate_by_method"][model][method] = None if r is None else r["confounding_rate"]
            by_method["flip_ratio"][model][method] = None if r is None else r["validity"]
            by_method["fid"][model][method] = None if r is None else r["fid"]
            top = attributes.filter((pl.col("model_id") == model) & (pl.col("method") == method)
                                    & (pl.col("oracle_read") > 0)).sort(["change_rate", "attribute"],
                                                                       descending=[True, False])
            by_method["driver_by_method"][model][method] = (top["attribute"][0] if top.height
                                                            and top["change_rate"][0] > 0 else None)
            flags = confounding.filter((pl.col("model_id") == model) & (pl.col("method") == method))
            by_method["excludes_reference_by_method"][model][method] = bool(flags["excludes_reference"].any())
    pooled = {}
    for model in models:
        part = summary.filter((pl.col("model_id") == model) & (pl.col("confounded_n") > 0))
        n = int(part["confounded_n"].sum()) if part.height else 0
        rate = float((part["confounding_rate"] * part["confounded_n"]).sum() / n) if n else float("nan")
        pooled[model] = (rate, n)
        attrs = (attributes.filter((pl.col("model_id") == model) & (pl.col("oracle_read") > 0))
                 .group_by("attribute").agg(((pl.col("change_rate") * pl.col("oracle_read")).sum()
                                             / pl.col("oracle_read").sum()).alias("rate"))
                 .sort(["rate", "attribute"], descending=[True, False]))
        moved = attrs.height and attrs["rate"][0] > 0  # nothing moved: no driver
        rows[model].update(confounding_rate=rate, driver=attrs["attribute"][0] if moved else None,
                           driver_rate=float(attrs["rate"][0]) if attrs.height else float("nan"),
                           excludes_reference=any(by_method["excludes_reference_by_method"][model].values()))
    order = _ranks(pooled)
    for model in models:
        rows[model]["rank"] = order.get(model)
        for column, values in by_method.items():
            rows[model][column] = values[model]
    frame = pl.from_dicts([rows[m] for m in models], infer_schema_length=None)
    frame = frame.with_columns(pl.col("rank").cast(pl.Int64)).sort(["rank", "model_id"], nulls_last=True)
    rest = [c for c in frame.columns if c not in FLEET_COLUMNS]
    return _versioned(frame.select([c for c in FLEET_COLUMNS if c in frame.columns] + rest))


def _ranks(rates: dict[str, tuple[float, int]]) -> dict[str, int]:
    """1 = highest rate; equal rates share a rank; models without data get none."""
    known = {m: r for m, (r, n) in rates.items() if n and not math.isnan(r)}
    return {m: 1 + sum(other > r for other in known.values()) for m, r in known.items()}


def audit_settings(out: str) -> dict[str, Any]:
    """Confounders, reference model, confidence and bootstrap samples from <out>/_job.json (defaults without)."""
    uri = join(out, "_job.json")
    spec = json.loads(read_bytes(uri)).get("spec", {}) if exists(uri) else {}
    metrics = spec.get("metrics") or {}
    confounders = metrics.get("confounders")
    if confounders is None:
        named = (spec.get("dataset") or {}).get("options", {}).get("confounder")
        confounders = [named] if isinstance(named, str) else list(named or [])
    return {"confounders": list(confounders), "reference_model": metrics.get("reference_model"),
            "confidence": metrics.get("confidence", CONFIDENCE),
            "bootstrap": metrics.get("bootstrap_samples", BOOTSTRAP_SAMPLES)}


def write_reports(out: str, confidence: Optional[float] = None, bootstrap: Optional[int] = None,
                  summary: Optional[pl.DataFrame] = None,
                  states: Optional[dict[tuple, GroupState]] = None) -> dict[str, pl.DataFrame]:
    """Compute and write the four reports under <out>/reports; returns them by name. `summary` (the
    summary.parquet frame) and `states` are recomputed from <out>/results when not given."""
    settings = audit_settings(out)
    confidence, bootstrap = confidence or settings["confidence"], bootstrap or settings["bootstrap"]
    states = states if states is not None else audit_states(out)
    if summary is None:
        summary = summarize(out, confidence, bootstrap)[0]
    frames = {"bias": bias_table(states),
              "confounding": confounding_table(states, settings["confounders"], settings["reference_model"],
                                               confidence, bootstrap),
              "attributes": attributes_table(states)}
    frames["fleet"] = fleet_table(frames["confounding"], summary, frames["attributes"])
    for name, frame in frames.items():
        table = frame.to_arrow()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"cfaudit.report": name.encode(),
                                               VERSION_KEY: str(REPORT_SCHEMA_VERSION).encode()})
        write_arrow(join(out, "reports", f"{name}.parquet"), table)
    return frames


def read_report(uri: str) -> pl.DataFrame:
    """One report; a different schema version (metadata, else the column) raises naming file and versions."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        table = pq.ParquetFile(handle).read()
    version = (table.schema.metadata or {}).get(VERSION_KEY)
    if version is None and "schema_version" in table.column_names and table.num_rows:
        version = str(table.column("schema_version")[0].as_py()).encode()
    found = "none" if version is None else version.decode()
    if found != str(REPORT_SCHEMA_VERSION):
        age = "an older" if found.isdigit() and int(found) < REPORT_SCHEMA_VERSION else "a newer or unknown"
        raise ValueError(f"{uri}: report schema version {found} ({age} cfaudit wrote it), this cfaudit reads "
                         f"version {REPORT_SCHEMA_VERSION}; recompute it with `cfaudit report <out>`")
    return pl.from_arrow(table)


def fleet_headline(fleet: pl.DataFrame) -> str:
    """The fleet table as the audit prints it."""
    with pl.Config(tbl_rows=100, tbl_cols=len(FLEET_COLUMNS), tbl_width_chars=220, float_precision=3,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, fmt_str_lengths=60):
        text = str(fleet.select([c for c in FLEET_COLUMNS if c in fleet.columns]))
    if "flip_ratio" in fleet.columns:
        methods = [f.name for f in fleet.schema["flip_ratio"].fields]
        text += f"\nper-method columns {{...}}: {', '.join(methods)}; rank 1 = most confounded"
    return text
