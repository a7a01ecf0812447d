"""Content-addressed cache of trained weights.

An entry is `<root>/<key>/weights.pt` (a state_dict saved with torch.save) and `<root>/<key>/meta.json`.
The key is the sha256 of everything that determines the weights (`cache_key`). An entry is written into a
temporary directory beside it and renamed into place, so readers and crashes never see half an entry; when two
processes train the same key, the first rename wins and the other's copy is discarded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

# Bump when training code or architectures change in a way that changes the weights for the same inputs.
CODE_VERSION = "models-2"
ENV_VAR = "CFAUDIT_CACHE"
WEIGHTS, META = "weights.pt", "meta.json"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 24 * 3600


def default_cache_dir(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """`cache_dir` if given, else $CFAUDIT_CACHE, else ~/.cache/cfaudit/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cfaudit" / "models"


def canonical_json(value: Any, what: str = "value") -> str:
    """Sorted, compact JSON; tuples become lists. A non-JSON-able value is a ValueError naming `what`."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected {what} to be JSON-able (numbers, strings, lists, dicts) but got {value!r}: "
                         f"{err}") from None


def cache_key(kind: str, arch: str, arch_kwargs: dict, train_kwargs: dict, seed: int,
              dataset_fingerprint: str, code_version: str = CODE_VERSION) -> str:
    """sha256 hex digest of what determines the trained weights."""
    payload = {
        "kind": kind, "arch": arch, "arch_kwargs": arch_kwargs, "train_kwargs": train_kwargs, "seed": int(seed),
        "dataset": str(dataset_fingerprint), "code_version": code_version,
    }
    return hashlib.sha256(canonical_json(payload, "the cache key inputs").encode()).hexdigest()


class ModelCache:
    """Weights and metadata by key under one root directory."""

    def __init__(self, root: Union[str, os.PathLike, None] = None) -> None:
        self.root = default_cache_dir(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def __contains__(self, key: str) -> bool:
        entry = self.path(key)
        return (entry / WEIGHTS).is_file() and (entry / META).is_file()

    def load(self, key: str) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
        """(state_dict, meta) for `key`, or None when absent. Tensors are loaded onto the CPU."""
        if key not in self:
            return None
        entry = self.path(key)
        meta = json.loads((entry / META).read_text())
        state = torch.load(entry / WEIGHTS, map_location="cpu", weights_only=True)
        return state, meta

    def save(self, key: str, state_dict: dict[str, torch.Tensor], meta: dict) -> Path:
        """Write an entry atomically; returns its directory. An existing entry for `key` is kept."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        if key in self:
            return final
        self._sweep_stale()
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:16]}-", dir=self.root))
        try:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp / WEIGHTS)
            (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            try:
                os.rename(tmp, final)
            except OSError:
                if key not in self:  # not a lost race: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _sweep_stale(self) -> None:
        """Remove temporary directories a crashed writer left behind long ago."""
        now = time.time()
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
