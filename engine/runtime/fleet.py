"""Resolve the fleet entries of a spec into classifier handles (train-or-cache, or a user's file).

This is where spec entries become models: the spec layer sits above models, so models never see a spec; hosts
(engine.runtime.host), trials (engine.tune) and the workflows all resolve through here.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from torch import nn

from engine.data import dataset_fingerprint, load_dataset
from engine.data.base import ArrayDataset
from engine.data.source import open_split
from engine.models.adapters import ModelAdapter
from engine.models.explainer_training import get_or_train_explainer, make_explainer_config
from engine.models.handles import ClassifierHandle, GeneratorHandle
from engine.models.loading import classifier_handle_from_module, eval_mode, load_module
from engine.models.zoo import get_or_train, load_cached
from engine.runtime.explainer_train import train_explainer
from engine.spec.audit import DatasetRef, ExplainerEntry, FleetModel, GeneratorEntry, InputSpec, OracleEntry, OutputSpec
from engine.store.uri import join


def adapt_classifier(module: nn.Module, input: Optional[InputSpec], output: Optional[OutputSpec],
                     input_shape: Sequence[int], num_classes: int, model_id: str) -> nn.Module:
    """`module` in a ModelAdapter for a fleet entry's `input:` / `output:`; the module itself when neither is set."""
    if input is None and output is None:
        return module
    given, head = input or InputSpec(), output or OutputSpec()
    return ModelAdapter(module, input_shape, num_classes, scale=given.scale, size=given.size, crop=given.crop,
                        mean=given.mean, std=given.std, channels_last=given.channels_last, dtype=given.dtype,
                        head=head.kind, index=head.index, key=head.key, declared=output is not None,
                        model_id=model_id)


def training_data(entry: FleetModel, dataset: DatasetRef) -> ArrayDataset:
    """The train split a built-in model learns from: the spec's dataset with the entry's overrides."""
    options = {**dataset.options, **(entry.train.dataset_options if entry.train else {})}
    return load_dataset(dataset.name, "train", **options)


def resolve_classifier(entry: FleetModel, dataset: DatasetRef, cache_dir: Optional[str] = None,
                       device: str | torch.device = "cpu", log=print,
                       cache_key: Optional[str] = None) -> ClassifierHandle:
    """Train (or load from the content-addressed cache) a built-in model, or load a user's file (see loading.py).
    cache_key: the built-in model's key as the driver resolved it: loaded by key, its training data unread."""
    start = time.perf_counter()
    if entry.train is not None and cache_key is not None:
        module, _ = load_cached(cache_key, cache_dir)
        data = open_split(dataset.name, "train", **{**dataset.options, **entry.train.dataset_options}).info
        meta = {"source": "builtin", "cache_key": cache_key, "cache_hit": True}
        input_shape, class_names, value_range = data.input_shape, data.class_names, data.value_range
    elif entry.train is not None:
        data = training_data(entry, dataset)
        train = entry.train
        module, info = get_or_train(
            "classifier", train.arch, train.arch_options, data, dataset_fingerprint(data), train.train_kwargs(),
            train.seed, cache_dir, log=log, stage=f"model {entry.id}")
        meta = {"source": "builtin", "cache_key": info["key"], "cache_hit": info["cache_hit"],
                "train_dataset": data.name, "train_options": {**dataset.options, **train.dataset_options}}
        log(f"  model {entry.id}: {'cache hit' if info['cache_hit'] else 'trained'} "
            f"({time.perf_counter() - start:.1f}s, key {info['key'][:12]})")
        input_shape, class_names, value_range = data.input_shape, data.class_names, data.value_range
    else:
        module = load_module(entry.path, format=entry.format, factory=entry.factory,
                             factory_kwargs=entry.factory_kwargs, trust=entry.trust, model_id=entry.id)
        # The data's description only (shape, classes, range): a user's split is not read for it.
        data = open_split(dataset.name, "test", **dataset.options).info
        input_shape, class_names, value_range = data.input_shape, data.class_names, data.value_range
        meta = {"source": "file", "path": entry.path}
        log(f"  model {entry.id}: loaded {entry.path} ({time.perf_counter() - start:.1f}s)")
    # The entry's `input:` / `output:` go inside the classifier: methods see the data's space and logits.
    module = adapt_classifier(module, entry.input, entry.output, input_shape, len(class_names), entry.id)
    module = eval_mode(module.to(device))
    for p in module.parameters():
        p.requires_grad_(False)
    handle = classifier_handle_from_module(module, entry.id, tuple(input_shape), list(class_names),
                                           tuple(value_range))
    handle.meta.update(meta)
    return handle


# Built-in architecture each generator kind / the oracle trains when the spec names none.
GENERATOR_ARCH = {"vae": "conv_vae", "dcgan": "dcgan_generator", "attribute_autoencoder": "attribute_autoencoder"}
ORACLE_ARCH = "attribute_oracle"


