"""augment(spec): counterfactual training data at scale.

The audit runtime explains the spec's training samples (Ray, resumable, each unit exactly once); then
`collect` keeps, from every results shard, the valid counterfactuals that pass the plausibility filter
(engine.metrics.plausibility) and writes them as labelled samples to
<out>/augmented/model=<id>/method=<name>/part-<n>.parquet, one file per results shard, rewritten whole
and atomically: re-running the job never duplicates a sample. A sample's label is its target class.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.data import load_dataset
from engine.data.base import ArrayDataset
from engine.metrics.features import domain_extractor
from engine.metrics.plausibility import KnnPlausibility
from engine.runtime.host import pick_device
from engine.spec.augment import AugmentSpec, PlausibilitySpec
from engine.store.frames import write_arrow, write_frame
from engine.store.results import result_files
from engine.store.uri import filesystem, join, write_bytes_atomic
from engine.workflows.audit import audit
from engine.workflows.stages import Stages

AUGMENTED_VERSION = 1
# One row per kept counterfactual; `x` (the sample) is appended with the input shape.
AUGMENTED_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),     # <model>/<method>/<source_id>/<target>: unique
    pa.field("label", pa.int64(), nullable=False),          # = target: the class the model gives the sample
    pa.field("job", pa.string(), nullable=False),
    pa.field("spec_hash", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("config_hash", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("source_split", pa.string(), nullable=False),
    pa.field("source_id", pa.int64(), nullable=False),      # index of the source sample in its split
    pa.field("source_label", pa.int64(), nullable=False),   # its true label
    pa.field("source_pred", pa.int64(), nullable=False),    # the model's class for it
    pa.field("target", pa.int64(), nullable=False),
    pa.field("p_target", pa.float32(), nullable=False),     # validity: P(target | sample) under the model
    pa.field("plausibility", pa.float32(), nullable=True),  # k-NN distance / the class's median real one
]


@dataclass
class AugmentResult:
    output: str
    generated: int = 0     # counterfactual rows the audit wrote (already-target rows included)
    valid: int = 0         # of them valid and a real change of class
    kept: int = 0          # of them plausible: written under <out>/augmented/
    files: list[str] = field(default_factory=list)
    units_failed: list = field(default_factory=list)
    yield_table: Optional[pl.DataFrame] = None


def augmented_uri(out: str, results_uri: str) -> str:
    m = re.search(r"(model=[^/]+/method=[^/]+/part-[^/]+\.parquet)$", results_uri)
    if m is None:
        raise ValueError(f"not a results shard: {results_uri}")
    return join(out, "augmented", *m.group(1).split("/"))


def feature_function(data: ArrayDataset, spec: AugmentSpec, device: torch.device,
                     log: Callable[[str], Any]) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """Features for the plausibility filter: the domain extractor's for images, the encoded record for tables."""
    if data.kind != "image":
        return (lambda x: x.flatten(1).float()), "raw features"
    extractor = domain_extractor(spec.dataset.name, spec.dataset.options, spec.runtime.cache_dir, device, log)
    return extractor, extractor.name


