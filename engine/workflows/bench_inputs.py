"""Inputs for the scale benchmarks, made as users bring them: Hugging Face-style Parquet shards of PNG images
(`write_images_parquet`, `cached_images`) and fleets of small TorchScript CNNs (`build_cnn_fleet`), cached under a
data directory so re-runs reuse them."""
from __future__ import annotations

import io
import json
import os
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

from engine.models.architectures import CNNClassifier

Log = Callable[[str], Any]
IMAGE_CLASSES = ["dark-patch", "bright-patch"]
BASES = 256  # distinct smooth base images; rows vary them by a shift, a brightness offset and a labelled patch


def default_data_dir() -> Path:
    """$CFAUDIT_CACHE/bench-scale when set (the tests' temporary cache), else .cfaudit-cache/bench-scale."""
    root = os.environ.get("CFAUDIT_CACHE")
    return Path(root) / "bench-scale" if root else Path(".cfaudit-cache") / "bench-scale"


# Data --------------------------------------------------------------------------------------------------------


def _hash(rows: np.ndarray, seed: int, field: int) -> np.ndarray:
    """splitmix64 of (seed, row, field): counter-based, so a row's image depends on its index alone, not on the
    batch it is drawn in (the 10k set is the first rows of the 100k set)."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as splitmix64 wants
        x = rows.astype(np.uint64) * np.uint64(16) + np.uint64(field) + (np.uint64(seed) << np.uint64(40))
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _bases(size: int, seed: int) -> np.ndarray:
    """BASES smooth RGB images [BASES, size, size, 3] uint8: 6x6 noise upsampled bicubically."""
    low = torch.from_numpy(np.random.default_rng(seed).random((BASES, 3, 6, 6), dtype=np.float32))
    up = torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp_(0, 1)
    return (up * 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()


def image_rows(start: int, count: int, size: int = 64, seed: int = 0,
               bases: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, start + count): images [count, size, size, 3] uint8 and labels [count] int64.

    A row is a base image, rolled by up to size/8 pixels each way and shifted in brightness by up to +-24, with a
    square patch of side size/6 at a random place: dark for label 0, bright for label 1 (what a CNN learns).
    """
    bases = _bases(size, seed) if bases is None else bases
    rows = np.arange(start, start + count, dtype=np.int64)
    draw = [_hash(rows, seed, k) for k in range(7)]
    labels = (draw[0] % np.uint64(2)).astype(np.int64)
    base = (draw[1] % np.uint64(len(bases))).astype(np.int64)
    reach, side = size // 8, max(2, size // 6)
    dy = (draw[2] % np.uint64(2 * reach + 1)).astype(np.int64) - reach
    dx = (draw[3] % np.uint64(2 * reach + 1)).astype(np.int64) - reach
    shift = (draw[4] % np.uint64(49)).astype(np.int16) - 24
    py = (draw[5] % np.uint64(size - side)).astype(np.int64)
    px = (draw[6] % np.uint64(size - side)).astype(np.int64)
    grid = np.arange(size)
    iy = (grid[None, :] - dy[:, None]) % size  # np.roll by dy, per row
    ix = (grid[None, :] - dx[:, None]) % size
    images = bases[base[:, None, None], iy[:, :, None], ix[:, None, :]].astype(np.int16)  # [B, S, S, 3]
    images = np.clip(images + shift[:, None, None, None], 0, 255)
    inside = (((grid[None, :] >= py[:, None]) & (grid[None, :] < py[:, None] + side))[:, :, None]
              & ((grid[None, :] >= px[:, None]) & (grid[None, :] < px[:, None] + side))[:, None, :])
    patch = np.where(labels == 1, 235, 20).astype(np.int16)
    images = np.where(inside[..., None], patch[:, None, None, None], images)
    return images.astype(np.uint8), labels


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # PIL's defaults, as `datasets` encodes an Image feature
    return buffer.getvalue()


def image_schema(split_column: bool = False):
    """Hugging Face's layout of an Image + ClassLabel dataset, with the `huggingface` features metadata."""
    features = {"image": {"_type": "Image"}, "label": {"names": IMAGE_CLASSES, "_type": "ClassLabel"}}
    fields = [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())]
    if split_column:
        features["split"] = {"dtype": "string", "_type": "Value"}
        fields.append(("split", pa.string()))
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


