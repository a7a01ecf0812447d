"""Tabular feature schema: what a real record may look like, and the encoding the classifiers see.

A record of F features is encoded as D columns in [0, 1]: a numeric feature (continuous, integer,
ordinal) as one column (v − lo) / (hi − lo), a categorical feature as its one-hot group. `SchemaCodec`
projects any [B, D] tensor onto encodings of valid records (integers integral, one category per group,
values in range, immutable features as in the original, monotone features moved only their way) and
measures changes feature by feature, a category switch counting once.

Users write a schema as a mapping (or a YAML/JSON file holding one):
    infer: true                # infer every table column not listed (default); false: only those listed
    features:
      age: {type: integer, range: [18, 100], direction: increase}
      personal_status: {immutable: true}        # fields not given are inferred from the table
      savings: {type: ordinal, categories: ["<100", "100-500", ">=1000"]}   # ordered labels
`cfaudit schema TABLE --label COLUMN` (engine.data.schema_infer) prints the inferred schema in this form for the user to correct.
"""
from __future__ import annotations

import json
import math
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr, model_validator

FeatureType = Literal["continuous", "integer", "ordinal", "categorical"]
Direction = Literal["any", "increase", "decrease"]
CHANGE_THRESHOLD = 1e-3  # a continuous feature counts as changed from this scaled |Δ| on (GC Eq. 9)


