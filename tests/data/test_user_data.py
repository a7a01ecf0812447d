"""Users' data loaders: parquet_images, image_folder, tabular, round-tripped through files in tmp_path."""
from __future__ import annotations

import io

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from engine.data import load_dataset
from tests.fixtures.images import png_bytes, random_images


_png = png_bytes


def _images(n: int, h: int = 6, w: int = 5, c: int = 3, seed: int = 0) -> np.ndarray:
    return random_images(n, h, w, c, seed)


# parquet_images -------------------------------------------------------------------------------------------

@pytest.fixture
def png_parquet(tmp_path):
    images = _images(10)
    table = pa.table({
        "image": [_png(im) for im in images],
        "label": [i % 3 for i in range(10)],
        "smiling": [1 if i % 2 else -1 for i in range(10)],
        "glasses": [bool(i % 3 == 0) for i in range(10)],
        "part": ["train"] * 7 + ["test"] * 3,
    })
    path = tmp_path / "faces.parquet"
    pq.write_table(table, path)
    return path, images


def test_parquet_png_round_trip(png_parquet):
    path, images = png_parquet
    ds = load_dataset("parquet_images", path=str(path), split_column="part",
                      attribute_columns=["smiling", "glasses"], class_names=["a", "b", "c"])
    assert ds.kind == "image" and ds.x.dtype == torch.float32 and ds.x.shape == (7, 3, 6, 5)
    expected = torch.from_numpy(images[:7]).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(ds.x, expected)
    assert ds.y.tolist() == [i % 3 for i in range(7)] and ds.class_names == ["a", "b", "c"]
    assert ds.attribute_names == ["smiling", "glasses"]
    assert ds.attributes[:, 0].tolist() == [float(i % 2) for i in range(7)]
    assert ds.attributes[:, 1].tolist() == [float(i % 3 == 0) for i in range(7)]
    test = load_dataset("parquet_images", path=str(path), split="test", split_column="part")
    assert len(test) == 3 and test.class_names == ["0", "1", "2"] and test.attributes is None
    assert torch.allclose(test.x, torch.from_numpy(images[7:]).permute(0, 3, 1, 2).float() / 255)


def test_parquet_resize_and_random_split(png_parquet):
    path, _ = png_parquet
    train = load_dataset("parquet_images", path=str(path), size=[8, 4], channels=1)
    test = load_dataset("parquet_images", path=str(path), split="test", size=[8, 4], channels=1)
    assert train.x.shape[1:] == (1, 8, 4) and len(train) + len(test) == 10 and len(test) >= 2
    assert 0 <= train.x.min() and train.x.max() <= 1


def test_parquet_float_tensors_and_string_labels(tmp_path):
    rng = np.random.default_rng(1)
    hwc = rng.random((6, 4, 4, 3), dtype=np.float32)
    labels = ["dog", "cat", "dog", "bird", "cat", "dog"]
    pq.write_table(pa.table({"pixels": hwc.tolist(), "kind": labels, "s": [0, 0, 0, 0, 2, 2]}), tmp_path / "t.parquet")
    ds = load_dataset("parquet_images", path=str(tmp_path / "t.parquet"), image_column="pixels",
                      label_column="kind", split_column="s")
    assert ds.x.shape == (4, 3, 4, 4) and torch.allclose(ds.x, torch.from_numpy(hwc[:4]).permute(0, 3, 1, 2))
    assert ds.class_names == ["bird", "cat", "dog"] and ds.y.tolist() == [2, 1, 2, 0]

    tensors = pa.FixedShapeTensorArray.from_numpy_ndarray(rng.random((5, 1, 3, 3), dtype=np.float32))
    pq.write_table(pa.table({"image": tensors, "label": [0, 1, 0, 1, 1]}), tmp_path / "fixed.parquet")
    fixed = load_dataset("parquet_images", path=str(tmp_path / "fixed.parquet"), test_fraction=0.4)
    assert fixed.x.shape[1:] == (1, 3, 3) and fixed.x.dtype == torch.float32


