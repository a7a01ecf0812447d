"""Split sources: `open_split(...).take(index)` equals `load_dataset(...).subset(index)`, and streaming
sources decode only the rows asked for."""
from __future__ import annotations

import inspect
import io
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from engine.data import SplitSource, load_dataset, open_split, register_dataset
from engine.data import image_folder as image_folder_module
from engine.data import parquet_images as parquet_module
from engine.data import registry
from engine.data.source import InMemorySource
from tests.fixtures.images import png_bytes, random_images
from tests.fixtures.sources import SpyFragment, assert_same_split, assert_streamed_take_matches, shuffled_index


_png = png_bytes


def _images(n: int, h: int = 8, w: int = 6, c: int = 3, seed: int = 0) -> np.ndarray:
    return random_images(n, h, w, c, seed)


def _table(n: int, seed: int = 0) -> pa.Table:
    images = _images(n, seed=seed)
    blobs = [_png(im) for im in images]
    return pa.table({
        "image": blobs,
        "img_struct": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
        "pixels": pa.array(images.tolist(), type=pa.list_(pa.list_(pa.list_(pa.uint8())))),
        "label": [i % 3 for i in range(n)],
        "smile": [1 if i % 2 else -1 for i in range(n)],
        "glasses": [i % 5 == 0 for i in range(n)],
        "part": ["test" if i % 4 == 0 else "train" for i in range(n)],
        "code": [i % 3 for i in range(n)],
    })


@pytest.fixture(scope="module")
def parquet_paths(tmp_path_factory):
    """The same 120 rows as one file and as a directory of three files, in row groups of 16."""
    root = tmp_path_factory.mktemp("parquet")
    table = _table(120)
    pq.write_table(table, root / "one.parquet", row_group_size=16)
    (root / "many").mkdir()
    for i, (lo, hi) in enumerate([(0, 50), (50, 90), (90, 120)]):
        pq.write_table(table.slice(lo, hi - lo), root / "many" / f"part-{i}.parquet", row_group_size=16)
    return {"file": str(root / "one.parquet"), "dir": str(root / "many")}


PARQUET_OPTIONS = [
    {},
    {"split_column": "part", "attribute_columns": ["smile", "glasses"], "class_names": ["a", "b", "c"]},
    {"split_column": "code", "test_partitions": [2], "limit": 20},
    {"size": [5, 7], "channels": 1, "seed": 3, "test_fraction": 0.3},
    {"image_column": "img_struct", "attribute_columns": "glasses"},
    {"image_column": "pixels"},
    {"image_column": "pixels", "size": 4},
]


@pytest.mark.parametrize("layout", ["file", "dir"])
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("options", PARQUET_OPTIONS, ids=lambda o: "-".join(o) or "defaults")
def test_parquet_take_equals_load_subset(parquet_paths, layout, split, options):
    full = load_dataset("parquet_images", split, path=parquet_paths[layout], **options)
    source = open_split("parquet_images", split, path=parquet_paths[layout], **options)
    assert source.streaming and len(source) == len(full) and torch.equal(source.labels, full.y)
    assert source.info.input_shape == full.input_shape and len(source.info) == 0
    assert_same_split(source.take(np.arange(0)), full.subset(torch.zeros(0, dtype=torch.int64)))
    index = shuffled_index(len(full))
    assert_same_split(source.take(index), full.subset(torch.as_tensor(index)))
    assert_same_split(source.take(torch.as_tensor(index[::-1].copy())), full.subset(torch.as_tensor(index[::-1].copy())))
    assert_same_split(source.take(np.array([-1, -2])), full.subset(torch.tensor([-1, -2])))


def test_parquet_channels_default_is_the_splits_first_image(tmp_path):
    images = _images(40, c=3, seed=4)
    blobs = [_png(im) for im in images]
    blobs[3] = _png(images[3][..., 0])  # row 3 (the test split's first) is grayscale, the rest RGB
    pq.write_table(pa.table({"image": blobs, "label": [0] * 40, "part": ["test" if i >= 3 and i % 2 else "train"
                                                                          for i in range(40)]}),
                   tmp_path / "mixed.parquet", row_group_size=8)
    for split in ("train", "test"):
        full = load_dataset("parquet_images", split, path=str(tmp_path / "mixed.parquet"), split_column="part")
        source = open_split("parquet_images", split, path=str(tmp_path / "mixed.parquet"), split_column="part")
        assert source.info.input_shape[0] == (1 if split == "test" else 3)
        index = np.array([5, 1, 2])  # not the first row: channels must still follow it
        assert_same_split(source.take(index), full.subset(torch.as_tensor(index)))


def test_parquet_fsspec_memory_directory():
    import fsspec

    fs = fsspec.filesystem("memory")
    for i, (lo, hi) in enumerate([(0, 30), (30, 60)]):
        buf = io.BytesIO()
        pq.write_table(_table(60).slice(lo, hi - lo), buf, row_group_size=8)
        fs.pipe(f"/cfaudit-source-test/part-{i}.parquet", buf.getvalue())
    try:
        assert_streamed_take_matches("parquet_images", path="memory://cfaudit-source-test", seed=1)
    finally:
        fs.rm("/cfaudit-source-test", recursive=True)


