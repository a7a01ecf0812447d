"""Built-in datasets: registry, digits, Fashion-MNIST/MNIST (IDX), shapes, breast_cancer."""
from __future__ import annotations

import gzip
import os
import struct
import time

import numpy as np
import pytest
import torch
from torch import nn

from engine.data import ArrayDataset, dataset_fingerprint, dataset_names, dataset_options, load_dataset
from engine.data.idx import FASHION_MNIST_CLASSES, read_idx
from engine.data.shapes import ATTRIBUTES

FASHION_DIR = os.environ.get("CFAUDIT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


def _check_image_ds(ds: ArrayDataset, shape: tuple, num_classes: int) -> None:
    assert ds.kind == "image"
    assert tuple(ds.x.shape[1:]) == shape
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert 0.0 <= ds.x.min().item() and ds.x.max().item() <= 1.0
    assert ds.y.min().item() >= 0 and ds.y.max().item() < num_classes == ds.num_classes


# registry -------------------------------------------------------------------------------------------------

def test_names_and_options():
    assert {"digits", "mnist", "fashion_mnist", "shapes", "breast_cancer",
            "parquet_images", "image_folder", "tabular"} <= set(dataset_names())
    assert dataset_options("shapes")["bias"] == 0.0


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'.*digits"):
        load_dataset("nope")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\].*valid options.*size"):
        load_dataset("digits", colour=1)


def test_bad_split_and_missing_required_option():
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match=r"missing required option\(s\) \['path'\]"):
        load_dataset("tabular", label_column="y")


def test_register_dataset_and_meta():
    from engine.data import register_dataset
    from engine.data.registry import _LOADERS

    def load_tiny(split, *, n=3):
        return ArrayDataset(name="tiny", x=torch.zeros(n, 2), y=torch.zeros(n, dtype=torch.int64),
                            class_names=["a"], kind="tabular")

    register_dataset("tiny_test", load_tiny)
    try:
        ds = load_dataset("tiny_test", split="test", n=4)
        assert len(ds) == 4 and ds.meta == {"dataset": "tiny_test", "split": "test", "options": {"n": 4}}
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("tiny_test", load_tiny)
    finally:
        _LOADERS.pop("tiny_test")


def test_fingerprint_is_stable_and_sensitive():
    a, b = load_dataset("digits"), load_dataset("digits")
    fa = dataset_fingerprint(a)
    assert len(fa) == 64 and fa == dataset_fingerprint(b)
    b.x[0, 0, 0, 0] += 0.5
    assert dataset_fingerprint(b) != fa
    c = load_dataset("digits")
    c.class_names = list(reversed(c.class_names))
    assert dataset_fingerprint(c) != fa
    assert dataset_fingerprint(load_dataset("digits", split="test")) != fa


# digits ---------------------------------------------------------------------------------------------------

def test_digits_split_and_ranges():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    _check_image_ds(train, (1, 8, 8), 10)
    _check_image_ds(test, (1, 8, 8), 10)
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    assert train.class_names == [str(i) for i in range(10)]
    assert train.x.max().item() == 1.0
    # stratified: every class keeps ~20% in test
    frac = test.y.bincount(minlength=10).float() / (train.y.bincount(minlength=10) + test.y.bincount(minlength=10))
    assert ((frac - 0.2).abs() < 0.02).all()
    # deterministic, and the two splits are disjoint (no test image appears in train)
    assert torch.equal(load_dataset("digits").x, train.x)
    flat_train = {tuple(r) for r in train.x.flatten(1).tolist()}
    dup = sum(tuple(r) in flat_train for r in test.x.flatten(1).tolist())
    assert dup < 5  # sklearn's digits holds a few exact duplicate images


@pytest.mark.parametrize("size", [16, 28])
def test_digits_resize(size):
    small, big = load_dataset("digits"), load_dataset("digits", size=size)
    _check_image_ds(big, (1, size, size), 10)
    assert torch.equal(small.y, big.y)
    back = nn.functional.interpolate(big.x, size=(8, 8), mode="area")
    assert (back - small.x).abs().mean() < 0.1


def test_digits_bad_size():
    with pytest.raises(ValueError, match=r"'size' must be one of \[8, 16, 28\], got 12"):
        load_dataset("digits", size=12)


# IDX / Fashion-MNIST / MNIST ------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
                    reason=f"Fashion-MNIST IDX files absent from {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_full():
    train, test = load_dataset("fashion_mnist"), load_dataset("fashion_mnist", split="test")
    assert len(train) == 60_000 and len(test) == 10_000
    for ds in (train, test):
        _check_image_ds(ds, (1, 28, 28), 10)
        assert ds.x.max().item() == 1.0
        assert ds.y.bincount(minlength=10).tolist() == [len(ds) // 10] * 10
    assert train.class_names == FASHION_MNIST_CLASSES
    few = load_dataset("fashion_mnist", limit=100, root=FASHION_DIR)
    assert torch.equal(few.x, train.x[:100]) and torch.equal(few.y, train.y[:100])


def _write_idx(path, array: np.ndarray, magic: bytes = None, compress: bool = True) -> None:
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    payload = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(">u1").tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def _fake_mnist(root, n=12, train_n=None):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train_n or n), ("t10k", n)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count, dtype=np.uint8) % 10)


