"""Dataset registry: name -> loader; `load_dataset(name, split, **options)` validates the options up front.

A loader is `fn(split: str, *, option=default, ...) -> ArrayDataset`; its keyword-only parameters are its
options and a parameter without a default is a required option. Loaders are imported only when used.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from typing import Any, Callable, Union

import torch

from engine.data._common import SPLITS
from engine.data.base import ArrayDataset

_LOADERS: dict[str, Union[str, Callable[..., ArrayDataset]]] = {
    "digits": "engine.data.digits:load_digits",
    "mnist": "engine.data.idx:load_mnist",
    "fashion_mnist": "engine.data.idx:load_fashion_mnist",
    "shapes": "engine.data.shapes:load_shapes",
    "breast_cancer": "engine.data.breast_cancer:load_breast_cancer",
    "parquet_images": "engine.data.parquet_images:load_parquet_images",
    "image_folder": "engine.data.image_folder:load_image_folder",
    "tabular": "engine.data.tabular:load_tabular",
    "german_credit": "engine.data.german_credit:load_german_credit",
    "text": "engine.data.text:load_text",
}

REQUIRED = inspect.Parameter.empty  # marks a required option in `dataset_options`


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def register_dataset(name: str, loader: Callable[..., ArrayDataset], overwrite: bool = False) -> None:
    """Add a loader `fn(split, *, options...) -> ArrayDataset` under `name`."""
    if name in _LOADERS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered; pass overwrite=True to replace it")
    _LOADERS[name] = loader


def _loader(name: str) -> Callable[..., ArrayDataset]:
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {dataset_names()}")
    target = _LOADERS[name]
    if callable(target):
        return target
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def dataset_options(name: str) -> dict[str, Any]:
    """Option name -> default (`REQUIRED` when the option has none) of dataset `name`."""
    params = inspect.signature(_loader(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(name: str, split: str, options: dict[str, Any]) -> None:
    """ValueError for an unknown dataset, a bad split, an unknown option or a missing required one."""
    if split not in SPLITS:
        raise ValueError(f"dataset {name!r}: split must be one of {list(SPLITS)}, got {split!r}")
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"dataset {name!r}: unknown option(s) {unknown}; valid options: {sorted(valid)}")
    missing = sorted(k for k, v in valid.items() if v is REQUIRED and k not in options)
    if missing:
        raise ValueError(f"dataset {name!r}: missing required option(s) {missing}")


def load_dataset(name: str, split: str = "train", **options: Any) -> ArrayDataset:
    """Load one split ("train" or "test") of dataset `name`; unknown names/options are ValueErrors."""
    check_options(name, split, options)
    ds = _loader(name)(split, **options)
    ds.meta.setdefault("dataset", name)
    ds.meta["split"] = split
    ds.meta["options"] = dict(options)
    return ds


def _update_tensor(h: "hashlib._Hash", t) -> None:
    if t is None:
        h.update(b"none")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")


def dataset_fingerprint(ds: ArrayDataset) -> str:
    """sha256 hex over name, x, y, attributes (bytes, dtypes, shapes) and class/attribute/feature names."""
    h = hashlib.sha256()
    h.update(json.dumps([ds.name, ds.kind, list(ds.value_range), list(ds.class_names),
                         list(ds.attribute_names), list(ds.feature_names)]).encode())
    for t in (ds.x, ds.y, ds.attributes):
        _update_tensor(h, t)
    return h.hexdigest()
