"""Resolve the fleet entries of a spec into classifier handles (train-or-cache, or safe load)."""
from __future__ import annotations

import time
from typing import Optional

import torch

from engine.data import dataset_fingerprint, load_dataset
from engine.data.base import ArrayDataset
from engine.models.handles import ClassifierHandle
from engine.spec.audit import DatasetRef, FleetModel

def training_data(entry: FleetModel, dataset: DatasetRef) -> ArrayDataset:
    """The train split a built-in model learns from: the spec's dataset with the entry's overrides."""
    options = {**dataset.options, **(entry.train.dataset_options if entry.train else {})}
    return load_dataset(dataset.name, "train", **options)


def resolve_classifier(entry: FleetModel, dataset: DatasetRef, cache_dir: Optional[str] = None,
                       device: str | torch.device = "cpu", log=print) -> ClassifierHandle:
    """Train (or load from the content-addressed cache) a built-in model, or safely load a user's file."""
    from engine.models.loading import classifier_handle_from_module, eval_mode, load_module
    from engine.models.zoo import get_or_train

    start = time.perf_counter()
    if entry.train is not None:
        data = training_data(entry, dataset)
        train = entry.train
        module, info = get_or_train(
            "classifier", train.arch, train.arch_options, data, dataset_fingerprint(data), train.train_kwargs(),
            train.seed, cache_dir)
        meta = {"source": "builtin", "cache_key": info["key"], "cache_hit": info["cache_hit"],
                "train_dataset": data.name, "train_options": {**dataset.options, **train.dataset_options}}
        log(f"  model {entry.id}: {'cache hit' if info['cache_hit'] else 'trained'} "
            f"({time.perf_counter() - start:.1f}s, key {info['key'][:12]})")
        input_shape, class_names, value_range = data.input_shape, data.class_names, data.value_range
    else:
        module = load_module(entry.path, format=entry.format, factory=entry.factory,
                             factory_kwargs=entry.factory_kwargs, allow_pickle=entry.allow_pickle)
        data = load_dataset(dataset.name, "test", **dataset.options)
        input_shape, class_names, value_range = data.input_shape, data.class_names, data.value_range
        meta = {"source": "file", "path": entry.path}
        log(f"  model {entry.id}: loaded {entry.path} ({time.perf_counter() - start:.1f}s)")
    module = eval_mode(module.to(device))
    for p in module.parameters():
        p.requires_grad_(False)
    handle = classifier_handle_from_module(module, entry.id, tuple(input_shape), list(class_names),
                                           tuple(value_range))
    handle.meta.update(meta)
    return handle