def test_mnist_reads_idx_files_from_root_and_env(tmp_path, monkeypatch):
    _fake_mnist(tmp_path)
    ds = load_dataset("mnist", split="test", root=str(tmp_path))
    _check_image_ds(ds, (1, 28, 28), 10)
    assert len(ds) == 12 and ds.y.tolist() == [i % 10 for i in range(12)]
    raw = read_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"))
    assert torch.allclose(ds.x[:, 0], torch.from_numpy(raw).float() / 255)
    monkeypatch.setenv("CFAUDIT_MNIST_DIR", str(tmp_path))
    assert len(load_dataset("mnist", limit=5)) == 5


def test_idx_bad_magic_is_a_clear_error(tmp_path):
    _fake_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(bad, np.zeros((3, 28, 28), np.uint8), magic=bytes([0x08, 0x03, 0, 0]))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: bad IDX magic number '08030000'"):
        load_dataset("mnist", root=str(tmp_path))


def test_idx_truncated_and_mismatched(tmp_path):
    path = tmp_path / "x.idx"
    payload = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 5, 28, 28) + bytes(28 * 28 * 4)
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(path))
    _fake_mnist(tmp_path, n=12, train_n=12)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(ValueError, match="12 images but .* 11 labels"):
        load_dataset("mnist", root=str(tmp_path))


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=str(missing))
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*CFAUDIT_MNIST_DIR"):
        load_dataset("mnist", root=str(missing))


# shapes ---------------------------------------------------------------------------------------------------

def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


def test_shapes_layout():
    ds = load_dataset("shapes", n_train=500)
    _check_image_ds(ds, (3, 32, 32), 2)
    assert len(ds) == 500 and ds.class_names == ["circle", "square"]
    assert ds.attribute_names == list(ATTRIBUTES) and len(ATTRIBUTES) >= 6
    assert ds.attributes.dtype == torch.float32 and ds.attributes.shape == (500, len(ATTRIBUTES))
    assert set(ds.attributes.unique().tolist()) == {0.0, 1.0}
    assert ds.meta["seed"] == 0 and ds.meta["bias"] == 0.0 and ds.meta["confounder"] == "marker"
    assert len(load_dataset("shapes", split="test")) == 1000
    big = load_dataset("shapes", n_train=20, size=48, classes=["circle", "square", "triangle", "cross"])
    _check_image_ds(big, (3, 48, 48), 4)


def test_shapes_attributes_are_visible():
    ds = load_dataset("shapes", n_train=400)
    a = dict(zip(ds.attribute_names, ds.attributes.T.bool()))
    corner = ds.x[:, 2, 1:4, 1:4].mean(dim=(1, 2))  # the marker is yellow: low blue channel
    assert (corner[a["marker"]] < 0.35).all()
    bg = ds.x[:, :, -1, -1].mean(1)  # bottom-right corner is background
    assert (bg[a["dark_background"]] < 0.3).all() and (bg[~a["dark_background"]] > 0.6).all()
    left_mass = (ds.x[:, :, :, :16] - ds.x[:, :, :, -1:]).abs().sum(dim=(1, 2, 3))
    right_mass = (ds.x[:, :, :, 16:] - ds.x[:, :, :, -1:]).abs().sum(dim=(1, 2, 3))
    assert ((left_mass > right_mass) == a["left"]).float().mean() > 0.9


def test_shapes_bias_one_is_perfect_confounding():
    ds = load_dataset("shapes", n_train=4000, bias=1.0)
    marker = ds.attributes[:, ds.attribute_names.index("marker")]
    assert _corr(marker, ds.y) == pytest.approx(1.0)
    assert torch.equal(marker.long(), ds.y % 2)
    other = ds.attributes[:, ds.attribute_names.index("red")]
    assert abs(_corr(other, ds.y)) < 0.1
    test = load_dataset("shapes", split="test", bias=1.0)  # test is unbiased unless test_bias is given
    assert abs(_corr(test.attributes[:, ds.attribute_names.index("marker")], test.y)) < 0.15
    assert test.meta["bias"] == 0.0
    anti = load_dataset("shapes", split="test", bias=1.0, test_bias=1.0, confounder="red")
    assert _corr(anti.attributes[:, ds.attribute_names.index("red")], anti.y) == pytest.approx(1.0)


def test_shapes_bias_zero_is_uncorrelated():
    ds = load_dataset("shapes", n_train=4000, bias=0.0)
    for j in range(len(ds.attribute_names)):
        assert abs(_corr(ds.attributes[:, j], ds.y)) < 0.1
    mid = load_dataset("shapes", n_train=4000, bias=0.5)
    assert 0.35 < _corr(mid.attributes[:, ds.attribute_names.index("marker")], mid.y) < 0.65


