"""IDX files (the MNIST format) and the `mnist` / `fashion_mnist` loaders built on them."""
from __future__ import annotations

import gzip
import os
import struct
from typing import Optional

import numpy as np
import torch

from engine.data._common import check_int, check_split, url_to_fs
from engine.data.base import ArrayDataset

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str, limit: Optional[int] = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed when the name ends in .gz) -> array [n, *dims] (first `limit` rows).

    Checks the magic number (two zero bytes, a known type byte, ndim >= 1) and that the data size
    matches the header.
    """
    fs, fpath = url_to_fs(path)
    with fs.open(fpath, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if str(fpath).endswith(".gz") else raw
        try:
            magic = f.read(4)
        except OSError as err:  # not a gzip stream
            raise ValueError(f"{path}: cannot read as a gzip-compressed IDX file: {err}") from err
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES or magic[3] == 0:
            raise ValueError(f"{path}: bad IDX magic number {magic.hex()!r}; expected 0000TTDD with type byte "
                             f"TT in {[f'{t:02x}' for t in IDX_DTYPES]} and DD = number of dimensions >= 1")
        dtype, ndim = np.dtype(IDX_DTYPES[magic[2]]), magic[3]
        header = f.read(4 * ndim)
        if len(header) < 4 * ndim:
            raise ValueError(f"{path}: IDX header truncated: expected {ndim} dimension sizes")
        dims = struct.unpack(f">{ndim}I", header)
        rows = dims[0] if limit is None else min(dims[0], limit)
        row_bytes = int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize
        want = rows * row_bytes
        data = f.read(want)
        if len(data) != want:
            raise ValueError(f"{path}: IDX data truncated: header says {dims} ({want} bytes for {rows} rows), "
                             f"found {len(data)} bytes")
        if limit is None and f.read(1):
            raise ValueError(f"{path}: IDX file has trailing bytes after the {dims} array the header declares")
    return np.frombuffer(data, dtype=dtype).reshape((rows, *dims[1:])).astype(dtype.newbyteorder("="))


def _find(root: str, stem: str) -> Optional[str]:
    fs, base = url_to_fs(root)
    for name in (stem + ".gz", stem):
        candidate = base.rstrip("/") + "/" + name
        if fs.exists(candidate):
            return root.rstrip("/") + "/" + name
    return None


def load_idx_pair(name: str, split: str, root: str, class_names: list[str], how_to_get: str,
                  limit: Optional[int]) -> ArrayDataset:
    """Images + labels from the standard pair of IDX files in `root`."""
    check_split(name, split)
    if limit is not None:
        limit = check_int(name, "limit", limit, minimum=1)
    paths = []
    for stem in FILES[split]:
        found = _find(root, stem)
        if found is None:
            fs, base = url_to_fs(root)
            where = root if fs.isdir(base) else f"{root} (no such directory)"
            raise FileNotFoundError(f"{name}: {stem}.gz (or {stem}) not found in {where}; {how_to_get}")
        paths.append(found)
    images, labels = read_idx(paths[0], limit), read_idx(paths[1], limit)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{name}: expected images [N, H, W] in {paths[0]} and labels [N] in {paths[1]}, "
                         f"got shapes {images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{name}: {paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"{name}: labels in {paths[1]} must be in [0, {len(class_names)}), "
                         f"found [{labels.min()}, {labels.max()}]")
    scale = 255.0 if images.dtype == np.uint8 else 1.0
    x = torch.from_numpy(images.astype(np.float32) / np.float32(scale)).unsqueeze(1)
    return ArrayDataset(name=name, x=x, y=torch.from_numpy(labels.astype(np.int64)),
                        class_names=list(class_names), kind="image",
                        meta={"source": paths, "limit": limit})


def _root(option: Optional[str], env: str, default: str) -> str:
    return str(option) if option is not None else os.environ.get(env) or default


def load_fashion_mnist(split: str = "train", *, root: Optional[str] = None,
                       limit: Optional[int] = None) -> ArrayDataset:
    """Fashion-MNIST: x [N, 1, 28, 28] float32 in [0, 1] (60,000 train / 10,000 test), y [N] in 0..9.

    root: directory of the IDX .gz files; default $CFAUDIT_FASHION_MNIST_DIR, else the Debian package's
    /usr/share/datasets/fashion-mnist. limit: keep the first n rows.
    """
    root = _root(root, "CFAUDIT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
    how = ("install it with `apt-get install dataset-fashion-mnist`, or set CFAUDIT_FASHION_MNIST_DIR or "
           "option 'root' to a directory holding the four IDX .gz files")
    return load_idx_pair("fashion_mnist", split, root, FASHION_MNIST_CLASSES, how, limit)


def load_mnist(split: str = "train", *, root: Optional[str] = None, limit: Optional[int] = None) -> ArrayDataset:
    """MNIST digits from IDX files: x [N, 1, 28, 28] float32 in [0, 1], y [N] in 0..9.

    root: directory of the IDX .gz files; default $CFAUDIT_MNIST_DIR, else /usr/share/datasets/mnist.
    """
    root = _root(root, "CFAUDIT_MNIST_DIR", "/usr/share/datasets/mnist")
    how = ("download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
           "t10k-labels-idx1-ubyte.gz and set CFAUDIT_MNIST_DIR or option 'root' to their directory")
    return load_idx_pair("mnist", split, root, [str(i) for i in range(10)], how, limit)
