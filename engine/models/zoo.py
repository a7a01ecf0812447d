"""The built-in zoo: architecture registry, `build`, and `get_or_train` backed by the weights cache."""
from __future__ import annotations

import inspect
import math
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional

import torch
from torch import nn

from engine.data.base import ArrayDataset
from engine.models import architectures as A
from engine.models import text_models as TM
from engine.models import training as T
from engine.models.cache import CODE_VERSION, ModelCache, cache_key
from engine.progress import Log

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "cnn": A.CNNClassifier,
    "mlp": A.MLPClassifier,
    "conv_vae": A.ConvVAE,
    "dcgan_generator": A.DCGANGenerator,
    "dcgan_discriminator": A.DCGANDiscriminator,
    "attribute_autoencoder": A.AttributeAutoencoder,
    "attribute_oracle": A.AttributeOracle,
    "text_cnn": TM.TextCNN,  # text (engine.data.text): x [B, L, E] word vectors
    "text_vae": TM.TextVAE,
}

# kind -> (training routine, architectures it accepts)
KINDS: dict[str, tuple[Callable[..., tuple[nn.Module, list[float]]], tuple[str, ...]]] = {
    "classifier": (T.train_classifier, ("cnn", "mlp", "text_cnn")),
    "vae": (T.train_vae, ("conv_vae",)),
    "dcgan": (T.train_dcgan, ("dcgan_generator",)),
    "attribute_autoencoder": (T.train_attribute_autoencoder, ("attribute_autoencoder", "text_vae")),
    "oracle": (T.train_oracle, ("attribute_oracle", "mlp")),
}

# Architectures trained by a routine of their own rather than their kind's.
ARCH_TRAINERS: dict[str, Callable[..., tuple[nn.Module, list[float]]]] = {"text_vae": TM.train_text_vae}

DEFAULT_LATENT_DIM = 16

# Training arguments that are not hyper-parameters (not JSON-able, or passed separately): never in a cache key.
_NOT_HYPERPARAMETERS = frozenset({"module", "dataset", "seed", "oracle", "log", "stage"})


