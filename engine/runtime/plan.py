"""Planning: fleet x methods x queries -> work units (batches sharing one model and one method)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from engine.data.base import ArrayDataset
from engine.data.source import SplitSource
from engine.spec.audit import AuditSpec


def select_queries(data: Union[ArrayDataset, SplitSource], count: int, seed: int,
                   classes: list[int] | None = None) -> torch.Tensor:
    """Indices [n] of `count` queries drawn without replacement (seeded), optionally from some labels only.
    `data`: a split in memory or read on demand (only its labels are read)."""
    labels, num_classes = (data.labels, data.info.num_classes) if isinstance(data, SplitSource) else \
        (data.y, data.num_classes)
    eligible = torch.arange(len(labels))
    if classes is not None:
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"queries.classes: {bad} out of range for {data.name} with {num_classes} classes")
        eligible = eligible[torch.isin(labels, torch.tensor(classes))]
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
    """What the driver hands a host for a unit: ids only (a few bytes per query); the host reads the rows."""
    return {"unit_id": unit.unit_id, "model_id": unit.model_id, "method": unit.method, "part": unit.part,
            "query_ids": unit.query_ids.tobytes(), "n": len(unit.query_ids)}


def unit_row(unit: WorkUnit, data: ArrayDataset) -> dict:
    """A unit's descriptor with its query tensors as bytes: a host then reads nothing (tests, direct runs)."""
    index = torch.as_tensor(unit.query_ids)
    x = data.x[index].numpy().astype(np.float32)
    return {
        "unit_id": unit.unit_id, "model_id": unit.model_id, "method": unit.method, "part": unit.part,
        "query_ids": unit.query_ids.tobytes(), "labels": data.y[index].numpy().astype(np.int64).tobytes(),
        "x": x.tobytes(), "n": len(unit.query_ids),
    }
