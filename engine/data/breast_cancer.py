"""`breast_cancer`: the Wisconsin diagnostic breast cancer table shipped with scikit-learn (569 x 30)."""
from __future__ import annotations

import numpy as np
import torch

from engine.data._common import check_split, minmax_apply, minmax_fit, split_indices
from engine.data.base import ArrayDataset

SPLIT_SEED = 0


def load_breast_cancer(split: str = "train") -> ArrayDataset:
    """x [N, 30] float32 min-max scaled by train statistics (test clipped to [0, 1]); y 0 = malignant, 1 = benign."""
    from sklearn.datasets import load_breast_cancer as sk_load  # deferred: scikit-learn loads only for this dataset

    check_split("breast_cancer", split)
    bunch = sk_load()
    x, y = bunch.data.astype(np.float64), bunch.target.astype(np.int64)
    train = split_indices(y, "train", 0.2, SPLIT_SEED)
    idx = train if split == "train" else split_indices(y, "test", 0.2, SPLIT_SEED)
    lo, scale = minmax_fit(x[train])
    return ArrayDataset(
        name="breast_cancer", x=torch.from_numpy(minmax_apply(x[idx], lo, scale)), y=torch.from_numpy(y[idx]),
        class_names=[str(c) for c in bunch.target_names], kind="tabular",
        feature_names=[str(f) for f in bunch.feature_names],
        meta={"source": "sklearn.datasets.load_breast_cancer", "split_seed": SPLIT_SEED,
              "feature_min": lo.tolist(), "feature_scale": scale.tolist()})