def _train_aux(kind: str, arch: str, train, dataset: DatasetRef, cache_dir: Optional[str], log,
               cache_key: Optional[str] = None) -> tuple:
    """(module, the training split or its description, meta); with `cache_key`, loaded by key, no data read."""
    if cache_key is not None:
        module, _ = load_cached(cache_key, cache_dir)
        info = open_split(dataset.name, "train", **{**dataset.options, **train.dataset_options}).info
        return module, info, {"source": "builtin", "cache_key": cache_key}
    data = load_dataset(dataset.name, "train", **{**dataset.options, **train.dataset_options})
    start = time.perf_counter()
    module, info = get_or_train(kind, arch, train.arch_options, data, dataset_fingerprint(data),
                                train.train_kwargs(), train.seed, cache_dir, log=log)
    log(f"  {kind}: {'cache hit' if info['cache_hit'] else 'trained'} ({time.perf_counter() - start:.1f}s, "
        f"key {info['key'][:12]})")
    return module, data, {"source": "builtin", "cache_key": info["key"]}


def _load_file(entry, what: str, log) -> nn.Module:
    module = load_module(entry.path, format=entry.format, factory=entry.factory,
                         factory_kwargs=entry.factory_kwargs, trust=entry.trust, model_id=what)
    log(f"  {what}: loaded {entry.path}")
    return module


def _freeze(module: nn.Module, device: str | torch.device) -> nn.Module:
    module = eval_mode(module.to(device))
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def resolve_generator(entry: GeneratorEntry, dataset: DatasetRef, cache_dir: Optional[str] = None,
                      device: str | torch.device = "cpu", log=print,
                      cache_key: Optional[str] = None) -> GeneratorHandle:
    """The spec's generative model as a GeneratorHandle (built-in: trained or cached, or by `cache_key`; else a
    user's file)."""
    if entry.train is not None:
        arch = entry.train.arch or GENERATOR_ARCH[entry.kind]
        module, data, meta = _train_aux(entry.kind, arch, entry.train, dataset, cache_dir, log, cache_key)
        latent_dim = int(module.hparams["latent_dim"])
        names = list(data.attribute_names) if entry.kind == "attribute_autoencoder" else []
    else:
        module, meta = _load_file(entry, "generator", log), {"source": "file", "path": entry.path}
        latent_dim, names = int(entry.latent_dim), list(entry.attribute_names)
    if not hasattr(module, "decode"):
        raise ValueError(f"generator {entry.path or entry.kind!r}: the module has no `decode(z[, a])` method")
    return GeneratorHandle(module=_freeze(module, device), model_id=f"generator-{entry.kind}",
                           latent_dim=latent_dim, attribute_names=names, meta=meta)


def resolve_oracle(entry: OracleEntry, dataset: DatasetRef, cache_dir: Optional[str] = None,
                   device: str | torch.device = "cpu", log=print, cache_key: Optional[str] = None) -> ClassifierHandle:
    """The spec's attribute oracle: x -> attribute logits [B, A], named by the dataset's attributes."""
    if entry.train is not None:
        module, data, meta = _train_aux("oracle", entry.train.arch or ORACLE_ARCH, entry.train, dataset,
                                        cache_dir, log, cache_key)
        names = list(data.attribute_names)
        if not names:
            raise ValueError(f"oracle: dataset {dataset.name!r} has no attributes to train an oracle on")
    else:
        module, meta = _load_file(entry, "oracle", log), {"source": "file", "path": entry.path}
        data, names = open_split(dataset.name, "test", **dataset.options).info, list(entry.attribute_names)
    handle = classifier_handle_from_module(_freeze(module, device), "oracle", data.input_shape, names,
                                           data.value_range)
    handle.meta.update(meta)
    return handle


def resolve_explainer(handle: ClassifierHandle, entry: ExplainerEntry, dataset: DatasetRef,
                      cache_dir: Optional[str] = None, device: str | torch.device = "cpu",
                      checkpoint_root: Optional[str] = None, log=print) -> nn.Module:
    """Progressive Exaggeration's explainer for this classifier, trained now or taken from the model cache.

    The cache key covers the classifier's weights, the explainer's data and config and the seed, so it belongs
    to one classifier. Checkpoints go to `entry.checkpoint_uri` (or `checkpoint_root`/explainers) + model id.
    """
    data = load_dataset(dataset.name, "train", **{**dataset.options, **entry.dataset_options})
    prefix = entry.checkpoint_uri or (join(checkpoint_root, "explainers") if checkpoint_root else None)
    explainer, info = get_or_train_explainer(
        handle.module, data, dataset_fingerprint(data), make_explainer_config(entry.train), seed=entry.seed,
        cache_dir=cache_dir, checkpoint_uri=join(prefix, handle.model_id) if prefix else None,
        checkpoint_every=entry.checkpoint_every, workers=entry.workers, use_gpu=entry.use_gpu, log=log,
        train=train_explainer)
    log(f"  explainer for {handle.model_id}: {'cache hit' if info['cache_hit'] else 'trained'} "
        f"({info['seconds']:.1f}s, key {info['key'][:12]})")
    return _freeze(explainer, device)
