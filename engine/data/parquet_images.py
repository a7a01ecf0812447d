"""`parquet_images`: users' images in Parquet (a file or a directory of files, any fsspec path).

The image column holds encoded images (PNG/JPEG bytes, or a {"bytes": ...} struct as Hugging Face writes
them) or numeric tensors (nested lists or Arrow fixed-shape tensors, [H, W], [C, H, W] or [H, W, C]).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from engine.data._common import (binary_attribute, check_fraction, check_int, check_size, check_split,
                                 decode_images, encode_labels, missing_column, row_partition, split_indices,
                                 url_to_fs)
from engine.data.base import ArrayDataset
from engine.data.parquet_rows import RowGroupIndex
from engine.data.source import StreamingSource


def _nested_to_numpy(arr: pa.Array, where: str) -> np.ndarray:
    """A (fixed-size) list-of-list... array of numbers [N] -> ndarray [N, *dims]; every row must share dims."""
    if isinstance(arr.type, pa.FixedShapeTensorType):
        return np.asarray(arr.to_numpy_ndarray())
    dims = []
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise ValueError(f"{where}: {arr.null_count} null values inside the nested lists")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError(f"{where}: nested lists have different lengths {sorted(set(lengths.tolist()))[:5]} "
                             f"at depth {len(dims) + 1}; every image must have the same shape")
        dims.append(int(lengths[0]) if len(lengths) else 0)
        arr = arr.flatten()
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        raise ValueError(f"{where}: expected numbers inside the nested lists, got {arr.type}")
    if arr.null_count:
        raise ValueError(f"{where}: {arr.null_count} null pixel values")
    n = len(arr) // max(int(np.prod(dims)), 1) if dims else len(arr)
    return arr.to_numpy(zero_copy_only=False).reshape(n, *dims)


def _to_chw(values: np.ndarray, where: str) -> np.ndarray:
    """[N, H, W] | [N, C, H, W] | [N, H, W, C] (C in 1, 3, 4... channels-first preferred) -> [N, C, H, W]."""
    if values.ndim == 3:
        return values[:, None]
    if values.ndim == 4:
        if values.shape[1] in (1, 3) or values.shape[-1] not in (1, 3, 4):
            return values
        return values.transpose(0, 3, 1, 2)
    raise ValueError(f"{where}: expected image tensors [H, W], [C, H, W] or [H, W, C], got per-row shape "
                     f"{list(values.shape[1:])}")


def _image_array(col: pa.ChunkedArray, where: str, channels: Optional[int],
                 size: Optional[tuple[int, int]]) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_struct(arr.type):
        if arr.type.get_field_index("bytes") < 0:
            raise ValueError(f"{where}: struct image column needs a 'bytes' field, has {arr.type}")
        arr = arr.field("bytes")
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        if arr.null_count:
            raise ValueError(f"{where}: {arr.null_count} rows have no image bytes")
        return decode_images(arr.to_pylist(), where, channels=channels, size=size)
    values = _to_chw(_nested_to_numpy(arr, where), where)
    if values.dtype == np.uint8:
        values = values.astype(np.float32) / np.float32(255.0)
    values = np.array(values, dtype=np.float32, order="C")  # a writable copy: Arrow buffers are read-only
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"{where}: float pixel values must lie in [0, 1] (or be uint8 0..255), "
                         f"found [{values.min():.3g}, {values.max():.3g}]")
    x = torch.from_numpy(values)
    if size is not None and tuple(x.shape[-2:]) != size:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.numpy()


class ParquetImagesSource(StreamingSource):
    """A `parquet_images` split: labels and the row-group index held, images decoded per `take`."""

    def __init__(self, split: str, *, data, index: RowGroupIndex, rows: np.ndarray, y: np.ndarray,
                 names: list[str], where: str, image_column: str, attribute_columns: list[str],
                 channels: Optional[int], size: Optional[tuple[int, int]], meta: dict) -> None:
        self.data, self.index, self.rows, self.where = data, index, rows, where
        self.image_column, self.attribute_columns, self.size = image_column, attribute_columns, size
        self.channels = channels
        # channels default to the split's first image's (as load_dataset decodes it); fixed here for every take
        x0, _ = self._read(np.zeros(1, dtype=np.int64), attributes=False)
        self.channels = int(x0.shape[1]) if channels is None else channels
        info = ArrayDataset(
            name="parquet_images", x=torch.zeros(0, *x0.shape[1:]), y=torch.zeros(0, dtype=torch.int64),
            class_names=names, kind="image",
            attributes=torch.zeros(0, len(attribute_columns)) if attribute_columns else None,
            attribute_names=attribute_columns, meta=meta)
        super().__init__(info, torch.from_numpy(y), split)

    def _read(self, positions: np.ndarray, attributes: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        columns = [self.image_column] + (self.attribute_columns if attributes else [])
        table = self.index.read(self.rows[positions], columns, self.data.schema)
        x = _image_array(table.column(self.image_column), f"{self.where} column {self.image_column!r}",
                         self.channels, self.size)
        attrs = None
        if attributes and self.attribute_columns:
            attrs = torch.from_numpy(np.stack(
                [binary_attribute(table.column(c).to_numpy(zero_copy_only=False), f"{self.where} column {c!r}")
                 for c in self.attribute_columns], axis=1))
        return torch.from_numpy(x), attrs


def open_parquet_images(split: str = "train", *, path: str, image_column: str = "image",
                        label_column: str = "label", attribute_columns: Optional[Sequence[str]] = None,
                        split_column: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                        test_partitions: Optional[Sequence[int]] = None, test_fraction: float = 0.2,
                        seed: int = 0, size=None, channels: Optional[int] = None,
                        limit: Optional[int] = None) -> ParquetImagesSource:
    """Open a split for `take` (options as `load_parquet_images`): reads the footers, labels and split column,
    and the split's first image (for its shape and default channels); no other image."""
    import pyarrow.dataset as pads  # deferred: pyarrow.dataset loads only when a Parquet split is scanned

    where = f"parquet_images {path}"
    check_split("parquet_images", split)
    size = check_size("parquet_images", size)
    test_fraction = check_fraction("parquet_images", "test_fraction", test_fraction, open_ends=True)
    if limit is not None:
        limit = check_int("parquet_images", "limit", limit, minimum=1)
    attribute_columns = [attribute_columns] if isinstance(attribute_columns, str) else list(attribute_columns or [])
    fs, fpath = url_to_fs(path)
    if not fs.exists(fpath):
        raise FileNotFoundError(f"parquet_images: file {path} (option 'path') does not exist")
    try:
        data = pads.dataset(fpath, filesystem=fs, format="parquet")
        index = RowGroupIndex(data)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{where} (option 'path'): cannot be read as Parquet: {str(err).splitlines()[-1]}") from None
    available = data.schema.names
    wanted = [("image_column", image_column), ("label_column", label_column)]
    wanted += [("split_column", split_column)] if split_column is not None else []
    wanted += [("attribute_columns", c) for c in attribute_columns]
    for option, column in wanted:
        if column not in available:
            raise missing_column(where, option, column, available)

    keys = data.to_table(columns=[label_column] + ([split_column] if split_column else []))
    labels = keys.column(label_column)
    if labels.null_count:
        raise ValueError(f"{where}: label column {label_column!r} has {labels.null_count} null values")
    y, names = encode_labels(labels.to_numpy(), class_names, f"{where} column {label_column!r}", dense_ints=True)
    if split_column is not None:
        rows = np.flatnonzero(row_partition(keys.column(split_column).to_numpy(zero_copy_only=False), split,
                                            test_partitions, f"{where} column {split_column!r}"))
    else:
        rows = split_indices(y, split, test_fraction, seed)
    if limit is not None:
        rows = rows[:limit]
    if not len(rows):
        raise ValueError(f"{where}: no rows for split {split!r}")
    return ParquetImagesSource(
        split, data=data, index=index, rows=rows.astype(np.int64), y=y[rows], names=names, where=where,
        image_column=image_column, attribute_columns=attribute_columns, channels=channels, size=size,
        meta={"source": str(path), "image_column": image_column, "label_column": label_column,
              "split_column": split_column, "seed": seed, "limit": limit})


def load_parquet_images(split: str = "train", *, path: str, image_column: str = "image",
                        label_column: str = "label", attribute_columns: Optional[Sequence[str]] = None,
                        split_column: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                        test_partitions: Optional[Sequence[int]] = None, test_fraction: float = 0.2,
                        seed: int = 0, size=None, channels: Optional[int] = None,
                        limit: Optional[int] = None) -> ArrayDataset:
    """x [N, C, H, W] float32 in [0, 1] (uint8 scaled by 1/255), y [N] int64, attributes [N, A] 0/1.

    Labels: integers index class_names (default "0".."K-1"); other values map to sorted unique names.
    Splits: `split_column` of "train"/"test" strings or integer codes (0 = train, test = `test_partitions`,
    default every non-zero code); without one, a stratified `test_fraction` split by `seed`.
    size: resize to int or [h, w]. channels: 1 or 3 for encoded images (default: the first image's).
    """
    source = open_parquet_images(
        split, path=path, image_column=image_column, label_column=label_column,
        attribute_columns=attribute_columns, split_column=split_column, class_names=class_names,
        test_partitions=test_partitions, test_fraction=test_fraction, seed=seed, size=size, channels=channels,
        limit=limit)
    return source.take(np.arange(len(source)))
