"""Split sources: one split of a dataset read a block of rows at a time, `open_split(name, split, **options)`.

A process holds a source's labels and row index, never the whole split: `take(index)` decodes only the rows
asked for. `parquet_images`, `image_folder`, `tabular` and `text` stream; every other dataset is loaded
whole and wrapped.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from engine.data.base import ArrayDataset
from engine.data.registry import check_options, load_dataset

# Datasets with a streaming opener `fn(split, *, options...) -> SplitSource`, same options as their loader.
# Imported only when used, like the registry's loaders.
_STREAMERS: dict[str, str] = {
    "parquet_images": "engine.data.parquet_images:open_parquet_images",
    "image_folder": "engine.data.image_folder:open_image_folder",
    "tabular": "engine.data.tabular:open_tabular",
    "text": "engine.data.text:open_text",
}


class SplitSource:
    """One split of a dataset; `take` returns rows as an `ArrayDataset`, equal to `load_dataset(...).subset`.

    info: zero rows ([0, *input_shape]) with the split's names, kind, value_range and meta.
    labels: [N] int64, the whole split's labels. rows_read: sample rows decoded into x so far (a streaming
    source's one-image probe at open, for the shape and default channels, is not counted).
    """

    name: str
    split: str
    info: ArrayDataset
    labels: torch.Tensor
    rows_read: int

    def __init__(self, info: ArrayDataset, labels: torch.Tensor, split: str) -> None:
        self.name, self.split, self.info, self.labels, self.rows_read = info.name, split, info, labels, 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def streaming(self) -> bool:
        return False

    def take(self, index) -> ArrayDataset:
        """Rows at split positions `index` ([K] ints, any order, repeats allowed), in that order."""
        raise NotImplementedError

    def blocks(self, index, rows: int) -> Iterator[ArrayDataset]:
        """`take(index)` in consecutive blocks of at most `rows` rows (peak memory ~ `rows` samples)."""
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"{self.name}: blocks() argument 'rows' must be a positive integer, got {rows!r}")
        index = self._positions(index)
        for start in range(0, len(index), int(rows)):
            yield self.take(index[start:start + int(rows)])

    def sample(self, count: int, seed: int) -> ArrayDataset:
        """The rows at `sample_positions(count, seed)`."""
        return self.take(self.sample_positions(count, seed))

    def sample_positions(self, count: int, seed: int) -> np.ndarray:
        """[min(count, N)] int64: every position in order when count >= len(self); else `count` seeded
        positions, sorted."""
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"{self.name}: sample() argument 'count' must be a non-negative integer, "
                             f"got {count!r}")
        n = len(self)
        if count >= n:
            return np.arange(n, dtype=np.int64)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return perm[:count].sort().values.numpy()

    def _positions(self, index) -> np.ndarray:
        """index -> [K] int64 numpy in [0, N) (negatives count from the end, as tensor indexing does)."""
        if isinstance(index, torch.Tensor):
            index = index.detach().cpu().numpy()
        index = np.asarray(index)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise ValueError(f"{self.name}: index must be a 1-D array of integer row positions, "
                             f"got shape {list(index.shape)} dtype {index.dtype}")
        index = index.astype(np.int64)
        n = len(self)
        bad = index[(index < -n) | (index >= n)]
        if bad.size:
            raise IndexError(f"{self.name} {self.split}: row positions {bad[:5].tolist()} out of range "
                             f"for {n} rows")
        return np.where(index < 0, index + n, index)


class InMemorySource(SplitSource):
    """A split already loaded as an `ArrayDataset` (built-in and runtime-registered datasets): take = subset."""

    def __init__(self, data: ArrayDataset, split: Optional[str] = None) -> None:
        split = split or data.meta.get("split", "train")
        super().__init__(data.subset(torch.zeros(0, dtype=torch.int64)), data.y, split)
        self.data = data
        self.rows_read = len(data)  # loaded whole: every row was decoded up front

    def take(self, index) -> ArrayDataset:
        return self.data.subset(torch.from_numpy(self._positions(index)))


class StreamingSource(SplitSource):
    """A split read from storage on demand: subclasses say how to decode sorted, distinct positions."""

    @property
    def streaming(self) -> bool:
        return True

    def _read(self, positions: np.ndarray) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Sorted distinct split positions [K] -> (x [K, *input_shape], attributes [K, A] or None)."""
        raise NotImplementedError

    def take(self, index) -> ArrayDataset:
        index = self._positions(index)
        info = self.info
        if not len(index):
            return info.subset(torch.zeros(0, dtype=torch.int64))
        # Each row is decoded once, in storage order; repeats and the caller's order come from indexing.
        unique, inverse = np.unique(index, return_inverse=True)
        x, attributes = self._read(unique)
        self.rows_read += len(unique)
        if tuple(x.shape[1:]) != info.input_shape:
            raise ValueError(f"{self.name} {info.meta.get('source', '')}: rows have shape {list(x.shape[1:])} but "
                             f"the split's first row has {list(info.input_shape)}; set option 'size' to resize "
                             f"them to one size")
        if len(unique) != len(index) or (unique != index).any():
            inverse = torch.from_numpy(inverse.reshape(-1))
            x = x[inverse]
            attributes = None if attributes is None else attributes[inverse]
        return ArrayDataset(name=info.name, x=x, y=self.labels[torch.from_numpy(index)],
                            class_names=info.class_names, kind=info.kind, value_range=info.value_range,
                            attributes=attributes, attribute_names=info.attribute_names,
                            feature_names=info.feature_names, meta=dict(info.meta), schema=info.schema)


def _streamer(name: str) -> Optional[Callable[..., SplitSource]]:
    target = _STREAMERS.get(name)
    if target is None:
        return None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def open_split(name: str, split: str = "train", **options: Any) -> SplitSource:
    """Open one split of dataset `name` for `take`; options and errors as `load_dataset`.

    parquet_images, image_folder, tabular and text stream: the source holds labels and a row index (text: token
    ids), and reads and decodes only the rows each `take` asks for. Every other dataset is loaded whole into
    an `InMemorySource`.
    """
    check_options(name, split, options)
    opener = _streamer(name)
    if opener is None:
        source = InMemorySource(load_dataset(name, split, **options), split)
    else:
        source = opener(split, **options)
        source.info.meta.setdefault("dataset", name)
        source.info.meta["split"] = split
        source.info.meta["options"] = dict(options)
    source.name = name  # as registered: a loader may name its ArrayDataset otherwise
    return source
