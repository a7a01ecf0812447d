"""Planning: fleet x methods x queries -> work units (batches sharing one model and one method)."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch

from engine.data.base import ArrayDataset
from engine.spec.audit import AuditSpec


def select_queries(data: ArrayDataset, count: int, seed: int, classes: list[int] | None = None) -> torch.Tensor:
    """Indices [n] of `count` queries drawn without replacement (seeded), optionally from some labels only."""
    eligible = torch.arange(len(data))
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < data.num_classes]
        if bad:
            raise ValueError(f"queries.classes: {bad} out of range for {data.name} with {data.num_classes} classes")
        eligible = eligible[torch.isin(data.y, torch.tensor(classes))]
    if len(eligible) == 0:
        raise ValueError(f"queries: no {data.name} samples match classes={classes}")
    order = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))
    return eligible[order[:count]].sort().values


@dataclass(frozen=True)
class WorkUnit:
    model_id: str
    method: str
    part: int
    query_ids: np.ndarray  # [n] int64

    @property
    def unit_id(self) -> str:
        return f"{self.model_id}/{self.method}/{self.part:05d}"


def plan_units(spec: AuditSpec, query_ids: torch.Tensor) -> list[WorkUnit]:
    """Every (model, method) pair gets the same queries, chunked by runtime.batch_size."""
    ids = query_ids.numpy().astype(np.int64)
    size = spec.runtime.batch_size
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
    return [WorkUnit(m.id, meth.name, part, chunk)
            for m in spec.fleet for meth in spec.methods for part, chunk in enumerate(chunks)]


def unit_descriptor(unit: WorkUnit) -> dict:
    """What the driver hands Ray Data for a unit: ids only (a few bytes per query), no tensors."""
    return {"unit_id": unit.unit_id, "model_id": unit.model_id, "method": unit.method, "part": unit.part,
            "query_ids": unit.query_ids.tobytes(), "n": len(unit.query_ids)}


@functools.lru_cache(maxsize=4)
def _cached_split(name: str, split: str, options_json: str) -> ArrayDataset:
    from engine.data import load_dataset

    return load_dataset(name, split, **json.loads(options_json))


class QueryAttacher:
    """Ray Data stage before the model hosts: adds each unit's query tensors (`x`, `labels`) to its row.

    It runs in Ray's worker processes, so the driver never holds query tensors: its memory stays flat as
    the number of queries grows, and the tensors stream through the object store under Ray Data's
    back-pressure. The split is loaded once per worker process.
    """

    def __init__(self, name: str, split: str, options: dict) -> None:
        self.key = (name, split, json.dumps(options, sort_keys=True, default=str))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = _cached_split(*self.key)
        xs, labels = [], []
        for raw in batch["query_ids"]:
            index = torch.as_tensor(np.frombuffer(raw, dtype=np.int64).copy())
            xs.append(data.x[index].numpy().astype(np.float32).tobytes())
            labels.append(data.y[index].numpy().astype(np.int64).tobytes())
        return {**batch, "x": np.asarray(xs, dtype=object), "labels": np.asarray(labels, dtype=object)}


def unit_row(unit: WorkUnit, data: ArrayDataset) -> dict:
    """The Ray Data row of a unit: its query tensors travel with it as bytes (models never do)."""
    index = torch.as_tensor(unit.query_ids)
    x = data.x[index].numpy().astype(np.float32)
    return {
        "unit_id": unit.unit_id, "model_id": unit.model_id, "method": unit.method, "part": unit.part,
        "query_ids": unit.query_ids.tobytes(), "labels": data.y[index].numpy().astype(np.int64).tobytes(),
        "x": x.tobytes(), "n": len(unit.query_ids),
    }