def write_images_parquet(directory: os.PathLike, rows: int, *, size: int = 64, seed: int = 0,
                         batch_rows: int = 1000, rows_per_file: int = 25_000, split_column: bool = False,
                         log: Optional[Log] = None) -> list[str]:
    """Write `rows` generated rows as `train-0000i-of-0000n.parquet` shards, one row group per batch of
    `batch_rows` (Hugging Face writes ~1000-row groups), images as {"bytes": PNG, "path": name} structs.

    Batches are drawn, encoded and written one at a time, so memory is one batch, whatever `rows`.
    split_column: add a `split` column, "test" on odd rows and "train" on even ones (test split = rows // 2).
    """
    if rows < 1 or batch_rows < 1 or rows_per_file < 1:
        raise ValueError(f"Expected rows, batch_rows and rows_per_file >= 1 but got {rows}, {batch_rows}, "
                         f"{rows_per_file}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    schema, bases = image_schema(split_column), _bases(size, seed)
    files = -(-rows // rows_per_file)
    paths, start_time = [], time.perf_counter()
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:  # PIL's encoder releases the GIL
        for f in range(files):
            path = directory / f"train-{f:05d}-of-{files:05d}.parquet"
            first, last = f * rows_per_file, min(rows, (f + 1) * rows_per_file)
            with pq.ParquetWriter(str(path), schema) as writer:
                for start in range(first, last, batch_rows):
                    count = min(batch_rows, last - start)
                    images, labels = image_rows(start, count, size, seed, bases)
                    blobs = list(pool.map(_png, images, chunksize=64))
                    names = [f"{row:08d}.png" for row in range(start, start + count)]
                    columns = [pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array(names)],
                                                          fields=list(schema.field("image").type)),
                               pa.array(labels)]
                    if split_column:
                        columns.append(pa.array(np.where(np.arange(start, start + count) % 2, "test", "train")))
                    writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=batch_rows)
            paths.append(str(path))
            if log is not None:
                log(f"  data: {last}/{rows} rows written ({f + 1}/{files} files, "
                    f"{time.perf_counter() - start_time:.0f} s)")
    return paths


def cached_images(data_dir: os.PathLike, rows: int, *, size: int = 64, seed: int = 0, split_column: bool = False,
                  log: Optional[Log] = None) -> str:
    """The directory of a generated set under `data_dir`, keyed by its rows (and size, seed, split column);
    made once, in a temporary directory renamed into place, so an interrupted run leaves nothing half-written."""
    key = f"images-{rows}rows-{size}px-seed{seed}" + ("-split" if split_column else "")
    final = Path(data_dir) / key
    if (final / "meta.json").exists():
        return str(final / "data")
    tmp = Path(data_dir) / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log(f"  data: generating {rows} rows of {size}x{size} RGB PNGs under {final}")
    start = time.perf_counter()
    write_images_parquet(tmp / "data", rows, size=size, seed=seed, split_column=split_column, log=log)
    (tmp / "meta.json").write_text(json.dumps({"rows": rows, "size": size, "seed": seed,
                                               "split_column": split_column,
                                               "seconds": round(time.perf_counter() - start, 1)}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return str(final / "data")


# Models ------------------------------------------------------------------------------------------------------


def build_cnn_fleet(root: os.PathLike, count: int, *, size: int = 64, seed: int = 0, width: int = 16,
                    fc_hidden: Sequence[int] = (512, 64), train_steps: int = 0, train_rows: int = 2000,
                    log: Optional[Log] = None) -> list[dict]:
    """`count` TorchScript CNNs (engine's CNNClassifier, 3 x size x size -> 2 logits) saved with torch.jit.save
    under <root>/<key of the arguments>/cnn-<i>.ts; their fleet entries (made once, reused after).

    Model i is initialised from seed + i, so every model's weights differ; with train_steps > 0 it then takes
    that many Adam steps (batch 32, lr 2e-3) on `train_rows` generated rows (80 steps reach ~0.95 train
    accuracy at width 8, ~1 s a step on 2 CPU cores). train_steps=0: random-init, deterministic.
    Width 16, fc_hidden (512, 64) at 64 px: 4.3M parameters, a 16.2 MiB file.
    """
    key = f"cnn-{size}px-w{width}-fc{'x'.join(map(str, fc_hidden))}-steps{train_steps}-seed{seed}"
    directory = Path(root) / key
    directory.mkdir(parents=True, exist_ok=True)
    entries, x, y, built, start = [], None, None, 0, time.perf_counter()
    for i in range(count):
        path = directory / f"cnn-{i:03d}.ts"
        entries.append({"id": f"m{i:02d}", "path": str(path), "format": "torchscript", "trust": True})
        if path.exists():
            continue
        if x is None:  # the training rows (two, to trace with, for a random-init fleet)
            images, labels = image_rows(0, train_rows if train_steps else 2, size, seed)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
            y = torch.from_numpy(labels)
        torch.manual_seed(seed + i)
        net = CNNClassifier(3, size, 2, width=width, fc_hidden=fc_hidden)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        order = torch.Generator().manual_seed(seed + i)
        net.train()
        for _ in range(train_steps):
            idx = torch.randint(len(x), (32,), generator=order)
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        net.eval()
        if train_steps:
            with torch.no_grad():
                trained = f"{train_steps} training steps, train accuracy " \
                          f"{float((net(x[:500]).argmax(1) == y[:500]).float().mean()):.2f}"
        else:
            trained = "random-init"
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; users still ship it
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.trace(net, x[:2]), str(tmp))
        os.replace(tmp, path)
        built += 1
        if log is not None and (train_steps or built == 1):
            log(f"  model {entries[-1]['id']}: {trained}, {path.stat().st_size / 2**20:.1f} MiB")
    if log is not None and built > 1:
        log(f"  models: {built} built under {directory} ({time.perf_counter() - start:.0f} s)")
    return entries


def model_size_mib(entry: dict) -> float:
    return os.path.getsize(entry["path"]) / 2**20
