"""One sweep trial: the method with the trial's config on the fixed query sample -> its pooled metrics.

`TrialRunner` holds what a trial needs (query split, reference data, every fleet model, generator, oracle,
metric options), loaded once from the model cache; `metrics(config)` runs the method batch by batch on
every model through engine.explain.explain_unit (per-query columns, engine.metrics.per_query), folds each
batch's rows into mergeable GroupStates (engine.metrics.aggregate) and collapses them into one figure per
metric. `trainable` is the Ray Tune function trainable that wraps it; `TrialRunner` itself needs no Ray, so
a trial's row can be recomputed in-process from its config and the spec's seed.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from engine.data import load_dataset
from engine.explain import explain_unit
from engine.methods import Method, config_hash, make_method
from engine.metrics.aggregate import GroupState, Moments, collapse, group_states, merge_states
from engine.metrics.fid_reference import FidChoice, build_extractor
from engine.metrics.frechet import FrechetState
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.runtime.fleet import resolve_classifier, resolve_explainer, resolve_generator, resolve_oracle
from engine.runtime.host import pick_device
from engine.spec.sweep import SweepSpec
from engine.store.uri import join
from engine.tune.space import plain

TENSOR_COLUMNS = ("x_cf", "p_orig", "p_cf")
NOT_REPRODUCIBLE = ("seconds_per_cf", "std_seconds")  # wall time; every other metric is exact given the seed


@dataclass
class TrialContext:
    """What the driver hands every trial (through tune.with_parameters): plain, picklable values."""

    spec: dict[str, Any]
    query_ids: list[int]
    cache_dir: str
    threads: int = 1
    fid: dict[str, Any] = field(default_factory=lambda: {"kind": None})
    fid_reference: Optional[dict[str, Any]] = None  # {"extractor", "n", "total", "outer"}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Intra-op threads fixed for the trial: the same count gives the same floating-point sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrialRunner:
    """A sweep's models and query sample, loaded once (per trial, or once on the driver)."""

    def __init__(self, spec: SweepSpec, query_ids: list[int], cache_dir: Optional[str] = None,
                 fid: Optional[FidChoice] = None, fid_reference: Optional[tuple[str, FrechetState]] = None,
                 threads: int = 1, log: Callable[[str], Any] = lambda *_: None) -> None:
        self.spec, self.threads = spec, threads
        self.query_ids = torch.as_tensor(list(query_ids), dtype=torch.int64)
        self.device = pick_device(spec.runtime.device)
        options = spec.dataset.options
        self.queries = load_dataset(spec.dataset.name, spec.queries.split, **options)
        self.reference = load_dataset(spec.dataset.name, "train", **options)
        generator = None if spec.generator is None else resolve_generator(
            spec.generator, spec.dataset, cache_dir, self.device, log=log)
        oracle = None if spec.oracle is None else resolve_oracle(spec.oracle, spec.dataset, cache_dir, self.device,
                                                                 log=log)
        explainer_entry = spec.needs_explainer()
        self.bundles: dict[str, ModelBundle] = {}
        for entry in spec.fleet:
            handle = resolve_classifier(entry, spec.dataset, cache_dir, self.device, log=log)
            explainer = None if explainer_entry is None else resolve_explainer(
                handle, explainer_entry, spec.dataset, cache_dir, self.device,
                checkpoint_root=_explainer_root(spec), log=log)
            self.bundles[entry.id] = ModelBundle(classifier=handle, generator=generator, oracle=oracle,
                                                 reference=self.reference, device=self.device, explainer=explainer)
        extractor = build_extractor(fid or FidChoice(None), spec.dataset.name, options, cache_dir, self.device,
                                    log=log)
        self.fid_reference = fid_reference
        self.options = MetricOptions.from_spec(spec.metrics, spec.confounders(), extractor)

    def method(self, config: dict[str, Any]) -> Method:
        params = {**self.spec.method.params, **{k: plain(v) for k, v in config.items() if k in self.spec.space}}
        return make_method(self.spec.method.name, params)

    def tables(self, config: dict[str, Any], model_id: str, query_ids: Optional[torch.Tensor] = None
               ) -> Iterator[pa.Table]:
        """Result rows (store.results schema) of `config` on one model, one table per batch."""
        method = self.method(config)
        ids = self.query_ids if query_ids is None else query_ids
        size = self.spec.runtime.batch_size
        meta = {"job": self.spec.name, "spec_hash": self.spec.spec_hash(), "model_id": model_id,
                "method": method.name, "config_hash": config_hash(method.name, method.config)}
        with torch_threads(self.threads):
            for part, start in enumerate(range(0, len(ids), size)):
                chunk = ids[start:start + size]
                yield explain_unit(method, self.bundles[model_id], self.queries.x[chunk], chunk,
                                   self.queries.y[chunk], self.spec.targets, seed=self.spec.seed,
                                   meta={**meta, "unit_id": f"{model_id}/{method.name}/{part:05d}"},
                                   metrics=self.options)

    def metrics(self, config: dict[str, Any]) -> dict[str, Any]:
        """The trial's figures: every model's rows pooled (model x method x source x target states merged)."""
        states: dict[tuple, GroupState] = {}
        latent = Moments()
        for model_id in self.bundles:
            for table in self.tables(config, model_id):
                rows = pl.from_arrow(table.drop_columns([c for c in TENSOR_COLUMNS if c in table.column_names]))
                states = merge_states(states, group_states(rows))
                if "latent_l2" in rows.columns:  # not among aggregate's moments: kept here, merged the same way
                    valid = rows.filter(pl.col("success"))["latent_l2"].cast(pl.Float64).fill_null(float("nan"))
                    latent = latent.merge(Moments.of(valid.to_numpy()))
        pooled = collapse(states, keys=("method",))
        state = next(iter(pooled.values()), GroupState())
        reference = None if self.fid_reference is None else self.fid_reference[1]
        return collapse_metrics(state.compute(reference, self.spec.metrics.confidence,
                                              self.spec.metrics.bootstrap_samples), latent, self.spec.seed)

    def examples(self, config: dict[str, Any], k: int) -> pl.DataFrame:
        """The first k queries of the sample on the first fleet model: scalars, x, x_cf and changed features."""
        model_id = next(iter(self.bundles))
        ids = self.query_ids[:k]
        tables = list(self.tables(config, model_id, ids))
        if not tables:
            return pl.DataFrame()
        table = pa.concat_tables(tables)
        x_cf = table.column("x_cf").combine_chunks().to_numpy_ndarray()
        scalars = pl.from_arrow(table.select([c for c in ("query_id", "label", "pred_orig", "target", "pred_cf",
                                                          "success", "l0", "changes") if c in table.column_names]))
        x = self.queries.x[torch.tensor(scalars["query_id"].to_list())].numpy()
        names = list(self.queries.feature_names or [])
        if "changes" not in scalars.columns or scalars["changes"].null_count() == scalars.height:
            scalars = scalars.with_columns(pl.Series("changes", [changed_features(a, b, names)
                                                                 for a, b in zip(x, x_cf)], pl.List(pl.String)))
        return scalars.with_columns(
            pl.lit(model_id).alias("model_id"),
            pl.Series("x", [a.reshape(-1).astype(np.float32) for a in x], pl.List(pl.Float32)),
            pl.Series("x_cf", [a.reshape(-1).astype(np.float32) for a in x_cf], pl.List(pl.Float32)),
            pl.lit(list(x.shape[1:]), pl.List(pl.Int64)).alias("shape"),
            pl.lit(float(self.queries.value_range[0])).alias("value_lo"),
            pl.lit(float(self.queries.value_range[1])).alias("value_hi"))