def test_parquet_errors(png_parquet, tmp_path):
    path, _ = png_parquet
    with pytest.raises(ValueError, match=r"faces\.parquet.*column 'img' \(option 'image_column'\) not found.*"
                                         r"available columns: \['image', 'label', 'smiling', 'glasses', 'part'\]"):
        load_dataset("parquet_images", path=str(path), image_column="img")
    with pytest.raises(ValueError, match=r"column 'hat' \(option 'attribute_columns'\) not found"):
        load_dataset("parquet_images", path=str(path), attribute_columns=["hat"])
    with pytest.raises(ValueError, match=r"column 'label'.*must be in \[0, 2\)"):
        load_dataset("parquet_images", path=str(path), class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"column 'label'.*expected 0/1 or -1/\+1 values, found \[2\]"):
        load_dataset("parquet_images", path=str(path), attribute_columns=["label"])
    with pytest.raises(FileNotFoundError, match=r"nothing\.parquet"):
        load_dataset("parquet_images", path=str(tmp_path / "nothing.parquet"))
    pq.write_table(pa.table({"image": [[[0.0, 2.0]]], "label": [0]}), tmp_path / "range.parquet")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_dataset("parquet_images", path=str(tmp_path / "range.parquet"))


# image_folder ---------------------------------------------------------------------------------------------