def test_parquet_s3_directory_and_pickled_source(s3):
    import fsspec

    fs = fsspec.filesystem("s3")
    for i, (lo, hi) in enumerate([(0, 40), (40, 60)]):
        buf = io.BytesIO()
        pq.write_table(_table(60, seed=6).slice(lo, hi - lo), buf, row_group_size=16)
        fs.pipe(s3.url("source-test", f"part-{i}.parquet"), buf.getvalue())
    options = {"path": s3.url("source-test"), "split_column": "part", "attribute_columns": ["smile"]}
    assert_streamed_take_matches("parquet_images", seed=2, pickled=True, **options)


@pytest.fixture(scope="module")
def big_parquet(tmp_path_factory):
    """500 tiny grayscale PNG rows, all train, in row groups of 100 (larger than the blocks read)."""
    path = tmp_path_factory.mktemp("big") / "big.parquet"
    blobs = [_png(im) for im in _images(500, h=4, w=4, c=1, seed=5)]
    pq.write_table(pa.table({"image": blobs, "label": [i % 2 for i in range(500)], "part": ["train"] * 500}),
                   path, row_group_size=100)
    return str(path), blobs


def test_parquet_rows_read_counts_only_taken_rows(big_parquet):
    path, _ = big_parquet
    source = open_split("parquet_images", path=path, split_column="part")
    assert source.rows_read == 0 and len(source) == 500  # open reads labels and one probe image only
    source.take(np.array([400, 7, 7, 123, 250, 0]))
    assert source.rows_read == 5  # 5 distinct rows, each decoded once


def test_parquet_blocks_decode_at_most_a_block(big_parquet, monkeypatch):
    path, blobs = big_parquet
    source = open_split("parquet_images", path=path, split_column="part")
    decoded = []
    real = parquet_module._image_array

    def counting(col, *args, **kwargs):
        decoded.append(len(col))
        return real(col, *args, **kwargs)

    # Decoding happens once per take over the rows asked for, so a block of 32 decodes <= 32 rows even
    # though a row group holds 100.
    monkeypatch.setattr(parquet_module, "_image_array", counting)
    parts = list(source.blocks(torch.arange(500), 32))
    assert [len(p) for p in parts] == [32] * 15 + [20] and max(decoded) == 32 and source.rows_read == 500
    whole = load_dataset("parquet_images", path=path, split_column="part")
    assert torch.equal(torch.cat([p.x for p in parts]), whole.x)
    pickled = pickle.dumps(source)  # what a process keeps between calls: no image bytes
    assert not any(blob in pickled for blob in blobs[::50])


def test_parquet_reads_only_the_row_groups_holding_the_rows(big_parquet):
    path, _ = big_parquet
    source = open_split("parquet_images", path=path, split_column="part")
    seen = []
    source.index.fragments = [SpyFragment(f, seen) for f in source.index.fragments]
    source.take(np.array([250, 210, 299]))
    assert seen == [2]
    source.take(np.array([499, 5]))
    assert seen == [2, 0, 4]


def test_sample_is_seeded_sorted_and_whole_when_large(parquet_paths):
    options = {"path": parquet_paths["dir"], "split_column": "part"}
    full = load_dataset("parquet_images", **options)
    source = open_split("parquet_images", **options)
    assert_same_split(source.sample(len(full), seed=0), full)
    assert_same_split(source.sample(10 ** 6, seed=5), full)
    got = source.sample(12, seed=7)
    positions = torch.randperm(len(full), generator=torch.Generator().manual_seed(7))[:12].sort().values
    assert_same_split(got, full.subset(positions))
    assert_same_split(open_split("parquet_images", **options).sample(12, seed=7), got)


def test_opener_signatures_match_the_loaders():
    for opener, loader in [(parquet_module.open_parquet_images, parquet_module.load_parquet_images),
                           (image_folder_module.open_image_folder, image_folder_module.load_image_folder)]:
        assert inspect.signature(opener).parameters == inspect.signature(loader).parameters


# image_folder ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = tmp_path_factory.mktemp("celeba")
    (root / "img_align_celeba").mkdir()
    names = ["Smiling", "Eyeglasses", "Young"]
    rows = []
    for i, im in enumerate(_images(24, h=12, w=10, seed=2)):
        fname = f"{i + 1:06d}.jpg" if i % 2 else f"{i + 1:06d}.png"
        Image.fromarray(im).save(root / "img_align_celeba" / fname, quality=95)
        vals = [1 if i % 2 else -1, 1 if i % 4 < 2 else -1, 1 if i % 3 == 0 else -1]
        rows.append(fname + " " + " ".join(str(v) for v in vals))
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{' '.join(names)}\n" + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{r.split()[0]} {i % 3}\n" for i, r in enumerate(rows)))
    return str(root)


