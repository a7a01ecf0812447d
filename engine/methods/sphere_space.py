"""The sampling side of Growing Spheres (Laugel et al. 2018): counter-based uniforms, points uniform in a spherical
layer SL(0, a0, a1) (Alg. 1's draw), and the two spaces a search runs in (plain tensors, schema records).
"""
from __future__ import annotations

import math
from typing import Union

import torch

from engine.data.schema import SchemaCodec
from engine.seeding import query_seed

SALT = "growing_spheres"  # the method's name: a query's stream is query_seed(seed, query_id, SALT)
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------- randomness

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x · c) mod 2³² for x in [0, 2³²) held in int64, in 16-bit halves so no product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash prospector): a bijective avalanche on 32-bit words held in int64."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_keys(seed: int, query_id: torch.Tensor) -> torch.Tensor:
    """[B, 2] int64: the two 32-bit halves of query_seed(seed, query_id[b]) (computed once per call)."""
    seeds = [query_seed(seed, q, SALT) for q in query_id.tolist()]
    return torch.tensor([[s & _MASK32, s >> 32] for s in seeds], dtype=torch.int64).reshape(-1, 2)


def counter_uniform(key: torch.Tensor, layer: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """U(0, 1) float64 [m, k], a pure function of (key [m, 2], layer [m], counter [m, k]).

    A counter-based generator: any subset of draws is computed without the others, on any device, so a
    query's candidates do not depend on the batch it is in, nor on how the candidates are chunked.
    """
    s1 = mix32(key[:, 0] ^ mix32(layer & _MASK32))
    s2 = mix32(key[:, 1] ^ s1)
    h = mix32(mix32(counter ^ s1[:, None]) ^ s2[:, None])
    return (h.double() + 0.5) / 2.0**32


def layer_points(u: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor, d: int) -> torch.Tensor:
    """[m, d] float64 points uniform in the spherical layer SL(0, a0, a1) = {a0 ≤ ‖δ‖₂ ≤ a1} of R^d.

    u [m, 2⌈d/2⌉ + 1] uniforms: Box–Muller normals give the direction, the last column the radius through
    the inverse CDF of r^d (written with (a0/a1)^d so that large d neither overflows nor underflows).
    """
    half = (d + 1) // 2
    rad = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    ang = (2.0 * math.pi) * u[:, half:2 * half]
    g = torch.cat([rad * torch.cos(ang), rad * torch.sin(ang)], 1)[:, :d]
    rho = (a0 / a1) ** d
    r = a1 * (rho + u[:, 2 * half] * (1.0 - rho)) ** (1.0 / d)
    return g / g.norm(dim=1, keepdim=True) * r[:, None]


# ---------------------------------------------------------------------------------------------- spaces

class BoxSpace:
    """Plain tensors: every entry is an axis; candidates are clamped into the value range."""

    def __init__(self, shape: tuple[int, ...], value_range: tuple[float, float]) -> None:
        self.shape, self.lo, self.hi = tuple(shape), float(value_range[0]), float(value_range[1])
        self.dims = self.n_axes = math.prod(self.shape)
        self.n_uniforms = 2 * ((self.dims + 1) // 2) + 1
        self.reach = (self.hi - self.lo) * math.sqrt(self.dims)  # the box's diagonal: no point lies further

    def candidates(self, x0: torch.Tensor, u: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor) -> torch.Tensor:
        delta = layer_points(u, a0, a1, self.dims).view(len(x0), *self.shape)
        return (x0.double() + delta).clamp(self.lo, self.hi).to(x0.dtype)

    def deltas(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[m, n_axes] float64 |x − x0| per axis (what Alg. 2 ranks and reverts)."""
        return (x.double() - x0.double()).abs().flatten(1)

    def distance(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.deltas(x, x0).norm(dim=1)

    def revert(self, x: torch.Tensor, x0: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        out, rows = x.flatten(1).clone(), torch.arange(len(x), device=x.device)
        out[rows, axis] = x0.flatten(1)[rows, axis]
        return out.view_as(x)

    def changed(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (self.deltas(x, x0) > 0).sum(1)


class RecordSpace:
    """Tabular records: one axis per mutable feature, on its [0, 1] encoding (a category switch is 1 apart).

    A numeric axis moves its column (only its allowed way for a monotone feature: the sampled step is
    reflected onto that side); a categorical axis switches to a uniformly drawn other category once
    |step| ≥ 1/2, the nearest of "same" (0) and "other" (1). Every candidate is then projected onto a valid
    record (`SchemaCodec.project`: integers rounded, ranges, directions, immutables as in x) before it is
    judged, and distances are measured on records: the L2 of `SchemaCodec.changes`' per-feature change (a
    category switch counts 1), the results' l2 column.
    """

    def __init__(self, codec: SchemaCodec) -> None:
        self.codec = codec
        axis_of = torch.cumsum(codec.mutable.long(), 0) - 1  # feature -> axis (mutable features only)
        num = ~codec.num_immutable
        self.num_cols, self.num_dir = codec.num_cols[num], codec.num_dir[num]
        self.num_axis = axis_of[codec.num_feature[num]]
        cat = ~codec.cat_immutable
        valid = codec.cat_valid[cat]
        # The mutable one-hot columns as one flat list: each column's group and slot (1-D indexing is fast).
        self.cat_cols = codec.cat_index[cat][valid]
        self.col_group = valid.nonzero()[:, 0]
        self.col_slot = valid.nonzero()[:, 1]
        self.cat_axis = axis_of[codec.cat_feature[cat]]
        self.cat_width = valid.sum(1)
        # [C, G] slot of each column in its group: x0's one-hot columns @ slot_of = x0's category per group
        self.slot_of = torch.zeros(len(self.cat_cols), len(self.cat_width), dtype=torch.float32,
                                   device=codec.mutable.device)
        self.slot_of[torch.arange(len(self.cat_cols)), self.col_group] = self.col_slot.float()
        self.dims = int(codec.mutable.sum())
        self.n_axes = codec.n_features
        self.n_uniforms = 2 * ((self.dims + 1) // 2) + 1 + len(self.cat_width)
        self.reach = math.sqrt(self.dims)

    def candidates(self, x0: torch.Tensor, u: torch.Tensor, a0: torch.Tensor, a1: torch.Tensor) -> torch.Tensor:
        # index_select / index_copy_: on a CPU several times faster than x[:, idx] on these [m, D] tensors
        k = 2 * ((self.dims + 1) // 2) + 1
        delta = layer_points(u[:, :k], a0, a1, self.dims)
        out = x0.clone()
        if len(self.num_cols):
            step = delta.index_select(1, self.num_axis)
            step = torch.where(self.num_dir > 0, step.abs(), torch.where(self.num_dir < 0, -step.abs(), step))
            out.index_copy_(1, self.num_cols, (x0.index_select(1, self.num_cols).double() + step).to(x0.dtype))
        if len(self.cat_cols):
            current = (x0.index_select(1, self.cat_cols).float() @ self.slot_of).round().long()  # [m, G]
            width = self.cat_width
            other = (u[:, k:] * (width - 1)).long().clamp_max(width - 2).clamp_min(0)  # which other category
            switch = delta.index_select(1, self.cat_axis).abs() >= 0.5
            pick = torch.where(switch, (current + 1 + other) % width, current)
            out.index_copy_(1, self.cat_cols, (pick.index_select(1, self.col_group) == self.col_slot).to(x0.dtype))
        return self.codec.project(out, x0)

    def deltas(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[m, F] float64 per-feature change on [0, 1] (1 for a category switch); 0 for immutables."""
        return self.codec.changes(x0, x)["delta_scaled"]

    def distance(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """‖deltas‖₂ of valid records, without `changes`' per-group argmax (the hot path of a layer scan)."""
        cols = self.codec.num_cols
        d2 = (x.index_select(1, cols).double() - x0.index_select(1, cols).double()).pow(2).sum(1)
        if len(self.cat_cols):  # a switch in a valid record's one-hot group changes exactly two columns
            d2 = d2 + 0.5 * (x.index_select(1, self.cat_cols) != x0.index_select(1, self.cat_cols)).sum(1)
        return d2.sqrt()

    def revert(self, x: torch.Tensor, x0: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        columns = self.codec.feature_of_column[None, :] == feature[:, None]
        return torch.where(columns, x0, x)

    def changed(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return self.codec.changes(x0, x)["changed"].sum(1)


Space = Union[BoxSpace, RecordSpace]