@pytest.fixture
def celeba(tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    names = ["Smiling", "Eyeglasses", "Young"]
    images = _images(8, h=12, w=10, seed=2)
    rows = []
    for i, im in enumerate(images):
        fname = f"{i + 1:06d}.jpg" if i % 2 else f"{i + 1:06d}.png"
        Image.fromarray(im).save(root / "img_align_celeba" / fname, quality=100, subsampling=0)
        vals = [1 if i % 2 else -1, 1 if i < 4 else -1, 1 if i % 3 == 0 else -1]
        rows.append(fname + "  " + " ".join(f"{v:2d}" for v in vals))
    (root / "list_attr_celeba.txt").write_text(f"{len(rows)}\n{' '.join(names)}\n" + "\n".join(rows) + "\n")
    parts = [0, 0, 0, 0, 0, 1, 2, 2]
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{r.split()[0]} {p}\n" for r, p in zip(rows, parts)))
    return root, images


def test_image_folder_round_trip(celeba):
    root, images = celeba
    ds = load_dataset("image_folder", path=str(root), label_attribute="Smiling",
                      partition_file="list_eval_partition.txt")
    assert ds.x.shape == (5, 3, 12, 10) and ds.x.dtype == torch.float32
    assert ds.class_names == ["not_Smiling", "Smiling"] and ds.y.tolist() == [0, 1, 0, 1, 0]
    assert ds.attribute_names == ["Eyeglasses", "Young"]
    assert ds.attributes.tolist() == [[1, 1], [1, 0], [1, 0], [1, 1], [0, 0]]
    png = torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255
    assert torch.allclose(ds.x[0], png)  # PNG is lossless
    assert (ds.x[1] - torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255).abs().mean() < 0.05  # JPEG
    test = load_dataset("image_folder", path=str(root), label_attribute="Smiling",
                        partition_file="list_eval_partition.txt", split="test")
    assert len(test) == 3  # validation (1) and test (2) codes by default
    only = load_dataset("image_folder", path=str(root), label_attribute="Smiling",
                        partition_file="list_eval_partition.txt", split="test", test_partitions=[2])
    assert len(only) == 2


def test_image_folder_resize_subset_and_random_split(celeba):
    root, _ = celeba
    ds = load_dataset("image_folder", path=str(root), label_attribute="Young", attributes=["Smiling"],
                      size=8, center_crop=10, test_fraction=0.25)
    assert ds.x.shape[1:] == (3, 8, 8) and ds.attribute_names == ["Smiling"] and len(ds) == 6
    assert 0 <= ds.x.min() and ds.x.max() <= 1


def test_image_folder_errors(celeba, tmp_path):
    root, _ = celeba
    with pytest.raises(ValueError, match=r"'label_attribute' 'Bald'.*list_attr_celeba\.txt.*"
                                         r"\['Smiling', 'Eyeglasses', 'Young'\]"):
        load_dataset("image_folder", path=str(root), label_attribute="Bald")
    with pytest.raises(ValueError, match=r"'attributes' names \['Bald'\]"):
        load_dataset("image_folder", path=str(root), label_attribute="Young", attributes=["Bald"])
    (root / "img_align_celeba" / "000003.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image '000003\.png' listed in .*list_attr_celeba\.txt not found"):
        load_dataset("image_folder", path=str(root), label_attribute="Young",
                     partition_file="list_eval_partition.txt")
    with pytest.raises(FileNotFoundError, match=r"partition file .*nope\.txt does not exist"):
        load_dataset("image_folder", path=str(root), label_attribute="Young", partition_file="nope.txt")
    with pytest.raises(FileNotFoundError, match=rf"directory {tmp_path / 'absent'}"):
        load_dataset("image_folder", path=str(tmp_path / "absent"), label_attribute="Young")
    (root / "list_attr_celeba.txt").write_text("2\nA B\nx.png 1 -1\ny.png 1\n")
    with pytest.raises(ValueError, match=r"list_attr_celeba\.txt line 4 has 1 values, expected 2"):
        load_dataset("image_folder", path=str(root), label_attribute="A")


# tabular --------------------------------------------------------------------------------------------------

@pytest.fixture
def table():
    rng = np.random.default_rng(3)
    n = 50
    return pl.DataFrame({
        "age": rng.integers(18, 90, n), "income": rng.normal(50_000, 10_000, n), "flag": rng.random(n) < 0.5,
        "city": rng.choice(["a", "b"], n), "outcome": rng.choice(["yes", "no", "maybe"], n),
    })


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_tabular_round_trip(tmp_path, table, ext):
    path = tmp_path / f"t.{ext}"
    table.write_csv(path) if ext == "csv" else table.write_parquet(path)
    train = load_dataset("tabular", path=str(path), label_column="outcome")
    test = load_dataset("tabular", path=str(path), label_column="outcome", split="test")
    assert train.kind == "tabular" and train.feature_names == ["age", "income", "flag"]  # numeric + bool only
    assert train.x.dtype == torch.float32 and train.x.shape == (len(train), 3) and len(train) + len(test) == 50
    assert train.class_names == ["maybe", "no", "yes"]
    assert torch.allclose(train.x.min(0).values, torch.zeros(3))
    assert torch.allclose(train.x.max(0).values, torch.ones(3))
    assert test.x.min() >= 0 and test.x.max() <= 1
    outcome = table["outcome"].to_list()
    codes = {"maybe": 0, "no": 1, "yes": 2}
    assert sorted(train.y.tolist() + test.y.tolist()) == sorted(codes[o] for o in outcome)
    age = np.array(table["age"].to_list(), dtype=float)
    lo, hi = train.meta["feature_min"][0], train.meta["feature_min"][0] + train.meta["feature_scale"][0]
    assert age.min() <= lo and hi <= age.max()


def test_tabular_split_column_and_feature_selection(tmp_path, table):
    path = tmp_path / "t.csv"
    table.with_columns(pl.Series("split", ["train"] * 40 + ["test"] * 10)).write_csv(path)
    ds = load_dataset("tabular", path=str(path), label_column="city", feature_columns=["income"],
                      split_column="split", split="test")
    assert len(ds) == 10 and ds.feature_names == ["income"] and ds.class_names == ["a", "b"]


def test_tabular_errors(tmp_path, table):
    path = tmp_path / "t.csv"
    table.write_csv(path)
    with pytest.raises(ValueError, match=r"t\.csv.*column 'target' \(option 'label_column'\) not found; "
                                         r"available columns: \['age', 'income', 'flag', 'city', 'outcome'\]"):
        load_dataset("tabular", path=str(path), label_column="target")
    with pytest.raises(ValueError, match=r"column 'weight' \(option 'feature_columns'\) not found"):
        load_dataset("tabular", path=str(path), label_column="outcome", feature_columns=["age", "weight"])
    with pytest.raises(ValueError, match=r"feature column 'city' must be numeric"):
        load_dataset("tabular", path=str(path), label_column="outcome", feature_columns=["city"])
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        load_dataset("tabular", path=str(tmp_path / "missing.csv"), label_column="outcome")
    with pytest.raises(ValueError, match=r"must end in one of"):
        load_dataset("tabular", path=str(tmp_path / "t.xlsx"), label_column="outcome")


def test_fsspec_memory_uris(table):
    import fsspec

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [_png(im) for im in _images(6, c=1)], "label": [0, 1] * 3}), buf)
    fs.pipe("/cfaudit-test/part-0.parquet", buf.getvalue())
    fs.pipe("/cfaudit-test/part-1.parquet", buf.getvalue())
    ds = load_dataset("parquet_images", path="memory://cfaudit-test")
    assert ds.x.shape == (10, 1, 6, 5)  # a directory of two files: 12 rows, 1 per class in test
    csv = io.BytesIO()
    table.write_csv(csv)
    fs.pipe("/cfaudit-test/t.csv", csv.getvalue())
    assert load_dataset("tabular", path="memory://cfaudit-test/t.csv", label_column="city").x.shape[1] == 3
    fs.rm("/cfaudit-test", recursive=True)
