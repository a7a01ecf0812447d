"""Read `cfaudit augment` output as training data: an ArrayDataset (label = target class) and torch views."""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

from engine.data.base import ArrayDataset
from engine.store.commit import list_files
from engine.store.uri import filesystem, join


def augmented_files(out: str) -> list[str]:
    return list(list_files(join(out, "augmented"), re.compile(r"model=[^/]+/method=[^/]+/part-[^/]*\.parquet$")))


def load_augmented(out: str, models: Optional[Sequence[str]] = None,
                   methods: Optional[Sequence[str]] = None) -> ArrayDataset:
    """Every kept sample under <out>/augmented (optionally of some models / methods), in sample_id order.

    y is the sample's label, its target class; meta["provenance"] holds the provenance columns.
    """
    files = augmented_files(out)
    if not files:
        raise FileNotFoundError(f"no augmented samples under {join(out, 'augmented')}: run `cfaudit augment` first")
    xs, frames, meta = [], [], None
    for uri in files:
        fs, path = filesystem(uri)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        meta = meta or json.loads(table.schema.metadata[b"cfaudit.augmented"])
        keep = np.ones(table.num_rows, dtype=bool)
        if models is not None:
            keep &= np.isin(table.column("model_id").to_numpy(zero_copy_only=False), list(models))
        if methods is not None:
            keep &= np.isin(table.column("method").to_numpy(zero_copy_only=False), list(methods))
        if not keep.any():
            continue
        table = table.filter(keep)
        xs.append(table.column("x").combine_chunks().to_numpy_ndarray())
        frames.append(table.drop_columns(["x"]).to_pydict())
    shape = tuple(meta["input_shape"])
    x = np.concatenate(xs) if xs else np.zeros((0, *shape), np.float32)
    provenance = {k: sum((f[k] for f in frames), []) for k in (frames[0] if frames else {})}
    order = np.argsort(np.array(provenance.get("sample_id", []), dtype=object), kind="stable")
    provenance = {k: [v[i] for i in order] for k, v in provenance.items()}
    return ArrayDataset(
        name=f"augmented:{meta['dataset']}", x=torch.from_numpy(np.ascontiguousarray(x[order])),
        y=torch.tensor(provenance.get("label", []), dtype=torch.int64), class_names=list(meta["class_names"]),
        kind="image" if len(shape) == 3 else "tabular", value_range=tuple(meta["value_range"]),
        meta={"source": join(out, "augmented"), "provenance": provenance, "plausibility": meta["plausibility"]})


def concat(base: ArrayDataset, extra: ArrayDataset) -> ArrayDataset:
    """base followed by extra (same input shape and classes); attributes are dropped."""
    if base.input_shape != extra.input_shape or list(base.class_names) != list(extra.class_names):
        raise ValueError(f"cannot concatenate {extra.name} (shape {extra.input_shape}, classes {extra.class_names}) "
                         f"to {base.name} (shape {base.input_shape}, classes {base.class_names})")
    return ArrayDataset(name=f"{base.name}+{extra.name}", x=torch.cat([base.x, extra.x.to(base.x.dtype)]),
                        y=torch.cat([base.y, extra.y]), class_names=list(base.class_names), kind=base.kind,
                        value_range=base.value_range, feature_names=base.feature_names, schema=base.schema,
                        meta={"parts": [base.name, extra.name], "sizes": [len(base), len(extra)]})


def as_torch(data: ArrayDataset) -> Dataset:
    """A torch Dataset of (x, y) pairs."""
    return TensorDataset(data.x, data.y)


def torch_concat(*parts: ArrayDataset) -> Dataset:
    """torch's ConcatDataset of the parts, e.g. the original training data and the augmented samples."""
    return ConcatDataset([as_torch(p) for p in parts])
