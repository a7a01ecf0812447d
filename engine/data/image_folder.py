"""`image_folder`: a directory of images with a CelebA-style attribute file (`list_attr_celeba.txt`).

Attribute file: line 1 = image count, line 2 = attribute names, then `filename v1 v2 ...` with ±1 (or 0/1).
Partition file (optional, `list_eval_partition.txt`): `filename code` with 0 = train, 1 = validation, 2 = test.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from engine.data._common import (binary_attribute, check_fraction, check_int, check_size, check_split,
                                 decode_images, row_partition, split_indices, url_to_fs)
from engine.data.base import ArrayDataset
from engine.data.source import StreamingSource


def _join(root: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else root.rstrip("/") + "/" + name


def _read_text(path: str, option: str) -> list[str]:
    fs, fpath = url_to_fs(path)
    if not fs.exists(fpath):
        raise FileNotFoundError(f"image_folder: {option} {path} does not exist")
    with fs.open(fpath, "r") as f:
        return [line for line in f.read().splitlines() if line.strip()]


def read_attribute_file(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """CelebA attribute file -> (filenames [N], attribute names [A], values [N, A] float32 0/1)."""
    lines = _read_text(path, "attribute file")
    if len(lines) < 2:
        raise ValueError(f"image_folder: attribute file {path} needs a count line and a names line, "
                         f"has {len(lines)} lines")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise ValueError(f"image_folder: attribute file {path} line 1 must be the image count, "
                         f"got {lines[0][:80]!r}") from None
    names = lines[1].split()
    rows = [line.split() for line in lines[2:]]
    if len(rows) != count:
        raise ValueError(f"image_folder: attribute file {path} declares {count} images on line 1 "
                         f"but lists {len(rows)}")
    for i, row in enumerate(rows):
        if len(row) != len(names) + 1:
            raise ValueError(f"image_folder: attribute file {path} line {i + 3} has {len(row) - 1} values, "
                             f"expected {len(names)} (one per attribute name)")
    try:
        values = np.array([row[1:] for row in rows], dtype=np.int64).reshape(len(rows), len(names))
    except ValueError as err:
        raise ValueError(f"image_folder: attribute file {path}: values must be integers -1/1 or 0/1 ({err})") from None
    values = binary_attribute(values, f"image_folder: attribute file {path}")
    return [row[0] for row in rows], names, values


def read_partition_file(path: str) -> dict[str, int]:
    """CelebA partition file -> {filename: code}."""
    out = {}
    for i, line in enumerate(_read_text(path, "partition file")):
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"image_folder: partition file {path} line {i + 1} must be 'filename code', "
                             f"got {line[:80]!r}")
        out[parts[0]] = int(parts[1])
    return out


class ImageFolderSource(StreamingSource):
    """An `image_folder` split: file names, labels and attributes held, images read and decoded per `take`."""

    def __init__(self, split: str, *, files: list[str], y: np.ndarray, attributes: np.ndarray, keep: list[str],
                 label_attribute: str, images: str, attr_path: str, channels: Optional[int],
                 size: Optional[tuple[int, int]], center_crop: Optional[int], meta: dict) -> None:
        self.files, self.images, self.attr_path = files, images, attr_path
        self.fs, self.base = url_to_fs(images)
        self.attributes = attributes.astype(np.bool_)  # [N, A] 0/1: a byte each, widened per take
        self.channels, self.size, self.center_crop = channels, size, center_crop
        x0, _ = self._read(np.zeros(1, dtype=np.int64))  # the shape, and channels=None's choice, of image 0
        self.channels = int(x0.shape[1]) if channels is None else channels
        info = ArrayDataset(
            name="image_folder", x=torch.zeros(0, *x0.shape[1:]), y=torch.zeros(0, dtype=torch.int64),
            class_names=[f"not_{label_attribute}", label_attribute], kind="image",
            attributes=torch.zeros(0, len(keep)), attribute_names=keep, meta=meta)
        super().__init__(info, torch.from_numpy(y), split)

    def _read(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        names = [self.files[i] for i in positions]
        blobs = []
        for name in names:
            try:
                blobs.append(self.fs.cat_file(self.base.rstrip("/") + "/" + name))
            except FileNotFoundError:
                raise FileNotFoundError(f"image_folder: image {name!r} listed in {self.attr_path} not found "
                                        f"in {self.images}") from None
        x = decode_images(blobs, f"image_folder {self.images}", channels=self.channels, size=self.size,
                          center_crop=self.center_crop, names=names)
        return torch.from_numpy(x), torch.from_numpy(self.attributes[positions].astype(np.float32))


def open_image_folder(split: str = "train", *, path: str, label_attribute: str,
                      attr_file: str = "list_attr_celeba.txt", image_dir: Optional[str] = None,
                      attributes: Optional[Sequence[str]] = None, partition_file: Optional[str] = None,
                      test_partitions: Optional[Sequence[int]] = None, test_fraction: float = 0.2, seed: int = 0,
                      size=None, center_crop: Optional[int] = None, channels: int = 3,
                      limit: Optional[int] = None) -> ImageFolderSource:
    """Open a split for `take` (options as `load_image_folder`): reads the attribute and partition files and
    the split's first image (for its shape); no other image."""
    check_split("image_folder", split)
    size = check_size("image_folder", size)
    test_fraction = check_fraction("image_folder", "test_fraction", test_fraction, open_ends=True)
    if limit is not None:
        limit = check_int("image_folder", "limit", limit, minimum=1)
    if center_crop is not None:
        center_crop = check_int("image_folder", "center_crop", center_crop, minimum=1)
    fs, root = url_to_fs(path)
    if not fs.isdir(root):
        raise FileNotFoundError(f"image_folder: directory {path} (option 'path') does not exist")
    attr_path = _join(str(path), attr_file)
    files, names, values = read_attribute_file(attr_path)
    if label_attribute not in names:
        raise ValueError(f"image_folder: option 'label_attribute' {label_attribute!r} is not a column of "
                         f"{attr_path}; available attributes: {names}")
    others = [n for n in names if n != label_attribute]
    keep = others if attributes is None else ([attributes] if isinstance(attributes, str) else list(attributes))
    unknown = [a for a in keep if a not in others]
    if unknown:
        raise ValueError(f"image_folder: option 'attributes' names {unknown} not among the attributes of "
                         f"{attr_path} (other than the label {label_attribute!r}): {others}")
    y = values[:, names.index(label_attribute)].astype(np.int64)

    if partition_file is not None:
        part_path = _join(str(path), partition_file)
        codes = read_partition_file(part_path)
        missing = [f for f in files if f not in codes]
        if missing:
            raise ValueError(f"image_folder: partition file {part_path} has no entry for {len(missing)} images "
                             f"of {attr_path}, e.g. {missing[:3]}")
        rows = np.flatnonzero(row_partition(np.array([codes[f] for f in files], dtype=np.int64), split,
                                            test_partitions, f"image_folder: partition file {part_path}"))
    else:
        rows = split_indices(y, split, test_fraction, seed)
    if limit is not None:
        rows = rows[:limit]
    if not len(rows):
        raise ValueError(f"image_folder: no images for split {split!r} in {attr_path}")

    if image_dir is None:
        default = root.rstrip("/") + "/img_align_celeba"
        images = _join(str(path), "img_align_celeba") if fs.isdir(default) else str(path)
    else:
        images = _join(str(path), image_dir)
    split_files = [files[i] for i in rows]
    idx = [names.index(a) for a in keep]
    return ImageFolderSource(
        split, files=split_files, y=y[rows], attributes=values[rows][:, idx], keep=keep,
        label_attribute=label_attribute, images=images, attr_path=attr_path, channels=channels, size=size,
        center_crop=center_crop,
        meta={"source": str(path), "attr_file": attr_path, "files": split_files,
              "label_attribute": label_attribute, "seed": seed, "limit": limit})


