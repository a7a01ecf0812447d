"""Mergeable group metrics (the torchmetrics idea: update / merge / compute).

A `GroupState` holds sufficient statistics of one group (model x method x source class -> target class)
built from result rows; states of different shards merge exactly, so a report over many workers' shards
equals one over a single shard holding every row, without re-reading any counterfactual tensor.

Denominators: validity and time are over every query; distances, latent figures, attribute changes,
confounding and coherence over the valid counterfactuals only (an invalid one explains nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import polars as pl

from engine.metrics.compatibility import pooled_compatibility
from engine.metrics.frechet import FrechetState, frechet_distance

GROUP_KEYS = ("model_id", "method", "source", "target")
MOMENT_COLUMNS = {  # column -> only over valid counterfactuals?
    "l0": True, "l1": True, "l2": True, "z_l2": True, "lpr": True, "coherence": True,
    "n_iter": False, "seconds": False, "p_cf_target": False, "deletion_auc": False,
}
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (Chan et al.'s parallel update)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: Iterable[float]) -> "Moments":
        v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return cls()
        return cls(int(v.size), float(v.mean()), float(((v - v.mean()) ** 2).sum()))

    def merge(self, other: "Moments") -> "Moments":
        n = self.n + other.n
        if n == 0:
            return Moments()
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * other.n / n, self.m2 + other.m2 + delta * delta * self.n * other.n / n)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else float("nan")

    @property
    def value(self) -> float:
        return self.mean if self.n else float("nan")


@dataclass
class Rate:
    """k successes out of n trials; the bootstrap interval resamples the n outcomes."""

    n: int = 0
    k: int = 0

    def merge(self, other: "Rate") -> "Rate":
        return Rate(self.n + other.n, self.k + other.k)

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    def interval(self, confidence: float = CONFIDENCE, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = 0) -> tuple[float, float]:
        """Percentile bootstrap interval. Resampling n 0/1 outcomes with k ones draws Binomial(n, k/n) ones,
        so the bootstrap needs only (n, k) and merges exactly."""
        if self.n == 0:
            return float("nan"), float("nan")
        draws = np.random.default_rng(seed).binomial(self.n, self.k / self.n, size=samples) / self.n
        tail = (1.0 - confidence) / 2.0
        return float(np.quantile(draws, tail)), float(np.quantile(draws, 1.0 - tail))


@dataclass
class Curve:
    """Sum of per-query curves of equal length; the mean curve and its area."""

    n: int = 0
    total: Optional[np.ndarray] = None

    def merge(self, other: "Curve") -> "Curve":
        if self.total is None:
            return other
        if other.total is None:
            return self
        return Curve(self.n + other.n, self.total + other.total)

    @property
    def mean(self) -> Optional[np.ndarray]:
        return None if self.total is None or self.n == 0 else self.total / self.n


@dataclass
class GroupState:
    queries: int = 0
    validity: Rate = field(default_factory=Rate)
    moments: dict[str, Moments] = field(default_factory=dict)
    coherence_max: float = float("-inf")
    confounded: Rate = field(default_factory=Rate)
    closeness: Rate = field(default_factory=Rate)
    oracle_read: int = 0                                               # valid rows the oracle read
    attribute_changed: dict[str, int] = field(default_factory=dict)    # ... of which it reads `name` changed
    attribute_delta: dict[str, Moments] = field(default_factory=dict)  # |a_cf - a0| of the method
    top_read: int = 0                                                  # valid rows with a top-attribute list
    attribute_top5: dict[str, int] = field(default_factory=dict)       # ... with `name` among the top five
    desired: list[np.ndarray] = field(default_factory=list)           # cat state, as Spearman needs ranks
    achieved: list[np.ndarray] = field(default_factory=list)
    deletion: Curve = field(default_factory=Curve)
    fid: Any = None                                                    # FrechetState of valid x_cf features

    def merge(self, other: "GroupState") -> "GroupState":
        keys = set(self.moments) | set(other.moments)
        fid = other.fid if self.fid is None else (self.fid if other.fid is None else self.fid.merge(other.fid))
        return GroupState(
            queries=self.queries + other.queries,
            validity=self.validity.merge(other.validity),
            moments={k: self.moments.get(k, Moments()).merge(other.moments.get(k, Moments())) for k in keys},
            coherence_max=max(self.coherence_max, other.coherence_max),
            confounded=self.confounded.merge(other.confounded),
            closeness=self.closeness.merge(other.closeness),
            oracle_read=self.oracle_read + other.oracle_read,
            attribute_changed=_merge_maps(self.attribute_changed, other.attribute_changed, int),
            attribute_delta=_merge_maps(self.attribute_delta, other.attribute_delta, Moments),
            top_read=self.top_read + other.top_read,
            attribute_top5=_merge_maps(self.attribute_top5, other.attribute_top5, int),
            desired=self.desired + other.desired, achieved=self.achieved + other.achieved,
            deletion=self.deletion.merge(other.deletion), fid=fid)

    def compute(self, fid_reference: Any = None, confidence: float = CONFIDENCE,
                bootstrap: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
        """One report row: every figure of the group, each NaN/None when the group has no data for it."""
        row: dict[str, Any] = {"queries": self.queries, "validity": self.validity.value,
                               "valid": self.validity.k}
        for name in MOMENT_COLUMNS:
            m = self.moments.get(name, Moments())
            row[f"mean_{name}"], row[f"std_{name}"] = m.value, m.std
        row["coherence_max"] = self.coherence_max if math.isfinite(self.coherence_max) else float("nan")
        lo, hi = self.confounded.interval(confidence, bootstrap)
        row.update(confounded_n=self.confounded.n, confounding_rate=self.confounded.value,
                   confounding_lo=lo, confounding_hi=hi, latent_closeness=self.closeness.value)
        pooled = (pooled_compatibility(np.concatenate(self.desired), np.concatenate(self.achieved))
                  if self.desired else {"spearman": float("nan"), "mae": float("nan")})
        row["compat_spearman"], row["compat_mae"] = pooled["spearman"], pooled["mae"]
        curve = self.deletion.mean
        row["deletion_curve"] = None if curve is None else [float(v) for v in curve]
        row["deletion_area"] = float(np.trapezoid(curve, dx=1.0 / (len(curve) - 1))) if curve is not None else float("nan")
        row["attribute_change_rate"] = ({k: v / self.oracle_read for k, v in sorted(self.attribute_changed.items())}
                                        if self.oracle_read else None)
        row["attribute_mean_abs_delta"] = {k: v.value for k, v in sorted(self.attribute_delta.items())} or None
        row["attribute_top5_share"] = ({k: v / self.top_read for k, v in sorted(self.attribute_top5.items())}
                                       if self.top_read else None)
        row["fid"], row["fid_samples"] = float("nan"), 0 if self.fid is None else int(self.fid.n)
        if self.fid is not None and fid_reference is not None and self.fid.n >= 2:
            row["fid"] = frechet_distance(self.fid, fid_reference)
        return row


def _merge_maps(a: dict, b: dict, kind: type) -> dict:
    if kind is int:
        return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}
    return {k: a.get(k, kind()).merge(b.get(k, kind())) for k in set(a) | set(b)}


def group_states(rows: pl.DataFrame, fid_dim: Optional[int] = None) -> dict[tuple, GroupState]:
    """GroupStates of result rows keyed by (model_id, method, source, target); source = the model's
    original prediction. Needs only scalar/list columns; absent optional columns are skipped."""
    rows = rows.with_columns(pl.col("pred_orig").alias("source"))
    states: dict[tuple, GroupState] = {}
    for key, part in rows.group_by(list(GROUP_KEYS), maintain_order=True):
        states[tuple(key)] = _state_of(part, fid_dim)
    return states


def merge_states(*parts: dict[tuple, GroupState]) -> dict[tuple, GroupState]:
    out: dict[tuple, GroupState] = {}
    for states in parts:
        for key, state in states.items():
            out[key] = state if key not in out else out[key].merge(state)
    return out


def collapse(states: dict[tuple, GroupState], keys: tuple[str, ...] = ("model_id", "method")) -> dict[tuple, GroupState]:
    """Merge group states over the keys not named (e.g. every source -> target of a model x method)."""
    index = [GROUP_KEYS.index(k) for k in keys]
    return merge_states(*({tuple(key[i] for i in index): s} for key, s in states.items()))


def _state_of(part: pl.DataFrame, fid_dim: Optional[int]) -> GroupState:
    cols = set(part.columns)
    ok = part["success"].to_numpy().astype(bool)
    valid = part.filter(pl.col("success"))
    state = GroupState(queries=part.height, validity=Rate(part.height, int(ok.sum())))
    for name, valid_only in MOMENT_COLUMNS.items():
        if name in cols:
            source = valid if valid_only else part
            state.moments[name] = Moments.of(source[name].cast(pl.Float64).fill_null(float("nan")).to_numpy())
    if "coherence" in cols and valid.height:
        values = valid["coherence"].cast(pl.Float64).drop_nulls().drop_nans().to_numpy()
        state.coherence_max = float(values.max()) if values.size else float("-inf")
    if "confounded" in cols:
        flags = valid["confounded"].drop_nulls().to_numpy()
        state.confounded = Rate(int(flags.size), int(flags.sum()))
    if "latent_closest" in cols:
        flags = valid["latent_closest"].drop_nulls().to_numpy()
        state.closeness = Rate(int(flags.size), int(flags.sum()))
    if "oracle_changed" in cols:
        # Attributes the oracle never saw change in this group have no entry (rate 0 by omission).
        read = valid.filter(pl.col("oracle_changed").is_not_null())
        if read.height:
            changed = read["oracle_changed"].explode().drop_nulls().value_counts()
            state.oracle_read = read.height
            state.attribute_changed = {n: int(c) for n, c in zip(changed[:, 0].to_list(), changed["count"].to_list())}
    if "attribute_delta" in cols:
        deltas = valid.filter(pl.col("attribute_delta").is_not_null())["attribute_delta"]
        if deltas.len():
            entries = deltas.map.entries() if deltas.dtype.__class__.__name__ == "Map" else deltas
            flat = entries.explode().drop_nulls().struct.unnest()
            flat.columns = ["key", "value"]
            for name, values in flat.group_by("key", maintain_order=True):
                state.attribute_delta[name[0]] = Moments.of(np.abs(values["value"].cast(pl.Float64).to_numpy()))
    if "top_attributes" in cols:
        tops = valid.filter(pl.col("top_attributes").is_not_null())["top_attributes"]
        if tops.len():
            top5 = tops.list.head(5).explode().drop_nulls().value_counts()
            state.top_read = tops.len()
            state.attribute_top5 = {n: int(c) for n, c in zip(top5[:, 0].to_list(), top5["count"].to_list())}
    if "desired" in cols and "achieved" in cols:
        series = part.filter(pl.col("desired").is_not_null())
        if series.height:
            state.desired = [series["desired"].explode().cast(pl.Float64).to_numpy()]
            state.achieved = [series["achieved"].explode().cast(pl.Float64).to_numpy()]
    if "deletion" in cols:
        curves = part.filter(pl.col("deletion").is_not_null())["deletion"]
        if curves.len():
            stacked = np.stack([np.asarray(c, np.float64) for c in curves.to_list()])
            state.deletion = Curve(stacked.shape[0], stacked.sum(0))
    if "fid_features" in cols:
        feats = valid.filter(pl.col("fid_features").is_not_null())["fid_features"]
        if feats.len():
            matrix = np.stack([np.asarray(f, np.float64) for f in feats.to_list()])
            state.fid = FrechetState.empty(fid_dim or matrix.shape[1])
            state.fid.update(matrix)
    return state
