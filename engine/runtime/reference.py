"""Reference logits: what Gradual Construction needs of the training data (Eq. 7's per-class mean logits of N
training samples predicted as the target), computed once per (model, dataset sample) for the whole job.

The sample is `runtime.reference_samples` seeded rows of the train split (`SplitSource.sample_positions`; the
whole split, in order, when it is smaller). The first host that needs a model's logits reads the sample in
blocks of 512 rows (never holding it whole), computes the [N, K] logits and writes them under the job's output
(`<output>/cache/reference-logits/<key>.pt`, atomically); every other host, a restarted one or a resumed run
reads that file instead. The key hashes the model's weights digest, the dataset, the split, the sample's size
and seed, and the device type (logits on a GPU and on a CPU may differ in the last bits).
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Any, Optional

import torch

from engine.data.source import SplitSource, open_split
from engine.methods.gradual_construction import reference_logits
from engine.models.handles import ClassifierHandle
from engine.store.uri import exists, join, read_bytes, write_bytes_atomic

BLOCK_ROWS = 512


class SharedReference:
    """One host's access to the job's reference logits; counts what it computed and what it read."""

    def __init__(self, dataset: str, options: dict[str, Any], count: int, seed: int, output: str,
                 device: torch.device) -> None:
        self.dataset, self.options, self.count, self.seed = dataset, dict(options), int(count), int(seed)
        self.root, self.device = join(output, "cache", "reference-logits"), device
        self._source: Optional[SplitSource] = None
        self.computed, self.loaded = 0, 0  # models whose logits this host computed / read from the store

    @property
    def rows_read(self) -> int:
        """Training rows this host decoded for reference logits."""
        return 0 if self._source is None else self._source.rows_read

    def key(self, digest: str) -> str:
        described = {"weights": digest, "dataset": self.dataset, "options": self.options, "split": "train",
                     "count": self.count, "seed": self.seed, "device": self.device.type}
        return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def logits(self, handle: ClassifierHandle, digest: str) -> torch.Tensor:
        """[N, K] float32 on this host's device: read from the store, else computed and written there."""
        uri = join(self.root, f"{self.key(digest)}.pt")
        if exists(uri):
            stored = torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)
            if isinstance(stored, torch.Tensor) and stored.ndim == 2 and stored.shape[1] == handle.num_classes:
                self.loaded += 1
                return stored.to(self.device)
            # a file that is not what this key writes (a crash cannot leave one: writes are atomic): recompute
        if self._source is None:
            self._source = open_split(self.dataset, "train", **self.options)
        positions = self._source.sample_positions(self.count, self.seed)
        blocks = (block.x for block in self._source.blocks(positions, BLOCK_ROWS))
        out = reference_logits(handle, blocks, self.device)
        buffer = io.BytesIO()
        torch.save(out.cpu(), buffer)
        write_bytes_atomic(uri, buffer.getvalue())
        self.computed += 1
        return out
