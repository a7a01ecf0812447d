"""What one masking step of gradual construction selects (GC Eq. 5, Alg. 1 l.4–5), for each kind of input.

A unit is what a step adds to the mask M of Eq. 1: a block_size² block of pixels (images, §4.3.2), a column
(plain tabular inputs), a whole feature of a record (its one-hot group, under a tabular schema) or a whole
word (all E dimensions of one token position, text §4.2). `mask_units` picks the adapter; each maps a
[B, n] bool selection of units to M [B, *input_shape] and scores units by Eq. 5's saliency
|∇_X log softmax_ct(X)| (the log form ranks as the paper's |∇ softmax_ct| and does not underflow).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from engine.models.handles import ClassifierHandle


def block_grid(shape: torch.Size, block: int) -> tuple[int, int]:
    """(rows, columns) of block_size² blocks covering the last two dims of `shape` (partial blocks at the borders)."""
    return math.ceil(shape[-2] / block), math.ceil(shape[-1] / block)


def input_gradient(handle: ClassifierHandle, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∇_X log softmax_ct(X) [n, *input_shape] for each row of x and its target (Eq. 5, signed)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        log_p = torch.log_softmax(handle.logits(xg).float(), -1).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(log_p, xg)
    return grad


def block_sums(sal: torch.Tensor, grid: tuple[int, int], block: int) -> torch.Tensor:
    """[n, ..., H, W] -> [n, hb·wb]: sums over each block's pixels and channels."""
    n, (h, w) = len(sal), sal.shape[-2:]
    sal = sal.reshape(n, -1, h, w).sum(1)
    sal = F.pad(sal, (0, grid[1] * block - w, 0, grid[0] * block - h))
    return sal.view(n, grid[0], block, grid[1], block).sum((2, 4)).flatten(1)


def expand_blocks(blocks: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    """[n, hb·wb] bool block mask -> [n, *shape] bool pixel mask (cropped at the borders)."""
    h, w = shape[-2:]
    hb, wb = block_grid(shape, block)
    m = blocks.view(-1, hb, wb).repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :h, :w]
    lead = tuple(shape[:-2])
    return m.view(-1, *([1] * len(lead)), h, w).expand(-1, *lead, h, w)


class Units:
    """Plain tensors [B, D]: every column is a unit; a step may pick any."""

    noun = "features"  # what the units are called in a budget reason
    image = False      # Eq. 8's total variation applies
    text = False

    def __init__(self, n: int) -> None:
        self.n = self.n_movable = n

    def allowed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n] bool: the units a masking step may ever pick."""
        return torch.ones((len(x), self.n), dtype=torch.bool, device=x.device)

    def mask(self, blocks: torch.Tensor) -> torch.Tensor:
        """[m, n] bool selection -> M [m, *input_shape] bool (Eq. 1)."""
        return blocks

    def saliency(self, handle: ClassifierHandle, x_at: torch.Tensor, x: torch.Tensor, target: torch.Tensor,
                 allowed: torch.Tensor) -> torch.Tensor:
        """Eq. 5 scores [m, n] at x_at [m, ...] (queries x, their targets and allowed units); -inf: never pick."""
        return input_gradient(handle, x_at, target).abs()


class Blocks(Units):
    """Images [B, ..., H, W]: block_size² blocks, scored by |grad| summed over their pixels and channels (§4.3.2)."""

    noun = "blocks"
    image = True

    def __init__(self, shape: torch.Size, block: int) -> None:
        self.shape, self.block, self.grid = shape, block, block_grid(shape, block)
        super().__init__(self.grid[0] * self.grid[1])

    def mask(self, blocks: torch.Tensor) -> torch.Tensor:
        return expand_blocks(blocks, self.shape, self.block)

    def saliency(self, handle, x_at, x, target, allowed):
        return block_sums(input_gradient(handle, x_at, target).abs(), self.grid, self.block)


class Records(Units):
    """Records under a tabular schema: a unit is a whole feature (one-hot group); immutable features never move.

    saliency "gradient": Eq. 5 as written, |grad| summed over a group; "gain": the first-order gain of the best
    change the schema allows (`SchemaCodec.feasible_gain`), so no step is spent on a feature that cannot help.
    """

    def __init__(self, codec: Any, saliency: str) -> None:
        super().__init__(codec.n_features)
        self.codec, self.kind = codec, saliency
        self.n_movable = int(codec.mutable.sum())

    def allowed(self, x):
        return self.codec.mutable.expand(len(x), -1)

    def mask(self, blocks):
        return self.codec.expand(blocks)

    def saliency(self, handle, x_at, x, target, allowed):
        grad = input_gradient(handle, x_at, target)
        if self.kind == "gradient":
            return self.codec.feature_sums(grad.abs()).masked_fill(~self.codec.mutable, float("-inf"))
        return self.codec.feasible_gain(grad, x_at, x)  # -inf for immutable features


class Words(Records):
    """Word vectors [B, L, E] (a TextVocab): a unit is a token position, all E dimensions; padding is never picked."""

    noun = "words"
    text = True

    def __init__(self, codec: Any) -> None:
        super().__init__(codec, "gradient")

    def allowed(self, x):
        return self.codec.token_positions(x)

    def saliency(self, handle, x_at, x, target, allowed):
        scores = self.codec.feature_sums(input_gradient(handle, x_at, target).abs())
        return scores.masked_fill(~allowed, float("-inf"))


def mask_units(x: torch.Tensor, codec: Optional[Any], block: int, tabular_saliency: str) -> Units:
    """The adapter for queries x [B, ...] under `codec` (a tabular SchemaCodec, a TextVocab's, or None)."""
    if getattr(codec, "kind", None) == "text":
        return Words(codec)
    if x.dim() >= 3:
        return Blocks(x.shape[1:], block)
    if codec is not None:
        return Records(codec, tabular_saliency)
    return Units(x.shape[1])