def _shows_square(x: torch.Tensor) -> torch.Tensor:
    """[N] bool: the object fills its bounding box (square) rather than ~pi/4 of it (circle); noiseless images."""
    obj = (x - x[:, :, -1:, -1:]).abs().amax(1) > 0.1  # the bottom-right pixel is always background
    obj[:, :5, :5] = False  # the marker's corner
    rows, cols = obj.any(2), obj.any(1)
    area = rows.sum(1) * cols.sum(1)
    return obj.sum((1, 2)) / area.clamp(min=1) > 0.9


def test_shapes_label_noise_shows_the_other_shape():
    clean = load_dataset("shapes", n_train=2000, noise=0.0, bias=1.0)
    assert (_shows_square(clean.x) == clean.y.bool()).float().mean() > 0.99
    noisy = load_dataset("shapes", n_train=2000, noise=0.0, bias=1.0, label_noise=0.1)
    assert torch.equal(noisy.y, clean.y) and torch.equal(noisy.attributes, clean.attributes)
    mismatch = (_shows_square(noisy.x) != noisy.y.bool()).float().mean().item()
    assert 0.08 < mismatch < 0.12, mismatch  # the label's visual cue is wrong on ~10% of images
    marker = noisy.attributes[:, noisy.attribute_names.index("marker")]
    assert torch.equal(marker.long(), noisy.y % 2)  # the planted confounder follows the label, not the image
    assert noisy.meta["label_noise"] == 0.1
    test = load_dataset("shapes", split="test", n_test=500, noise=0.0, label_noise=0.1)  # train split only
    assert (_shows_square(test.x) == test.y.bool()).float().mean() > 0.99 and test.meta["label_noise"] == 0.0
    assert torch.equal(load_dataset("shapes", n_train=50, label_noise=0.0).x, load_dataset("shapes", n_train=50).x)


def test_shapes_seeds():
    a, b = load_dataset("shapes", n_train=300, seed=3), load_dataset("shapes", n_train=300, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.attributes, b.attributes)
    c = load_dataset("shapes", n_train=300, seed=4)
    assert not torch.equal(a.x, c.x) and not torch.equal(a.attributes, c.attributes)
    t = load_dataset("shapes", split="test", n_test=300, seed=3)
    assert not torch.equal(a.x, t.x)


def test_shapes_speed():
    start = time.perf_counter()
    ds = load_dataset("shapes", n_train=10_000)
    assert len(ds) == 10_000 and time.perf_counter() - start < 5.0


@pytest.mark.parametrize("options, match", [
    ({"bias": 1.5}, r"'bias' must be in \[0, 1\], got 1.5"),
    ({"test_bias": -0.1}, r"'test_bias' must be in \[0, 1\]"),
    ({"confounder": "hat"}, r"'confounder' must be one of .*marker.*got 'hat'"),
    ({"classes": ["circle", "star"]}, r"'classes' .*unknown: \['star'\]"),
    ({"classes": ["square", "circle"]}, r"'classes' must keep the order"),
    ({"size": 16}, r"'size' must be >= 32, got 16"),
    ({"n_train": 0}, r"'n_train' must be >= 1"),
    ({"label_noise": 0.5}, r"'label_noise' must be below 0.5"),
    ({"label_noise": -0.1}, r"'label_noise' must be in \[0, 1\]"),
])
def test_shapes_validation(options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("shapes", **options)


def test_small_cnn_learns_shapes():
    """Shapes are distinguishable at 32x32: two conv layers reach > 90% on unbiased data in two epochs."""
    torch.manual_seed(0)
    train = load_dataset("shapes", n_train=2000, seed=1)
    test = load_dataset("shapes", split="test", n_test=1000, seed=1)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 2))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is faster than two fighting other processes for 2 cores
    try:
        start = time.perf_counter()
        for _ in range(2):
            for idx in torch.randperm(len(train)).split(32):
                loss = nn.functional.cross_entropy(net(train.x[idx]), train.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(test.x).argmax(1) == test.y).float().mean().item()
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    assert acc > 0.9, f"test accuracy {acc:.3f}"
    assert elapsed < 20, f"training took {elapsed:.1f} s"


# breast_cancer --------------------------------------------------------------------------------------------

def test_breast_cancer():
    train, test = load_dataset("breast_cancer"), load_dataset("breast_cancer", split="test")
    assert train.kind == test.kind == "tabular"
    assert train.x.shape[1] == test.x.shape[1] == 30 and len(train) + len(test) == 569
    assert len(train.feature_names) == 30 and train.feature_names[0] == "mean radius"
    assert train.class_names == ["malignant", "benign"]
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert torch.allclose(train.x.min(0).values, torch.zeros(30))
    assert torch.allclose(train.x.max(0).values, torch.ones(30))
    assert test.x.min() >= 0 and test.x.max() <= 1
    assert abs(test.y.float().mean() - train.y.float().mean()) < 0.02  # stratified
