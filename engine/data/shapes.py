"""`shapes`: generated RGB images of one object each, with binary attributes and a controllable confounder.

Label = the object's shape. Attributes (each 0/1):
  large            object half-size 0.30*S (else 0.20*S)
  red              object colour red (else blue)
  dark_background  background grey ~0.12 (else ~0.78)
  striped          diagonal stripes on the object
  marker           a small yellow square in the top-left corner
  left             object centre in the left half (else the right half)
In the train split, with probability `bias` the confounder attribute equals `label % 2`, otherwise it is a
fair coin; every other attribute is always a fair coin. With probability `label_noise` a train image shows a
shape of another class than its label (the label's visual cue is imperfect, as with annotation noise in real
data), so a planted confounder carries information of its own and a classifier's reliance on it grows with
`bias`; without it the shape is a perfect cue and a CNN ignores a marker planted below strength 1.
Generation is vectorised over images.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from engine.data._common import check_fraction, check_int, check_split
from engine.data.base import ArrayDataset

SHAPES = ("circle", "square", "triangle", "cross")
ATTRIBUTES = ("large", "red", "dark_background", "striped", "marker", "left")
_SPLIT_CODE = {"train": 0, "test": 1}  # the test split draws from a different derived seed


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of `shape` at coordinates u, v [n, S, S] in units of the half-size (v grows downwards)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(au, av) <= 0.85
    if shape == "triangle":  # apex up at v = -1, base at v = 0.85 with half-width 1
        return (v >= -1.0) & (v <= 0.85) & (au <= (v + 1.0) / 1.85)
    if shape == "cross":
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    raise ValueError(f"shapes: unknown shape {shape!r}; expected one of {list(SHAPES)}")


def render_shapes(y: np.ndarray, attrs: np.ndarray, classes: Sequence[str], size: int, noise: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Images float32 [n, 3, size, size] in [0, 1] for labels y [n] and attributes attrs [n, 6] (ATTRIBUTES order)."""
    n, s = len(y), size
    large, red, dark, striped, marker, left = (attrs[:, i].astype(bool) for i in range(len(ATTRIBUTES)))
    half = np.where(large, 0.30, 0.20) * s * rng.uniform(0.95, 1.05, n)
    margin = half + 1.0
    offset = rng.uniform(0.0, 1.0, n) * np.maximum(s / 2 - margin - 1.0, 0.0) + 1.0  # centre >= 1 px off the midline
    cx = np.where(left, s / 2 - offset, s / 2 + offset)
    cy = margin + rng.uniform(0.0, 1.0, n) * (s - 2 * margin)
    grid = np.arange(s, dtype=np.float32) + 0.5  # pixel centres
    u = (grid[None, None, :] - cx[:, None, None].astype(np.float32)) / half[:, None, None].astype(np.float32)
    v = (grid[None, :, None] - cy[:, None, None].astype(np.float32)) / half[:, None, None].astype(np.float32)
    mask = np.zeros((n, s, s), dtype=bool)
    for k, shape in enumerate(classes):
        sel = y == k
        if sel.any():
            mask[sel] = _shape_mask(shape, u[sel], v[sel])

    colour = np.where(red[:, None], [0.85, 0.15, 0.15], [0.15, 0.35, 0.85]) + rng.uniform(-0.07, 0.07, (n, 3))
    width = max(2, s // 10)
    ramp = np.arange(s)[:, None] + np.arange(s)[None, :]
    stripes = np.stack([((ramp + p) // width) % 2 == 1 for p in range(2 * width)])  # [2w, S, S] by phase
    stripe = stripes[rng.integers(0, 2 * width, n)] & striped[:, None, None]
    shade = np.where(stripe, np.float32(0.5), np.float32(1.0))
    grey = np.where(dark, 0.12, 0.78) + rng.uniform(-0.05, 0.05, n)
    background = (grey[:, None] + rng.uniform(-0.02, 0.02, (n, 3))).astype(np.float32)

    obj = colour.astype(np.float32)[:, :, None, None] * shade[:, None]
    x = np.where(mask[:, None], obj, background[:, :, None, None])
    m = max(3, round(0.1 * s))
    x[marker, :, 1:1 + m, 1:1 + m] = np.array([1.0, 0.95, 0.1], dtype=np.float32)[:, None, None]
    if noise > 0:  # uniform noise with standard deviation `noise` (cheaper to draw than Gaussian)
        x += (rng.random(x.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(noise * 12 ** 0.5)
    return np.clip(x, 0.0, 1.0, out=x)


def load_shapes(split: str = "train", *, n_train: int = 4000, n_test: int = 1000, size: int = 32, seed: int = 0,
                bias: float = 0.0, confounder: str = "marker", test_bias: Optional[float] = None,
                classes: Sequence[str] = ("circle", "square"), noise: float = 0.03,
                label_noise: float = 0.0) -> ArrayDataset:
    """x [N, 3, size, size] float32 in [0, 1]; y [N] index into `classes`; attributes [N, 6] (ATTRIBUTES).

    bias: train-split probability that `confounder` == label % 2. test_bias: the test split's bias (default 0).
    classes: ordered subset of circle, square, triangle, cross. noise: standard deviation of the uniform pixel noise.
    label_noise: train-split probability that the image shows a shape of another class (drawn uniformly) than y.
    """
    check_split("shapes", split)
    n_train = check_int("shapes", "n_train", n_train, minimum=1)
    n_test = check_int("shapes", "n_test", n_test, minimum=1)
    size = check_int("shapes", "size", size, minimum=32)
    seed = check_int("shapes", "seed", seed, minimum=0)
    bias = check_fraction("shapes", "bias", bias)
    label_noise = check_fraction("shapes", "label_noise", label_noise)
    if label_noise >= 0.5:
        raise ValueError(f"shapes: option 'label_noise' must be below 0.5 (the shape must stay the label's "
                         f"likelier cue), got {label_noise}")
    if test_bias is not None:
        test_bias = check_fraction("shapes", "test_bias", test_bias)
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0 <= noise <= 0.5:
        raise ValueError(f"shapes: option 'noise' must be a number in [0, 0.5], got {noise!r}")
    if confounder not in ATTRIBUTES:
        raise ValueError(f"shapes: option 'confounder' must be one of {list(ATTRIBUTES)}, got {confounder!r}")
    classes = [classes] if isinstance(classes, str) else list(classes)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or len(classes) < 2 or len(set(classes)) != len(classes):
        raise ValueError(f"shapes: option 'classes' must be at least 2 distinct names from {list(SHAPES)}, "
                         f"got {classes}" + (f" (unknown: {unknown})" if unknown else ""))
    if classes != [c for c in SHAPES if c in classes]:
        raise ValueError(f"shapes: option 'classes' must keep the order {list(SHAPES)}, got {classes}")

    n = n_train if split == "train" else n_test
    split_bias = bias if split == "train" else (0.0 if test_bias is None else test_bias)
    rng = np.random.default_rng([seed, _SPLIT_CODE[split]])
    y = rng.integers(0, len(classes), n)
    attrs = rng.integers(0, 2, (n, len(ATTRIBUTES)))
    c = ATTRIBUTES.index(confounder)
    attrs[:, c] = np.where(rng.random(n) < split_bias, y % 2, attrs[:, c])
    shown = y
    if split == "train" and label_noise > 0:  # drawn after the attributes: label_noise 0 keeps the images as before
        other = (y + rng.integers(1, len(classes), n)) % len(classes)
        shown = np.where(rng.random(n) < label_noise, other, y)
    x = render_shapes(shown, attrs, classes, size, float(noise), rng)
    return ArrayDataset(
        name="shapes", x=torch.from_numpy(x), y=torch.from_numpy(y.astype(np.int64)), class_names=classes,
        kind="image", attributes=torch.from_numpy(attrs.astype(np.float32)), attribute_names=list(ATTRIBUTES),
        meta={"seed": seed, "bias": split_bias, "train_bias": bias, "confounder": confounder, "size": size,
              "label_noise": label_noise if split == "train" else 0.0,
              "noise": float(noise)})