def changed_features(x: np.ndarray, x_cf: np.ndarray, names: list[str], tol: float = 1e-3) -> list[str]:
    """'name: before -> after' for tabular inputs' entries moved by >= tol (GC Eq. 9's count); [] for images."""
    if x.ndim != 1:
        return []
    moved = np.flatnonzero(np.abs(x_cf - x) >= tol)
    return [f"{names[i] if i < len(names) else f'x[{i}]'}: {x[i]:.3g} -> {x_cf[i]:.3g}" for i in moved]


def collapse_metrics(row: dict[str, Any], latent: Moments, seed: int) -> dict[str, Any]:
    """GroupState.compute's row as Tune metrics: numeric scalars only, with the sweep's names."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue  # curves and per-attribute maps stay in the audit's reports
        out[key] = float(value) if isinstance(value, (float, np.floating)) else int(value)
    out["flip_ratio"] = out["validity"]
    out["seconds_per_cf"] = out.pop("mean_seconds", math.nan)
    out["mean_latent_l2"], out["std_latent_l2"] = latent.value, latent.std
    out["seed"] = int(seed)
    return out


def _explainer_root(spec: SweepSpec) -> str:
    return join(spec.output, "sweeps", spec.name)


def reference_from_context(ctx: TrialContext) -> Optional[tuple[str, FrechetState]]:
    ref = ctx.fid_reference
    if ref is None:
        return None
    return ref["extractor"], FrechetState.from_arrays(int(ref["n"]), np.asarray(ref["total"]),
                                                      np.asarray(ref["outer"]))


_RUNNERS: dict[str, TrialRunner] = {}  # per process: a reused trial actor keeps its loaded models


def runner_from_context(ctx: TrialContext) -> TrialRunner:
    """The context's TrialRunner, built once per process (Tune reuses trial actors: reuse_actors=True)."""
    key = json.dumps([ctx.spec, ctx.query_ids, ctx.cache_dir, ctx.threads, ctx.fid], sort_keys=True, default=str)
    if key not in _RUNNERS:
        _RUNNERS.clear()
        spec = SweepSpec.model_validate(ctx.spec)
        _RUNNERS[key] = TrialRunner(spec, ctx.query_ids, ctx.cache_dir, FidChoice(**ctx.fid),
                                    reference_from_context(ctx), threads=ctx.threads)
    return _RUNNERS[key]


def trainable(config: dict[str, Any], context: TrialContext) -> None:
    """Ray Tune function trainable: the models (loaded once per actor), the config's run, one report."""
    from ray import tune  # deferred: Ray Tune loads only when a sweep runs

    tune.report(runner_from_context(context).metrics(config))
