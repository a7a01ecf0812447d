"""Per-query randomness: seeds derived from (spec seed, query id, salt), so a batch of N queries draws what N
single calls draw, on every platform and in every run (methods' starts, metrics' random baselines)."""
from __future__ import annotations

import hashlib

import torch


def query_seed(seed: int, query_id: int, salt: str = "") -> int:
    """A 63-bit seed derived from (batch seed, query id, salt), stable across runs and platforms."""
    digest = hashlib.blake2b(f"{int(seed)}:{int(query_id)}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def per_query_normal(seed: int, query_id: torch.Tensor, shape: tuple[int, ...], salt: str) -> torch.Tensor:
    """N(0, 1) draws [B, *shape] on the CPU, row b seeded from (seed, query_id[b], salt).

    The loop over queries runs once at initialisation, so a batch of N draws what N single calls draw.
    """
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(query_seed(seed, q, salt)))
            for q in query_id.tolist()]
    return torch.stack(rows) if rows else torch.empty((0, *shape))