class FeatureSpec(BaseModel):
    """One feature. Numeric types need `range` [lo, hi] in the user's units (ordinal may give ordered
    `categories` instead); categorical needs `categories`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    type: FeatureType
    range: Optional[tuple[float, float]] = None
    categories: Optional[tuple[str, ...]] = None
    immutable: bool = False
    direction: Direction = "any"

    @model_validator(mode="after")
    def _consistent(self) -> "FeatureSpec":
        where = f"feature {self.name!r} ({self.type})"
        if self.categories is not None:
            if self.type not in ("categorical", "ordinal"):
                raise ValueError(f"{where}: `categories` applies to categorical or ordinal features only")
            if len(self.categories) < 1 or len(set(self.categories)) != len(self.categories):
                raise ValueError(f"{where}: `categories` must be distinct and non-empty, got {list(self.categories)}")
            if self.range is not None:
                raise ValueError(f"{where}: give `categories` or `range`, not both")
        elif self.type == "categorical":
            raise ValueError(f"{where}: needs `categories`, the list of its values")
        elif self.range is None:
            raise ValueError(f"{where}: needs `range: [lo, hi]` in the data's units")
        if self.range is not None:
            lo, hi = self.range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"{where}: `range` must be finite with lo <= hi, got {list(self.range)}")
            if self.type in ("integer", "ordinal") and not (float(lo).is_integer() and float(hi).is_integer()):
                raise ValueError(f"{where}: `range` must hold integers, got {list(self.range)}")
        if self.type == "categorical" and self.direction != "any":
            raise ValueError(f"{where}: categories have no order, so `direction` must be 'any'")
        if self.immutable and self.direction != "any":
            raise ValueError(f"{where}: an immutable feature cannot also have direction {self.direction!r}")
        return self

    @property
    def width(self) -> int:
        """Encoded columns: the one-hot group of a categorical feature, else 1."""
        return len(self.categories) if self.type == "categorical" else 1

    @property
    def bounds(self) -> tuple[float, float]:
        """(lo, hi) of the numeric value; an ordinal with labels uses ranks 0 .. n-1."""
        if self.range is not None:
            return float(self.range[0]), float(self.range[1])
        return 0.0, float(len(self.categories) - 1)

    def summary(self) -> str:
        flags = ", immutable" if self.immutable else (f", {self.direction} only" if self.direction != "any" else "")
        if self.categories is not None:
            shown = ", ".join(self.categories[:6]) + (", ..." if len(self.categories) > 6 else "")
            values = f"{len(self.categories)} {'ordered ' if self.type == 'ordinal' else ''}values [{shown}]"
        else:
            lo, hi = self.bounds
            values = f"[{_fmt(lo)}, {_fmt(hi)}]"
        return f"{self.name:<24} {self.type:<12} {values}{flags}"


class TabularSchema(BaseModel):
    """The features of a table in encoding order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: tuple[FeatureSpec, ...]
    _codecs: dict = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> "TabularSchema":
        if not self.features:
            raise ValueError("a tabular schema needs at least one feature")
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"features {dup} appear more than once")
        return self

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def width(self) -> int:
        return sum(f.width for f in self.features)

    @property
    def columns(self) -> list[str]:
        """Encoded column names: the feature name, or `name=category` in a one-hot group."""
        return [c for f in self.features
                for c in ([f"{f.name}={v}" for v in f.categories] if f.type == "categorical" else [f.name])]

    def describe(self) -> str:
        head = f"{len(self.features)} features -> {self.width} encoded columns"
        return "\n".join([head, *(f.summary() for f in self.features)])

    def to_mapping(self) -> dict[str, Any]:
        """The user-facing form (`infer: false` + every feature), ready to dump as YAML and edit."""
        out = {}
        for f in self.features:
            entry: dict[str, Any] = {"type": f.type}
            if f.range is not None:
                entry["range"] = [_num(v) for v in f.range]
            if f.categories is not None:
                entry["categories"] = list(f.categories)
            if f.immutable:
                entry["immutable"] = True
            if f.direction != "any":
                entry["direction"] = f.direction
            out[f.name] = entry
        return {"infer": False, "features": out}

    def encode(self, df, where: str = "table") -> np.ndarray:
        """A polars DataFrame -> [N, D] float32 in [0, 1]; a missing column, an unknown category, a null or
        a value outside its range is a ValueError naming the feature."""
        import polars as pl  # deferred: polars loads only for tabular data

        parts = []
        for f in self.features:
            if f.name not in df.columns:
                raise ValueError(f"{where}: schema feature {f.name!r} is not a column; columns: {df.columns}")
            col = df[f.name]
            if col.null_count():
                raise ValueError(f"{where}: feature {f.name!r} has {col.null_count()} null values")
            if f.categories is not None:
                values = col.cast(pl.String).to_numpy()
                index = {c: i for i, c in enumerate(f.categories)}
                unknown = sorted(set(values) - set(index))
                if unknown:
                    raise ValueError(f"{where}: feature {f.name!r} holds values {unknown[:5]} outside its categories "
                                     f"{list(f.categories)}")
                codes = np.array([index[v] for v in values], dtype=np.int64)
                if f.type == "categorical":
                    parts.append(np.eye(len(f.categories), dtype=np.float32)[codes])
                    continue
                v = codes.astype(np.float64)
            else:
                if not (col.dtype.is_numeric() or col.dtype == pl.Boolean):
                    raise ValueError(f"{where}: feature {f.name!r} is {f.type} but the column holds {col.dtype}")
                v = col.cast(pl.Float64).to_numpy()
                if not np.isfinite(v).all():
                    raise ValueError(f"{where}: feature {f.name!r} holds NaN or infinite values")
                if f.type in ("integer", "ordinal") and not np.all(v == np.round(v)):
                    raise ValueError(f"{where}: feature {f.name!r} is {f.type} but holds non-integral values, "
                                     f"e.g. {v[v != np.round(v)][0]}")
            lo, hi = f.bounds
            outside = (v < lo) | (v > hi)
            if outside.any():
                raise ValueError(f"{where}: feature {f.name!r} has {int(outside.sum())} values outside its range "
                                 f"[{_fmt(lo)}, {_fmt(hi)}], e.g. {_fmt(v[outside][0])}")
            parts.append(((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v))[:, None].astype(np.float32))
        return np.concatenate(parts, axis=1)

    def decode(self, x: Union[torch.Tensor, np.ndarray]) -> list[dict[str, Any]]:
        """[N, D] encodings -> records in the user's units (ints for integral features, labels for categories)."""
        x = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
        records: list[dict[str, Any]] = [{} for _ in range(len(x))]
        start = 0
        for f in self.features:
            block = x[:, start:start + f.width]
            start += f.width
            if f.type == "categorical":
                for rec, k in zip(records, block.argmax(1)):
                    rec[f.name] = f.categories[int(k)]
                continue
            lo, hi = f.bounds
            values = lo + block[:, 0] * (hi - lo)
            for rec, v in zip(records, values):
                if f.type in ("integer", "ordinal"):
                    k = int(round(min(max(v, lo), hi)))
                    rec[f.name] = f.categories[k] if f.categories is not None else k
                else:
                    rec[f.name] = float(v)
        return records

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TabularSchema) and self.features == other.features

    def __hash__(self) -> int:
        return hash(self.features)

    def codec(self, device: Union[str, torch.device] = "cpu") -> "SchemaCodec":
        """The schema's index tensors on `device` (built once per device)."""
        key = str(torch.device(device))
        if key not in self._codecs:
            self._codecs[key] = SchemaCodec(self, key)
        return self._codecs[key]

    def __getstate__(self) -> dict:
        # Codecs hold device tensors; they are rebuilt on demand after unpickling.
        state = super().__getstate__()
        return {**state, "__pydantic_private__": {"_codecs": {}}}