def stratified_draw(labels: torch.Tensor, total: int, seed: int) -> torch.Tensor:
    """Up to `total` indices, the same share of every class (seeded), sorted."""
    classes = labels.unique()
    per = max(1, total // max(1, len(classes)))
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in classes.tolist():
        idx = (labels == c).nonzero().squeeze(1)
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    return torch.cat(picked).sort().values


def fit_plausibility(options: PlausibilitySpec, reference: ArrayDataset, features, seed: int
                     ) -> Optional[KnnPlausibility]:
    if options.filter == "none":
        return None
    idx = stratified_draw(reference.y, options.reference_samples, seed)
    with torch.no_grad():
        f = features(reference.x[idx].float())
    return KnnPlausibility.fit(f.cpu(), reference.y[idx], reference.num_classes, options.k, options.quantile)


def keep_counterfactuals(rows: pl.DataFrame, x_cf: np.ndarray, plausibility: Optional[KnnPlausibility],
                         features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid [n] bool, kept [n] bool, score [n]) for a shard's rows: valid = success with status ok and
    a real change of class; kept = valid and plausible."""
    valid = (rows["success"].to_numpy() & (rows["status"] == "ok").to_numpy()
             & (rows["target"] != rows["pred_orig"]).to_numpy())
    score = np.full(len(valid), np.nan)
    kept = valid.copy()
    if plausibility is not None and valid.any():
        idx = np.flatnonzero(valid)
        with torch.no_grad():
            f = features(torch.from_numpy(x_cf[idx]).float())
        s, ok = plausibility.score(f.cpu(), torch.from_numpy(rows["target"].to_numpy()[idx]))
        score[idx] = s.numpy()
        kept[idx] = ok.numpy()
    return valid, kept, score


def augmented_table(rows: pl.DataFrame, x: np.ndarray, score: np.ndarray, split: str, meta: dict) -> pa.Table:
    n = rows.height
    sample_id = [f"{m}/{me}/{q}/{t}" for m, me, q, t in zip(rows["model_id"], rows["method"], rows["query_id"],
                                                           rows["target"])]
    columns = {
        "sample_id": sample_id, "label": rows["target"].to_numpy(), "job": rows["job"].to_list(),
        "spec_hash": rows["spec_hash"].to_list(), "model_id": rows["model_id"].to_list(),
        "method": rows["method"].to_list(), "config_hash": rows["config_hash"].to_list(),
        "seed": rows["seed"].to_numpy(), "source_split": [split] * n, "source_id": rows["query_id"].to_numpy(),
        "source_label": rows["label"].to_numpy(), "source_pred": rows["pred_orig"].to_numpy(),
        "target": rows["target"].to_numpy(), "p_target": rows["p_cf_target"].to_numpy().astype(np.float32),
        "plausibility": [None if not np.isfinite(v) else float(v) for v in score],
    }
    arrays = [pa.array(columns[f.name], type=f.type) for f in AUGMENTED_FIELDS]
    shape = list(x.shape[1:])
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(x, np.float32)) if n else \
        pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), shape),
                                       pa.array([], pa.list_(pa.float32(), int(np.prod(shape)))))
    schema = pa.schema(AUGMENTED_FIELDS + [pa.field("x", tensor.type, nullable=False)],
                       metadata={b"cfaudit.augmented_version": str(AUGMENTED_VERSION).encode(),
                                 b"cfaudit.augmented": json.dumps(meta).encode()})
    return pa.Table.from_arrays(arrays + [tensor], schema=schema)


def collect(spec: AugmentSpec, log: Callable[[str], Any] = print) -> AugmentResult:
    """Keep the valid, plausible counterfactuals of every results shard (see the module doc)."""
    out = spec.output
    result = AugmentResult(out)
    files = result_files(out)
    if not files:
        log("  no results shards: nothing to collect")
        return result
    reference = load_dataset(spec.dataset.name, "train", **spec.dataset.options)
    options = spec.augment.plausibility
    features, feature_name = feature_function(reference, spec, pick_device(spec.runtime.device), log)
    plausibility = fit_plausibility(options, reference, features, spec.seed)
    meta = {"dataset": spec.dataset.name, "dataset_options": spec.dataset.options,
            "class_names": list(reference.class_names), "value_range": list(reference.value_range),
            "input_shape": list(reference.input_shape), "plausibility": options.model_dump(),
            "features": feature_name if plausibility is not None else None,
            "thresholds": None if plausibility is None else plausibility.threshold.tolist()}
    counts = []
    for uri in files:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        rows = pl.from_arrow(table.drop_columns(["x_cf", "p_orig", "p_cf"]))
        x_cf = table.column("x_cf").combine_chunks().to_numpy_ndarray()
        valid, kept, score = keep_counterfactuals(rows, x_cf, plausibility, features)
        target_uri = augmented_uri(out, uri)
        write_arrow(target_uri, augmented_table(rows.filter(pl.Series(kept)), x_cf[kept], score[kept],
                                                spec.queries.split, meta), compression="zstd")
        result.files.append(target_uri)
        counts.append({"model_id": rows["model_id"][0] if rows.height else "", "method": rows["method"][0]
                       if rows.height else "", "generated": rows.height, "valid": int(valid.sum()),
                       "kept": int(kept.sum())})
    frame = pl.DataFrame(counts).group_by(["model_id", "method"]).sum().sort(["model_id", "method"])
    frame = frame.with_columns((pl.col("kept") / pl.col("valid")).alias("plausible_rate"),
                               (pl.col("kept") / pl.col("generated")).alias("yield"))
    write_frame(join(out, "reports", "augmentation_yield.parquet"), frame)
    write_bytes_atomic(join(out, "augmented", "_augment.json"), json.dumps(meta, indent=2).encode())
    result.generated, result.valid, result.kept = (int(frame[c].sum()) for c in ("generated", "valid", "kept"))
    result.yield_table = frame
    return result


def augment(spec: AugmentSpec, log: Callable[[str], Any] = print, progress: bool = True,
            summary: Optional[Callable[[str], Any]] = None) -> AugmentResult:
    """The audit over the training samples, then `collect`; prints the yield per model and method (to `summary`,
    default `log`)."""
    audited = audit(spec.audit_spec(), log=log, progress=progress)
    stages = Stages(log)
    with stages.stage("collect"):
        result = collect(spec, log)
    result.units_failed = audited.units_failed
    summary = summary or log
    if result.yield_table is not None:
        summary(str(result.yield_table))
    summary(f"augmented: {result.kept} samples kept of {result.valid} valid counterfactuals "
        f"({result.generated} rows) in {join(spec.output, 'augmented')}; label = target class")
    return result