def arch_name(module: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(module) is cls:
            return name
    raise ValueError(f"{type(module).__name__} is not a built-in architecture; expected one of "
                     f"{sorted(ARCHITECTURES)}")


def build(arch: str, **kwargs: Any) -> nn.Module:
    """A fresh `ARCHITECTURES[arch](**kwargs)`; unknown names or arguments are ValueErrors."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    missing = sorted(n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs)
    if unknown or missing:
        problems = ([f"unknown argument(s) {unknown}"] if unknown else []) + ([f"lacks {missing}"] if missing else [])
        raise ValueError(f"Architecture {arch!r}: {' and '.join(problems)}; it takes {list(params)}")
    return cls(**kwargs)


def rebuild(arch: str, hparams: dict, state_dict: Optional[dict] = None) -> nn.Module:
    """Rebuild a recorded module (`module.hparams`) and load `state_dict` into it; eval mode."""
    module = build(arch, **hparams)
    if state_dict is not None:
        module.load_state_dict(state_dict)
    return module.eval()


def infer_arch_kwargs(kind: str, arch: str, arch_kwargs: dict, dataset: ArrayDataset) -> dict:
    """`arch_kwargs` completed with the shape arguments the dataset determines (given values win)."""
    params = inspect.signature(ARCHITECTURES[arch]).parameters
    shape = dataset.input_shape
    inferred: dict[str, Any] = {}
    if len(shape) == 3:
        if shape[1] != shape[2]:
            raise ValueError(f"Built-in image models need square images but dataset {dataset.name!r} has "
                             f"shape {shape}")
        inferred.update(in_channels=shape[0], out_channels=shape[0], image_size=shape[1])
    inferred["in_features"] = math.prod(shape)
    num_attributes = 0 if dataset.attributes is None else dataset.attributes.shape[1]
    inferred["num_attributes"] = num_attributes
    inferred["num_classes"] = num_attributes if kind == "oracle" else dataset.num_classes
    inferred["latent_dim"] = DEFAULT_LATENT_DIM  # DCGANGenerator requires one; the others default to the same
    if dataset.kind == "text":  # engine.data.text: [L, E] word vectors over a vocabulary
        inferred.update(seq_len=shape[0], embed_dim=shape[1], vocab_size=len(dataset.schema))
    out = {k: v for k, v in inferred.items() if k in params}
    out.update(arch_kwargs)
    return out


def trainer_for(kind: str, arch: Optional[str] = None) -> Callable[..., tuple[nn.Module, list[float]]]:
    """The routine that trains `arch` as `kind`: the architecture's own (ARCH_TRAINERS), else the kind's."""
    return ARCH_TRAINERS.get(arch, KINDS[kind][0])


def resolve_train_kwargs(kind: str, train_kwargs: Optional[dict], arch: Optional[str] = None) -> dict:
    """The training routine's hyper-parameters: its defaults overridden by `train_kwargs`."""
    trainer = trainer_for(kind, arch)
    defaults = {n: p.default for n, p in inspect.signature(trainer).parameters.items()
                if n not in _NOT_HYPERPARAMETERS}
    given = dict(train_kwargs or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"Unknown training argument(s) {unknown} for kind {kind!r}; expected some of "
                         f"{sorted(defaults)} (the seed is passed separately)")
    return {**defaults, **given}


def get_or_train(kind: str, arch: str, arch_kwargs: Optional[dict], dataset: ArrayDataset,
                 dataset_fingerprint: str, train_kwargs: Optional[dict], seed: int,
                 cache_dir: Any = None, *, log: Log = None, stage: Optional[str] = None) -> tuple[nn.Module, dict]:
    """The trained module (eval mode, CPU) for these inputs, from the cache or trained now and cached.

    While it trains, `log` gets progress lines named `stage` (default: the kind); neither is in the cache key.

    Missing shape arguments (in_channels, image_size, in_features, num_classes, num_attributes) are taken
    from the dataset; a missing latent_dim is 16. info: key, cache_hit, path, seconds (spent in this call), train_seconds, history,
    arch, arch_kwargs (complete), train_kwargs (complete).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown model kind {kind!r}; expected one of {sorted(KINDS)}")
    archs = KINDS[kind][1]
    trainer = trainer_for(kind, arch)
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    if arch not in archs:
        raise ValueError(f"Architecture {arch!r} cannot be trained as kind {kind!r}; expected one of {list(archs)}")
    start = time.perf_counter()
    kwargs = infer_arch_kwargs(kind, arch, dict(arch_kwargs or {}), dataset)
    with T.seeded(seed):
        module = build(arch, **kwargs)
    hparams = module.hparams
    tk = resolve_train_kwargs(kind, train_kwargs, arch)
    key = cache_key(kind, arch, hparams, tk, seed, dataset_fingerprint)
    cache = ModelCache(cache_dir)
    hit = cache.load(key)
    if hit is not None:
        state, meta = hit
        module.load_state_dict(state)
        module.eval()
        history, train_seconds = meta.get("history", []), meta.get("train_seconds")
    else:
        t0 = time.perf_counter()
        module, history = trainer(module, dataset, seed=seed, log=log, stage=stage or kind, **tk)
        train_seconds = time.perf_counter() - t0
        meta = {
            "key": key, "kind": kind, "arch": arch, "arch_kwargs": hparams, "train_kwargs": tk, "seed": int(seed),
            "dataset_fingerprint": str(dataset_fingerprint), "dataset_name": dataset.name,
            "num_samples": len(dataset), "history": history, "train_seconds": train_seconds,
            "created": datetime.now(timezone.utc).isoformat(), "code_version": CODE_VERSION,
            "torch_version": torch.__version__,
        }
        cache.save(key, module.state_dict(), meta)
    info = {
        "key": key, "cache_hit": hit is not None, "path": str(cache.path(key)),
        "seconds": time.perf_counter() - start, "train_seconds": train_seconds, "history": list(history),
        "arch": arch, "arch_kwargs": hparams, "train_kwargs": tk,
    }
    return module, info


def load_cached(key: str, cache_dir: Any = None) -> tuple[nn.Module, dict]:
    """Rebuild a cached module from its key alone (e.g. on a worker that never saw the dataset)."""
    entry = ModelCache(cache_dir).load(key)
    if entry is None:
        raise FileNotFoundError(f"No cached model {key!r} under {ModelCache(cache_dir).root}")
    state, meta = entry
    return rebuild(meta["arch"], meta["arch_kwargs"], state), meta
