"""Target selection (DESIGN.md 'Targets'): explicit class, `second`, `all`, or `flip`."""
from __future__ import annotations

from typing import Union

import torch

TargetMode = Union[str, int]


def resolve_targets(logits: torch.Tensor, mode: TargetMode) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and targets for a batch of logits [B, K].

    Returns (row [R], target [R]): query `row[r]` must be explained toward `target[r]`.
    `all` gives K-1 rows per query (every class but the predicted one); the others one row each.
    """
    b, k = logits.shape
    pred = logits.argmax(-1)
    rows = torch.arange(b, device=logits.device)
    if mode == "second":
        if k < 2:
            raise ValueError("targets: `second` needs at least 2 classes")
        return rows, logits.topk(2, dim=-1).indices[:, 1]
    if mode == "flip":
        if k != 2:
            raise ValueError(f"targets: `flip` is for binary classifiers, this one has {k} classes; "
                             "use `second`, `all` or a class index")
        return rows, 1 - pred
    if mode == "all":
        others = torch.arange(k, device=logits.device).expand(b, k)
        keep = others != pred[:, None]
        return rows[:, None].expand(b, k)[keep], others[keep]
    if isinstance(mode, int) and not isinstance(mode, bool):
        if not 0 <= mode < k:
            raise ValueError(f"targets: class {mode} is out of range for a classifier with {k} classes")
        return rows, torch.full((b,), mode, dtype=torch.long, device=logits.device)
    raise ValueError(f"targets: expected `flip`, `second`, `all` or a class index, got {mode!r}")
