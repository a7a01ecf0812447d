"""The real-image side of an audit's Fréchet distances: which extractor, and its feature statistics.

The driver resolves the extractor once ("auto" becomes "inception" with a weights path, or "domain"), so
every host computes the same features, draws `reference_samples` real images of the query split and
stores their FrechetState at <out>/metrics/fid_reference.npz. Reports compare the valid counterfactuals'
merged states against it and name the extractor and both sample counts beside every figure.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from engine.metrics.features import (CONVERT_COMMAND, DomainExtractor, InceptionExtractor, domain_extractor,
                                     find_inception_weights)
from engine.metrics.frechet import FrechetState
from engine.models.zoo import load_cached
from engine.progress import Log, Progress
from engine.store.uri import exists, join, read_bytes, write_bytes_atomic


@dataclass(frozen=True)
class FidChoice:
    """The resolved extractor: kind 'inception' (with weights) or 'domain', or None when FID is off."""

    kind: Optional[str]
    weights: Optional[str] = None
    domain_key: Optional[str] = None  # the domain network's cache key once the driver has it: hosts read no data


def resolve_choice(kind: str, weights: Optional[str], image_data: bool, log: Callable[[str], Any] = print) -> FidChoice:
    if kind == "none":
        return FidChoice(None)
    if not image_data:
        log("FID: skipped, the dataset is not made of images")
        return FidChoice(None)
    if kind in ("auto", "inception"):
        found = find_inception_weights(weights)
        if found is not None:
            return FidChoice("inception", found)
        if kind == "inception":
            raise FileNotFoundError("metrics.fid.extractor is 'inception' but no Inception weights were found: set "
                                    f"metrics.fid.weights, $CFAUDIT_INCEPTION_WEIGHTS, or run `{CONVERT_COMMAND}`")
        log(f"FID: Inception weights not found (create them with `{CONVERT_COMMAND}`); using the domain FID")
    return FidChoice("domain")


def build_extractor(choice: FidChoice, dataset_name: str, dataset_options: dict, cache_dir: Optional[str],
                    device: torch.device | str, log: Callable[[str], Any] = print):
    if choice.kind is None:
        return None
    if choice.kind == "inception":
        return InceptionExtractor(choice.weights, device=device)
    if choice.domain_key is not None:
        module, _ = load_cached(choice.domain_key, cache_dir)
        return DomainExtractor(module, f"domain:{dataset_name}:{choice.domain_key[:12]}", device=device)
    return domain_extractor(dataset_name, dataset_options, cache_dir, device, log)


def reference_state(extractor, x, samples: int, seed: int, log: Log = None) -> FrechetState:
    """Features of `samples` real images drawn (seeded, without replacement) from x: a tensor [N, C, H, W], or
    a split read on demand (engine.data.source.SplitSource), of which only the drawn rows are read.

    Fed to the extractor in chunks of its own batch size (the same batches as one call), so `log` can get
    progress lines without changing a feature.
    """
    rows = (lambda index: x[index]) if isinstance(x, torch.Tensor) else (lambda index: x.take(index).x.float())
    generator = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(len(x), generator=generator)[:min(samples, len(x))]
    chunk = max(1, int(getattr(extractor, "batch_size", len(index) or 1)))
    if len(index) <= chunk:
        return FrechetState.of(extractor(rows(index)).double().cpu().numpy())
    progress = Progress("FID reference", log, len(index), unit="images")
    features = []
    for i in range(0, len(index), chunk):
        features.append(extractor(rows(index[i:i + chunk])))
        progress.update(len(features[-1]))
    progress.close()
    return FrechetState.of(torch.cat(features).double().cpu().numpy())


def reference_uri(out: str) -> str:
    return join(out, "metrics", "fid_reference.npz")


def write_reference(out: str, extractor_name: str, state: FrechetState) -> None:
    n, total, outer = state.to_arrays()
    buffer = io.BytesIO()
    np.savez(buffer, n=np.int64(n), total=total, outer=outer, extractor=np.array(extractor_name))
    write_bytes_atomic(reference_uri(out), buffer.getvalue())


def read_reference(out: str) -> Optional[tuple[str, FrechetState]]:
    """(extractor name, real-image state), or None when the audit computed no FID."""
    uri = reference_uri(out)
    if not exists(uri):
        return None
    with np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False) as data:
        return str(data["extractor"]), FrechetState.from_arrays(int(data["n"]), data["total"], data["outer"])
