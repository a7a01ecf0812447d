"""Helpers shared by the loaders: splits, scaling, label/attribute encoding, paths, images."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "test")


def check_split(dataset: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{dataset}: split must be one of {list(SPLITS)}, got {split!r}")


def check_int(dataset: str, option: str, value, minimum: Optional[int] = None) -> int:
    """`value` as an int (bools rejected), at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{dataset}: option {option!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{dataset}: option {option!r} must be >= {minimum}, got {value}")
    return int(value)


def check_fraction(dataset: str, option: str, value, open_ends: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{dataset}: option {option!r} must be a number in [0, 1], got {value!r}")
    value = float(value)
    lo_ok = value > 0 if open_ends else value >= 0
    hi_ok = value < 1 if open_ends else value <= 1
    if not (lo_ok and hi_ok):
        interval = "(0, 1)" if open_ends else "[0, 1]"
        raise ValueError(f"{dataset}: option {option!r} must be in {interval}, got {value}")
    return value


def check_size(dataset: str, value, option: str = "size") -> Optional[tuple[int, int]]:
    """None, an int or an (h, w) pair -> None or (h, w)."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    if (not isinstance(pair, (list, tuple)) or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in pair)):
        raise ValueError(f"{dataset}: option {option!r} must be a positive int or [height, width], got {value!r}")
    return int(pair[0]), int(pair[1])


def split_indices(y: np.ndarray, split: str, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Deterministic stratified split: sorted row indices of `split`; each class gives round(frac * n_c) to test."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        test.append(idx[rng.permutation(len(idx))[: int(round(test_fraction * len(idx)))]])
    is_test = np.zeros(len(y), dtype=bool)
    if test:
        is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def minmax_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column (min, scale) of x [N, D]; constant columns get scale 1."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    scale = np.where(hi > lo, hi - lo, 1.0)
    return lo, scale


def minmax_apply(x: np.ndarray, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip((x - lo) / scale, 0.0, 1.0).astype(np.float32)


def encode_labels(values: np.ndarray, class_names: Optional[Sequence[str]], where: str,
                  dense_ints: bool) -> tuple[np.ndarray, list[str]]:
    """Label values [N] -> (y [N] int64, class names).

    Given class_names: integer values index them, other values are looked up by name.
    Without: integers >= 0 become classes "0".."max" when `dense_ints`; otherwise sorted unique values.
    """
    values = np.asarray(values)
    is_int = values.dtype.kind in "iu" or (values.dtype.kind == "b")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(set(class_names)) != len(class_names) or not class_names:
            raise ValueError(f"{where}: option 'class_names' must be distinct non-empty names, got {class_names}")
        if is_int:
            bad = np.unique(values[(values < 0) | (values >= len(class_names))])
            if bad.size:
                raise ValueError(f"{where}: integer labels must be in [0, {len(class_names)}) to index "
                                 f"class_names {class_names}; found {bad[:10].tolist()}")
            return values.astype(np.int64), class_names
        lookup = {name: i for i, name in enumerate(class_names)}
        strs = values.astype(str)
        unknown = sorted(set(np.unique(strs).tolist()) - set(lookup))
        if unknown:
            raise ValueError(f"{where}: label values {unknown[:10]} are not in class_names {class_names}")
        return np.array([lookup[s] for s in strs], dtype=np.int64), class_names
    if is_int and dense_ints and (values.size == 0 or values.min() >= 0):
        k = int(values.max()) + 1 if values.size else 0
        return values.astype(np.int64), [str(i) for i in range(k)]
    uniq, y = np.unique(values, return_inverse=True)
    return y.astype(np.int64).reshape(-1), [str(u) for u in uniq.tolist()]


def binary_attribute(values: np.ndarray, where: str) -> np.ndarray:
    """0/1, ±1 or bool values [N] -> float32 0/1; anything else is a ValueError."""
    values = np.asarray(values)
    if values.dtype.kind == "b":
        return values.astype(np.float32)
    if values.dtype.kind not in "iuf":
        raise ValueError(f"{where}: expected 0/1 or -1/+1 values, got dtype {values.dtype}")
    bad = np.unique(values[~np.isin(values, (-1, 0, 1))])
    if bad.size:
        raise ValueError(f"{where}: expected 0/1 or -1/+1 values, found {bad[:10].tolist()}")
    return (values > 0).astype(np.float32)


def missing_column(where: str, option: str, column: str, available: Sequence[str]) -> ValueError:
    return ValueError(f"{where}: column {column!r} (option {option!r}) not found; "
                      f"available columns: {list(available)}")


def url_to_fs(path: str):
    """An fsspec (filesystem, path) pair for a local path or URI."""
    import fsspec  # deferred: fsspec loads only when a path or URI is opened

    return fsspec.core.url_to_fs(str(path))


def row_partition(values: np.ndarray, split: str, test_partitions: Optional[Sequence], where: str) -> np.ndarray:
    """Row mask of `split` from a split column: strings match the split name; integers are 0 = train,
    and test = `test_partitions` (default: every non-zero code, i.e. validation + test)."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        if split == "train":
            return values == 0
        return values != 0 if test_partitions is None else np.isin(values, list(test_partitions))
    if values.dtype.kind in "OUS":
        return np.char.lower(values.astype(str)) == split
    raise ValueError(f"{where}: split values must be 'train'/'test' strings or integer codes "
                     f"(0 = train), got dtype {values.dtype}")


def decode_images(blobs: Sequence[bytes], where: str, channels: Optional[int] = None,
                  size: Optional[tuple[int, int]] = None, center_crop: Optional[int] = None,
                  names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Encoded images (PNG, JPEG, ...) -> float32 [N, C, H, W] in [0, 1].

    channels: 1 (grayscale) or 3 (RGB); None takes it from the first image. size: (h, w) resize (bilinear).
    """
    from PIL import Image  # deferred: Pillow loads only when encoded images are decoded

    if not len(blobs):
        raise ValueError(f"{where}: no images to decode")
    if channels is None:
        first = Image.open(io.BytesIO(blobs[0]))
        channels = 1 if len(first.getbands()) == 1 and first.mode != "P" else 3
    if channels not in (1, 3):
        raise ValueError(f"{where}: option 'channels' must be 1 or 3, got {channels!r}")
    mode = "L" if channels == 1 else "RGB"

    def one(i: int) -> np.ndarray:
        try:
            im = Image.open(io.BytesIO(blobs[i]))
            im = im.convert(mode)
        except Exception as err:  # PIL raises several types for bad data
            label = names[i] if names is not None else f"row {i}"
            raise ValueError(f"{where}: cannot decode image {label}: {err}") from err
        if center_crop is not None:
            w, h = im.size
            s = min(center_crop, w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)

    if len(blobs) > 256:
        with ThreadPoolExecutor(max_workers=4) as pool:  # PIL decoding releases the GIL
            arrays = list(pool.map(one, range(len(blobs))))
    else:
        arrays = [one(i) for i in range(len(blobs))]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{where}: images have different sizes {sorted(shapes)[:5]}; "
                         f"set option 'size' to resize them to one size")
    out = np.stack(arrays)
    out = out[:, None] if channels == 1 else out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=np.float32) / np.float32(255.0)