def load_image_folder(split: str = "train", *, path: str, label_attribute: str,
                      attr_file: str = "list_attr_celeba.txt", image_dir: Optional[str] = None,
                      attributes: Optional[Sequence[str]] = None, partition_file: Optional[str] = None,
                      test_partitions: Optional[Sequence[int]] = None, test_fraction: float = 0.2, seed: int = 0,
                      size=None, center_crop: Optional[int] = None, channels: int = 3,
                      limit: Optional[int] = None) -> ArrayDataset:
    """x [N, C, H, W] float32 in [0, 1]; y [N] = `label_attribute` (0/1); attributes [N, A] = the other ones.

    path: the dataset directory; attr_file, partition_file and image_dir are relative to it (image_dir
    defaults to path/img_align_celeba when that exists, else path). attributes: which of the other attributes
    to keep (default all). Without a partition file the split is stratified by `test_fraction` and `seed`.
    center_crop: square crop side applied before `size` (int or [h, w]) resizing.
    """
    source = open_image_folder(
        split, path=path, label_attribute=label_attribute, attr_file=attr_file, image_dir=image_dir,
        attributes=attributes, partition_file=partition_file, test_partitions=test_partitions,
        test_fraction=test_fraction, seed=seed, size=size, center_crop=center_crop, channels=channels,
        limit=limit)
    return source.take(np.arange(len(source)))