FOLDER_OPTIONS = [
    {"label_attribute": "Smiling"},
    {"label_attribute": "Young", "partition_file": "list_eval_partition.txt", "test_partitions": [2]},
    {"label_attribute": "Smiling", "size": [6, 5], "center_crop": 8, "attributes": ["Young"], "limit": 7},
    {"label_attribute": "Eyeglasses", "channels": 1, "seed": 4, "attributes": []},
    {"label_attribute": "Smiling", "channels": None},
]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("options", FOLDER_OPTIONS, ids=lambda o: "-".join(o))
def test_image_folder_take_equals_load_subset(celeba, split, options):
    full = load_dataset("image_folder", split, path=celeba, **options)
    source = open_split("image_folder", split, path=celeba, **options)
    assert source.streaming and len(source) == len(full) and torch.equal(source.labels, full.y)
    assert source.info.input_shape == full.input_shape
    index = shuffled_index(len(full), seed=3)
    assert_same_split(source.take(index), full.subset(torch.as_tensor(index)))
    assert source.rows_read == len(np.unique(index))
    assert_same_split(source.sample(3, seed=1), full.subset(
        torch.randperm(len(full), generator=torch.Generator().manual_seed(1))[:3].sort().values))


def test_image_folder_missing_image_named_at_take(celeba, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(celeba, root)
    source = open_split("image_folder", path=str(root), label_attribute="Smiling")
    gone = source.info.meta["files"][-1]
    (root / "img_align_celeba" / gone).unlink()
    source.take([0, 1])
    with pytest.raises(FileNotFoundError, match=gone):
        source.take([len(source) - 1])


# in-memory datasets and errors ------------------------------------------------------------------------------

SHAPES = {"size": 32, "n_train": 200, "n_test": 50}  # 32: the smallest size shapes draws


@pytest.mark.parametrize("split", ["train", "test"])
def test_in_memory_source_for_builtin(split):
    full = load_dataset("shapes", split, **SHAPES)
    source = open_split("shapes", split, **SHAPES)
    assert isinstance(source, InMemorySource) and isinstance(source, SplitSource) and not source.streaming
    assert source.name == "shapes" and source.split == split and len(source) == len(full)
    assert torch.equal(source.labels, full.y) and source.rows_read == len(full)
    assert source.info.input_shape == full.input_shape and source.info.attributes.shape == (0, 6)
    index = shuffled_index(len(full))
    assert_same_split(source.take(index), full.subset(torch.as_tensor(index)))
    assert_same_split(source.sample(20, seed=2), full.subset(
        torch.randperm(len(full), generator=torch.Generator().manual_seed(2))[:20].sort().values))
    blocks = list(source.blocks(np.arange(len(full)), 64))
    assert [len(b) for b in blocks] == [64] * (len(full) // 64) + ([len(full) % 64] if len(full) % 64 else [])
    assert_same_split(source.blocks(index, 1000).__next__(), full.subset(torch.as_tensor(index)))


def test_runtime_registered_dataset_is_in_memory(monkeypatch):
    monkeypatch.setattr(registry, "_LOADERS", dict(registry._LOADERS))
    register_dataset("tiny", lambda split, *, n=4: load_dataset("shapes", split, size=32, n_train=n, n_test=n))
    source = open_split("tiny", "test", n=6)
    assert isinstance(source, InMemorySource) and len(source) == 6 and source.name == "tiny"
    assert source.info.meta["dataset"] == "shapes" and source.info.meta["split"] == "test"
    assert_same_split(source.take([5, 0]), load_dataset("tiny", "test", n=6).subset(torch.tensor([5, 0])))


def _message(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    return str(err.value)


@pytest.mark.parametrize("name, split, options", [
    ("parquet_images", "train", {"path": "x.parquet", "colour": 1}),
    ("parquet_images", "valid", {"path": "x.parquet"}),
    ("parquet_images", "train", {}),
    ("image_folder", "train", {"path": "x"}),
    ("shapes", "train", {"bogus": 1}),
    ("no_such_dataset", "train", {}),
])
def test_option_errors_match_load_dataset(name, split, options):
    assert _message(lambda: open_split(name, split, **options)) == \
        _message(lambda: load_dataset(name, split, **options))


def test_missing_paths_and_bad_arguments(parquet_paths, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.parquet"):
        open_split("parquet_images", path=str(tmp_path / "nothing.parquet"))
    with pytest.raises(FileNotFoundError, match=r"absent.*option 'path'"):
        open_split("image_folder", path=str(tmp_path / "absent"), label_attribute="Young")
    source = open_split("parquet_images", path=parquet_paths["file"])
    with pytest.raises(IndexError, match="out of range"):
        source.take([len(source)])
    with pytest.raises(ValueError, match="1-D array of integer"):
        source.take(np.array([[0, 1]]))
    with pytest.raises(ValueError, match="'rows' must be a positive integer"):
        list(source.blocks([0, 1], 0))
    with pytest.raises(ValueError, match="'count' must be a non-negative integer"):
        source.sample(-1, seed=0)