class SchemaCodec:
    """The schema as index tensors on one device, for batched projection and per-feature measures."""

    def __init__(self, schema: TabularSchema, device: str) -> None:
        dev = torch.device(device)
        self.schema = schema
        starts = np.cumsum([0] + [f.width for f in schema.features])[:-1]
        numeric = [(i, f) for i, f in enumerate(schema.features) if f.type != "categorical"]
        groups = [(i, f) for i, f in enumerate(schema.features) if f.type == "categorical"]

        def t(values, dtype):
            return torch.tensor(values, dtype=dtype, device=dev)

        self.num_cols = t([int(starts[i]) for i, _ in numeric], torch.int64)
        self.num_lo = t([f.bounds[0] for _, f in numeric], torch.float64)
        self.num_span = t([f.bounds[1] - f.bounds[0] for _, f in numeric], torch.float64)
        self.num_integral = t([f.type in ("integer", "ordinal") for _, f in numeric], torch.bool)
        self.num_dir = t([{"any": 0, "increase": 1, "decrease": -1}[f.direction] for _, f in numeric], torch.int64)
        self.num_immutable = t([f.immutable for _, f in numeric], torch.bool)
        self.num_feature = t([i for i, _ in numeric], torch.int64)
        width = max([f.width for _, f in groups], default=1)
        self.cat_index = t([[int(starts[i]) + min(j, f.width - 1) for j in range(width)] for i, f in groups]
                           or [[0]][:0], torch.int64).reshape(len(groups), width)
        self.cat_valid = t([[j < f.width for j in range(width)] for _, f in groups] or [[True]][:0],
                           torch.bool).reshape(len(groups), width)
        self.cat_immutable = t([f.immutable for _, f in groups], torch.bool)
        self.cat_feature = t([i for i, _ in groups], torch.int64)
        self.feature_of_column = t([i for i, f in enumerate(schema.features) for _ in range(f.width)], torch.int64)
        self.mutable = t([not f.immutable for f in schema.features], torch.bool)
        self.immutable_columns = ~self.mutable[self.feature_of_column]
        self.n_features = len(schema.features)
        self.width = schema.width

    def check_width(self, width: int, where: str) -> None:
        if width != self.width:
            raise ValueError(f"{where}: the tabular schema encodes {self.width} columns "
                             f"({self.n_features} features) but the inputs have {width}")

    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[B, D] -> the nearest valid encodings given the originals x0 [B, D] (per feature: round, clip,
        keep immutables, respect directions; argmax of each one-hot group)."""
        out = x.clone()
        if len(self.num_cols):
            lo, span = self.num_lo, self.num_span
            u = x[:, self.num_cols].double() * span + lo
            u0 = x0[:, self.num_cols].double() * span + lo
            u = torch.where(self.num_integral, u.round(), u)
            u = torch.minimum(torch.maximum(u, lo), lo + span)
            u = torch.where(self.num_dir > 0, torch.maximum(u, u0), u)
            u = torch.where(self.num_dir < 0, torch.minimum(u, u0), u)
            u = torch.where(self.num_immutable, u0, u)
            scaled = torch.where(span > 0, (u - lo) / span.clamp_min(1e-300), torch.zeros_like(u))
            out[:, self.num_cols] = scaled.to(x.dtype)
        if len(self.cat_index):
            onehot = self._onehot(x)
            keep = self._onehot(x0)
            onehot = torch.where(self.cat_immutable[None, :, None], keep, onehot)
            out[:, self.cat_index[self.cat_valid]] = onehot[:, self.cat_valid].to(x.dtype)
        return out

    def _onehot(self, x: torch.Tensor) -> torch.Tensor:
        """[B, G, L] bool: the argmax category of each group (a NaN-free argmax; ties take the first)."""
        # index_select on the flat index: x[:, cat_index] (a 2-D advanced index) is ~4x slower on a CPU
        g = x.index_select(1, self.cat_index.flatten()).view(len(x), *self.cat_index.shape)
        g = torch.nan_to_num(g, nan=-1.0).masked_fill(~self.cat_valid, float("-inf"))
        pick = g.argmax(-1, keepdim=True)
        return (torch.arange(g.shape[-1], device=x.device) == pick) & self.cat_valid

    def feature_sums(self, values: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, F]: each feature's sum over its encoded columns (GC's saliency per feature)."""
        out = torch.zeros(len(values), self.n_features, dtype=values.dtype, device=values.device)
        return out.index_add_(1, self.feature_of_column, values)

    def feasible_gain(self, grad: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """[B, F] first-order gain of the best change each feature may make from x (grad [B, D] of the
        quantity to raise): a numeric feature moved to the end of its allowed interval in the helpful
        direction (range, direction relative to x0), a categorical one switched to its best category;
        −inf for immutable features."""
        out = torch.zeros(len(x), self.n_features, dtype=grad.dtype, device=grad.device)
        if len(self.num_cols):
            g, cur, ref = grad[:, self.num_cols], x[:, self.num_cols], x0[:, self.num_cols]
            lo = torch.where(self.num_dir > 0, ref, torch.zeros_like(ref))
            hi = torch.where(self.num_dir < 0, ref, torch.ones_like(ref))
            out[:, self.num_feature] = torch.where(g > 0, g * (hi - cur), -g * (cur - lo)).clamp_min(0)
        if len(self.cat_index):
            gg = grad[:, self.cat_index].masked_fill(~self.cat_valid, float("-inf"))
            current = self._onehot(x)
            best_other = gg.masked_fill(current, float("-inf")).amax(-1)
            now = gg.masked_fill(~current, 0.0).sum(-1)
            out[:, self.cat_feature] = torch.nan_to_num((best_other - now).clamp_min(0), neginf=0.0)
        return out.masked_fill(~self.mutable, float("-inf"))

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """[B, F] per-feature mask -> [B, D] per-column mask."""
        return features[:, self.feature_of_column]

    def changes(self, x0: torch.Tensor, x1: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-feature change of valid encodings: changed [B, F] bool, delta_units [B, F] (numeric |Δ| in the
        user's units, 1 for a category switch), delta_scaled [B, F] (|Δ| on [0, 1], 1 for a switch)."""
        b = len(x0)
        changed = torch.zeros(b, self.n_features, dtype=torch.bool, device=x0.device)
        units = torch.zeros(b, self.n_features, dtype=torch.float64, device=x0.device)
        scaled = torch.zeros_like(units)
        if len(self.num_cols):
            d = (x1[:, self.num_cols].double() - x0[:, self.num_cols].double()).abs()
            du = d * self.num_span
            hit = torch.where(self.num_integral, du >= 0.5, d >= CHANGE_THRESHOLD)
            changed[:, self.num_feature] = hit
            units[:, self.num_feature] = du
            scaled[:, self.num_feature] = d
        if len(self.cat_index):
            switch = (self._onehot(x0) != self._onehot(x1)).any(-1)
            changed[:, self.cat_feature] = switch
            units[:, self.cat_feature] = switch.double()
            scaled[:, self.cat_feature] = switch.double()
        return {"changed": changed, "delta_units": units, "delta_scaled": scaled}


def result_columns(schema: TabularSchema, x: torch.Tensor, x_cf: torch.Tensor) -> dict[str, Any]:
    """Results columns of tabular queries measured on the records: l0 (features changed, a category switch
    once), l1/l2 on the [0, 1] scale, l1_units/l2_units in the user's units, the counterfactual record as
    JSON and the changes in words ("duration: 24 -> 12")."""
    x, x_cf = x.detach().cpu(), torch.nan_to_num(x_cf.detach().cpu())
    ch = schema.codec("cpu").changes(x, x_cf)
    before, after = schema.decode(x), schema.decode(x_cf)
    names = schema.names
    words = [[f"{names[j]}: {_fmt(b[names[j]])} -> {_fmt(a[names[j]])}" for j in row.nonzero().flatten().tolist()]
             for b, a, row in zip(before, after, ch["changed"])]
    return {
        "l0": ch["changed"].sum(1).numpy(),
        "l1": ch["delta_scaled"].sum(1).float().numpy(),
        "l2": ch["delta_scaled"].pow(2).sum(1).sqrt().float().numpy(),
        "l1_units": ch["delta_units"].sum(1).float().numpy(),
        "l2_units": ch["delta_units"].pow(2).sum(1).sqrt().float().numpy(),
        "record_cf": [json.dumps(rec, sort_keys=False) for rec in after],
        "changes": words,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.4g}"
    return str(v)


def _num(v: float) -> Union[int, float]:
    return int(v) if float(v).is_integer() else float(v)
