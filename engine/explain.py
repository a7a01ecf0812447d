"""One work unit end to end without Ray: targets -> method.explain -> per-query metrics -> Arrow rows."""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import torch

from engine.data.schema import result_columns
from engine.metrics.distances import input_distances
from engine.metrics.per_query import MetricOptions, per_query_columns
from engine.methods.base import Method
from engine.models.handles import ModelBundle
from engine.store.results import rows_to_table
from engine.targets import TargetMode, resolve_targets
from engine.types import CFBatch, QueryBatch


def build_queries(bundle: ModelBundle, x: torch.Tensor, query_ids: torch.Tensor, labels: torch.Tensor,
                  targets: TargetMode, seed: int) -> tuple[QueryBatch, torch.Tensor]:
    """Expand queries by target mode; returns the batch and the model's logits on each row's x."""
    device = bundle.device
    x = x.to(device)
    with torch.no_grad():
        logits = bundle.classifier.logits(x)
    rows, target = resolve_targets(logits, targets)
    batch = QueryBatch(x=x[rows], target=target, query_id=query_ids.to(device)[rows],
                       label=labels.to(device)[rows], seed=seed)
    return batch, logits[rows]


def bundle_for(method: Method, bundle: ModelBundle) -> ModelBundle:
    """The bundle as `method` sees it: a z ⊕ a generator as one latent unless it uses attributes."""
    if bundle.generator is not None and not method.uses_attributes:
        return replace(bundle, generator=bundle.generator.joint())
    return bundle


def explain_unit(method: Method, bundle: ModelBundle, x: torch.Tensor, query_ids: torch.Tensor,
                 labels: torch.Tensor, targets: TargetMode, seed: int, meta: dict,
                 metrics: MetricOptions | None = None) -> pa.Table:
    """Run `method` on one unit of queries and return its results rows (store.results schema).

    `seconds` is the method's time only; the per-query metrics (`metrics`, default options) follow it.
    """
    shared = bundle
    bundle = bundle_for(method, bundle)
    batch, logits = build_queries(bundle, x, query_ids, labels, targets, seed)
    start = time.perf_counter()
    cf = method.explain(batch, bundle)
    seconds = time.perf_counter() - start
    columns = {**meta, **attribute_columns(cf, bundle, batch.x)}
    columns.update(per_query_columns(batch, cf, shared, metrics or MetricOptions(),
                                     oracle_changed=columns.get("oracle_changed")))
    if bundle.schema is not None:  # measured on the records, in the data's units too (engine.data.schema)
        own = getattr(bundle.schema, "result_columns", None)  # text: the sentences (engine.data.vocab)
        columns.update(own(batch.x, cf.x_cf) if own else result_columns(bundle.schema, batch.x, cf.x_cf))
    return cf_to_table(batch.to("cpu"), torch.softmax(logits, -1).cpu(), cf.cpu(), seconds, columns)


def attribute_columns(cf: CFBatch, bundle: ModelBundle, x: torch.Tensor) -> dict:
    """Latent distance, the method's attribute deltas and top attributes, and what the oracle reads changed."""
    out: dict = {}
    if cf.z0 is not None and cf.z_cf is not None:
        out["z_l2"] = torch.nan_to_num((cf.z_cf - cf.z0).flatten(1).norm(dim=1), nan=float("inf")).cpu().numpy()
    delta = cf.attribute_delta
    if delta is None and cf.a0 is not None and cf.a_cf is not None:
        delta = cf.a_cf - cf.a0
    names = cf.attribute_names or (bundle.generator.attribute_names if bundle.generator else [])
    if delta is not None and names:
        values = delta.detach().float().cpu().numpy()
        out["attribute_delta"] = [list(zip(names, map(float, row))) for row in values]
    if cf.top_attributes is not None:
        out["top_attributes"] = [list(map(str, row)) for row in cf.top_attributes]
    if bundle.oracle is not None:
        with torch.no_grad():
            before = bundle.oracle.logits(x) > 0
            after = bundle.oracle.logits(torch.nan_to_num(cf.x_cf)) > 0
        changed = (before != after).cpu()
        out["oracle_changed"] = [[bundle.oracle.class_names[j] for j in row.nonzero().flatten().tolist()]
                                 for row in changed]
    return out


def cf_to_table(batch: QueryBatch, p_orig: torch.Tensor, cf: CFBatch, seconds: float, meta: dict) -> pa.Table:
    n = len(batch)
    pred_orig = p_orig.argmax(-1)
    rows = torch.arange(n)
    dist = input_distances(batch.x, cf.x_cf)
    x_cf = torch.nan_to_num(cf.x_cf)  # a `nan` query keeps its status; its tensor must stay writable
    p_cf = torch.nan_to_num(cf.p_cf)
    columns = {
        **meta,
        "query_id": batch.query_id.numpy(), "seed": np.full(n, batch.seed, np.int64),
        "label": (batch.label if batch.label is not None else torch.full((n,), -1)).numpy(),
        "pred_orig": pred_orig.numpy(), "target": batch.target.numpy(), "pred_cf": p_cf.argmax(-1).numpy(),
        "p_orig_pred": p_orig[rows, pred_orig].numpy(), "p_orig_target": p_orig[rows, batch.target].numpy(),
        "p_cf_target": p_cf[rows, batch.target].numpy(),
        "success": cf.success.numpy().astype(bool), "status": list(cf.status), "n_iter": cf.n_iter.numpy(),
        "n_features": None if cf.n_features is None else cf.n_features.numpy(),
        "seconds": np.full(n, seconds / max(n, 1)),
        "l0": dist["l0"].numpy(), "l1": torch.nan_to_num(dist["l1"], nan=float("inf")).numpy(),
        "l2": torch.nan_to_num(dist["l2"], nan=float("inf")).numpy(),
        **{k: meta[k] for k in ("l0", "l1", "l2") if k in meta},  # a tabular schema's per-feature measures
        "p_orig": p_orig.numpy(), "p_cf": p_cf.numpy(), "x_cf": x_cf.numpy(),
        "path": None if cf.path is None else torch.nan_to_num(cf.path).numpy(),  # progressive series
        "reason": _reasons(cf),
    }
    if columns["n_features"] is None:
        columns["n_features"] = pa.nulls(n, pa.int64())
    return rows_to_table(columns, tuple(batch.x.shape[1:]), p_orig.shape[1])


def _reasons(cf: CFBatch) -> list:
    if not cf.reason and cf.status:  # a CFBatch built without reasons
        return [None if status == "ok" else status for status in cf.status]
    return [None if r in (None, "") else str(r) for r in cf.reason]
