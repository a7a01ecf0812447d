"""`digits`: scikit-learn's shipped 8x8 handwritten digits (1,797 images), optionally resized."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from engine.data._common import check_split, split_indices
from engine.data.base import ArrayDataset

SIZES = (8, 16, 28)
SPLIT_SEED = 0  # fixed: the 80/20 split never changes between runs


def load_digits(split: str = "train", *, size: int = 8) -> ArrayDataset:
    """x [N, 1, size, size] float32 in [0, 1]; y [N] digits 0..9; stratified 80/20 split by a fixed seed."""
    from sklearn.datasets import load_digits as sk_load_digits  # deferred: scikit-learn loads only for this dataset

    check_split("digits", split)
    if isinstance(size, bool) or size not in SIZES:
        raise ValueError(f"digits: option 'size' must be one of {list(SIZES)}, got {size!r}")
    bunch = sk_load_digits()
    y = bunch.target.astype(np.int64)
    idx = split_indices(y, split, 0.2, SPLIT_SEED)
    x = torch.from_numpy(bunch.images[idx].astype(np.float32) / 16.0).unsqueeze(1)  # pixel values are 0..16
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return ArrayDataset(name="digits", x=x.contiguous(), y=torch.from_numpy(y[idx]),
                        class_names=[str(i) for i in range(10)], kind="image",
                        meta={"source": "sklearn.datasets.load_digits", "size": size, "split_seed": SPLIT_SEED})
