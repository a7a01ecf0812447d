"""sweep(spec): Ray Tune trials of one method's config on a fixed query sample -> trials, Pareto front, page.

Writes under <output>/sweeps/<name>/:
  _sweep.json       the spec and its hash (a different spec is refused unless `overwrite: true`)
  tune/             Ray Tune's experiment (trial dirs, searcher state); a re-run resumes it (Tuner.restore)
  trials.parquet    one row per trial: id, status, error, seed, config fields, every metric
  pareto.parquet    the non-dominated trials on the objectives, `recommended` marking the recommendation
  examples.parquet  counterfactuals of a few queries at the front's ends and at the recommendation
  index.html        the sweep page (engine.report.sweep_page)
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import polars as pl
import ray
import torch
from ray import tune

from engine.data import load_dataset
from engine.metrics.fid_reference import reference_state, resolve_choice
from engine.models.cache import default_cache_dir
from engine.report.sweep_page import render_sweep_page
from engine.runtime.cluster import start_ray
from engine.runtime.plan import select_queries
from engine.spec.sweep import SweepSpec
from engine.store.frames import write_frame
from engine.store.uri import check_writable, filesystem, is_local, join
from engine.tune.pareto import extremes, knee_scores, recommend
from engine.tune.space import param_space, plain, search_alg
from engine.tune.trainable import TrialContext, TrialRunner, trainable
from engine.workflows.preflight import check_claim, check_dataset, check_fleet
from engine.workflows.stages import Stages, claim_directory

FINISHED = ("TERMINATED", "ERROR")
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "abfs", "az")


@dataclass
class SweepResult:
    directory: str
    trials: pl.DataFrame
    complete: bool
    pareto: Optional[pl.DataFrame] = None
    recommended: Optional[dict[str, Any]] = None
    page: Optional[str] = None
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def errored(self) -> int:
        return int((self.trials["status"] == "ERROR").sum()) if self.trials.height else 0


def sweep_dir(spec: SweepSpec) -> str:
    return join(spec.output, "sweeps", spec.name)


def tune_storage(directory: str) -> str:
    """Tune's storage_path for the sweep directory: an absolute local path, or an object-store URI."""
    fs, path = filesystem(directory)
    if is_local(fs):
        return os.path.abspath(path)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if any(p in OBJECT_STORES for p in protocols):
        return directory
    raise ValueError(f"output: a sweep keeps Ray Tune's experiment under <output>/sweeps, which needs a local path "
                     f"or an object store Ray Tune writes (s3://, gs://, abfs://); got {directory!r}")


def claim_sweep(spec: SweepSpec, directory: str, log: Callable[[str], Any]) -> None:
    """Refuse to resume another spec's sweep; `overwrite: true` clears it first."""
    claim_directory(directory, "_sweep.json", spec, "a sweep", log)


def check_resources(spec: SweepSpec, log: Callable[[str], Any]) -> None:
    """A trial that asks for more than a local Ray has would wait forever: refuse it, naming the field."""
    total, free = ray.cluster_resources(), ray.available_resources()
    for key, name in (("CPU", "cpu"), ("GPU", "gpu")):
        want = float(getattr(spec.resources, name))
        if want <= 0:
            continue
        if want > total.get(key, 0.0):
            message = (f"resources.{name}: a trial asks for {want:g} {key}, the Ray cluster has "
                       f"{total.get(key, 0.0):g}")
            if spec.runtime.address is None and not os.environ.get("RAY_ADDRESS"):
                raise ValueError(message)
            log(f"  warning: {message}; trials wait for the autoscaler")
        elif want > free.get(key, 0.0):
            log(f"  note: {free.get(key, 0.0):g} of {total.get(key, 0.0):g} {key} are free now (other actors hold "
                "the rest); trials start as they free up")


_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_[0-9a-f]+)_\d+_")
TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
             "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
             "config", "experiment_tag", "logdir", "should_checkpoint"}


def _quiet(*_: Any) -> None:
    return None


def trial_frame(grid, spec: SweepSpec) -> pl.DataFrame:
    """One row per trial of a Tune ResultGrid, sorted by trial index."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id")
        if trial_id is None and result.path:
            found = _TRIAL_ID.search(os.path.basename(str(result.path)))
            trial_id = found.group(1) if found else None
        error = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
        status = "ERROR" if error else ("TERMINATED" if metrics.get("done") else "INCOMPLETE")
        # Variant-generator ids end in the trial's number (abcde_00003); searchers' in a random hex tag.
        suffix = str(trial_id).rsplit("_", 1)[-1]
        row: dict[str, Any] = {"trial_id": trial_id or "?", "trial_index": int(suffix) if suffix.isdigit() else -1,
                               "status": status, "error": error, "seed": spec.seed}
        row.update({name: plain((result.config or {}).get(name)) for name in spec.space})
        row.update({k: v for k, v in metrics.items() if k not in TUNE_KEYS and k not in row})
        row["reported_at"] = metrics.get("timestamp")
        rows.append(row)
    if not rows:
        return pl.DataFrame({"trial_id": [], "trial_index": [], "status": []},
                            schema={"trial_id": pl.String, "trial_index": pl.Int64, "status": pl.String})
    frame = pl.from_dicts(rows, infer_schema_length=None)
    if (frame["trial_index"] < 0).any():  # no numbers in the ids: number the trials in id order
        frame = frame.sort("trial_id").with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("trial_index"))
    return frame.sort("trial_index")


def front_frame(trials: pl.DataFrame, spec: SweepSpec) -> tuple[pl.DataFrame, Optional[dict[str, Any]]]:
    """(pareto frame, recommended trial's row or None) over the finished trials."""
    done = trials.filter(pl.col("status") == "TERMINATED")
    metrics = [o.metric for o in spec.objectives]
    modes = [o.mode for o in spec.objectives]
    if done.height == 0:  # every trial failed: no metric columns to rank
        return done.with_columns(pl.lit(False).alias("on_front"), pl.lit(None, pl.Float64).alias("knee_score"),
                                 pl.lit(False).alias("recommended")), None
    values = done.select([pl.col(m).cast(pl.Float64) for m in metrics]).to_numpy()
    validity = done["validity"].cast(pl.Float64).to_numpy()
    front, rec = recommend(values, modes, validity, spec.validity_floor)
    scores = np.full(done.height, np.nan)
    if front.any():
        scores[front] = knee_scores(values[front], modes)
    marked = done.with_columns(pl.Series("on_front", front), pl.Series("knee_score", scores),
                               pl.Series("recommended", np.arange(done.height) == (-1 if rec is None else rec)))
    if spec.validity_floor is not None:
        marked = marked.with_columns((pl.col("validity") >= spec.validity_floor).fill_null(False).alias("meets_floor"))
    pareto = marked.filter(pl.col("on_front") | pl.col("recommended")).sort(metrics[0], descending=modes[0] == "max")
    recommended = None if rec is None else marked.row(rec, named=True)
    return pareto, recommended


def example_points(pareto: pl.DataFrame, spec: SweepSpec) -> list[tuple[str, dict[str, Any]]]:
    """The front's two ends (best on the first two objectives) and the recommended trial, labelled, deduplicated."""
    front = pareto.filter(pl.col("on_front"))
    metrics = [o.metric for o in spec.objectives][:2]
    modes = [o.mode for o in spec.objectives][:2]
    points: dict[str, list[str]] = {}
    rows: dict[str, dict[str, Any]] = {}
    if front.height:
        values = front.select([pl.col(m).cast(pl.Float64) for m in metrics]).to_numpy()
        for metric, index in zip(metrics, extremes(values, modes, np.ones(front.height, bool))):
            row = front.row(index, named=True)
            points.setdefault(row["trial_id"], []).append(f"best {metric}")
            rows[row["trial_id"]] = row
    for row in pareto.filter(pl.col("recommended")).iter_rows(named=True):
        points.setdefault(row["trial_id"], []).append("recommended")
        rows[row["trial_id"]] = row
    return [(", ".join(labels), rows[trial]) for trial, labels in points.items()]


def summary_table(trials: pl.DataFrame, pareto: Optional[pl.DataFrame], spec: SweepSpec) -> str:
    columns = ["trial_index", *spec.space, *[o.metric for o in spec.objectives]]
    if "validity" not in columns:
        columns.append("validity")
    front = set() if pareto is None else set(pareto.filter(pl.col("on_front"))["trial_id"].to_list())
    rec = set() if pareto is None else set(pareto.filter(pl.col("recommended"))["trial_id"].to_list())
    table = trials.select([c for c in columns + ["status"] if c in trials.columns]).with_columns(
        pl.Series("front", ["*" if t in front else "" for t in trials["trial_id"]]),
        pl.Series("rec", ["<=" if t in rec else "" for t in trials["trial_id"]]))
    with pl.Config(tbl_rows=200, tbl_cols=40, tbl_width_chars=220, float_precision=4, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        return str(table)


def recommendation_line(recommended: Optional[dict[str, Any]], spec: SweepSpec) -> str:
    if recommended is None:
        if spec.validity_floor is not None:
            return f"recommended: none, no trial reaches validity >= {spec.validity_floor:g}"
        return "recommended: none, no trial finished"
    config = ", ".join(f"{k}={recommended[k]!r}" for k in spec.space)
    figures = ", ".join(f"{o.metric} {recommended[o.metric]:.4g}" for o in spec.objectives)
    why = "knee of the Pareto front" + (f" of the trials with validity >= {spec.validity_floor:g}"
                                        if spec.validity_floor is not None else "")
    return f"recommended: {spec.method.name} {config} ({figures}; {why}; trial {recommended['trial_id']})"


class TrialLog(tune.Callback):
    """A Tune callback logging one line per finished trial (Tune's own tables stay off: verbose=0)."""

    def __init__(self, spec: SweepSpec, log: Callable[[str], Any] = print) -> None:
        self.knobs, self.metrics, self.log = list(spec.space), [o.metric for o in spec.objectives], log

    def __getstate__(self) -> dict[str, Any]:  # tuner.pkl keeps the callbacks; a log function may not pickle
        return {"knobs": self.knobs, "metrics": self.metrics}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, log=print)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        config = ", ".join(f"{k}={trial.config.get(k)!r}" for k in self.knobs)
        figures = ", ".join(f"{m} {result.get(m, float('nan')):.4g}" for m in self.metrics)
        self.log(f"  trial {trial.trial_id}: {config}: {figures}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.log(f"  trial {trial.trial_id} failed: {trial.config}")


def sweep(spec: SweepSpec, log: Callable[[str], Any] = print, progress: bool = True,
          callbacks: Optional[list] = None, summary: Optional[Callable[[str], Any]] = None) -> SweepResult:
    """Run (or resume) the sweep; `callbacks` are extra ray.tune.Callback objects for a fresh run. `summary`
    (default: `log`) gets the closing lines: the trial table, the recommendation and where the files are."""
    directory = sweep_dir(spec)
    storage = tune_storage(directory)
    check_writable(spec.output)
    check_claim(directory, "_sweep.json", spec, "a sweep")  # another spec's sweep: refused before training
    stages = Stages(log)
    with stages.stage("data"):
        data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
        check_dataset(data, spec.queries.split)
        query_ids = select_queries(data, spec.queries.count, spec.queries.seed, spec.queries.classes).tolist()
        log(f"  {spec.dataset.name}/{spec.queries.split}: {len(data)} samples, {len(query_ids)} queries per trial")
    with stages.stage("models"):
        # Train or fetch every model once here, so the trials only read the cache.
        cache_dir = str(default_cache_dir(spec.runtime.cache_dir).resolve())
        fid = resolve_choice(spec.metrics.fid.extractor, spec.metrics.fid.weights, data.kind == "image", log)
        threads = max(1, int(spec.resources.cpu))
        runner = TrialRunner(spec, query_ids, cache_dir, fid, threads=threads, log=log)
        bundles = list(runner.bundles.values())
        check_fleet(spec, [b.classifier for b in bundles], data, torch.as_tensor(query_ids), bundles[0].generator,
                    bundles[0].oracle, {b.classifier.model_id: b.explainer for b in bundles})  # a dry run per model
        reference = None
        if runner.options.extractor is not None:
            state = reference_state(runner.options.extractor, data.x.float(), spec.metrics.fid.reference_samples,
                                    spec.seed, log)
            n, total, outer = state.to_arrays()
            reference = {"extractor": fid.kind, "n": int(n), "total": total, "outer": outer}
            runner.fid_reference = (fid.kind, state)
            log(f"  FID reference: {state.n} real images through the {fid.kind} extractor")
    with stages.stage("tune"):
        claim_sweep(spec, directory, log)
        start_ray(spec.runtime.address, include_dashboard=spec.runtime.include_dashboard)
        check_resources(spec, log)
        context = TrialContext(spec=spec.model_dump(mode="json"), query_ids=query_ids, cache_dir=cache_dir,
                               threads=threads, fid={"kind": fid.kind, "weights": fid.weights},
                               fid_reference=reference)
        fn = tune.with_resources(tune.with_parameters(trainable, context=context),
                                 {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
        path = join(storage, "tune")
        if tune.Tuner.can_restore(path):
            log(f"  resuming the sweep at {path} (Tuner.restore; errored trials run again)")
            tuner = tune.Tuner.restore(path, fn, resume_errored=True)
        else:
            searcher, concurrency = search_alg(spec)
            tuner = tune.Tuner(
                fn, param_space=param_space(spec),
                # reuse_actors: a trial actor keeps its process and loaded models for the next trial.
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=spec.num_samples,
                                            max_concurrent_trials=concurrency, reuse_actors=True),
                run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0,
                                          callbacks=[TrialLog(spec, log if progress else _quiet),
                                                     *(callbacks or [])],
                                          failure_config=tune.FailureConfig(max_failures=spec.runtime.max_retries)))
        grid = tuner.fit()
        trials = trial_frame(grid, spec)
        write_frame(join(directory, "trials.parquet"), trials)
    finished = int(trials["status"].is_in(FINISHED).sum()) if trials.height else 0
    result = SweepResult(directory, trials, complete=finished >= spec.expected_trials())
    summary = summary or log
    if not result.complete:
        summary(f"sweep interrupted: {finished} of {spec.expected_trials()} trials finished; run the same command "
                f"again to resume it (Tuner.restore of {path})")
        result.stage_seconds = stages.seconds
        return result
    with stages.stage("pareto"):
        result.pareto, result.recommended = front_frame(trials, spec)
        write_frame(join(directory, "pareto.parquet"), result.pareto)
    if spec.examples > 0 and result.pareto.height:
        with stages.stage("examples"):
            frames = []
            for label, row in example_points(result.pareto, spec):
                config = {name: row[name] for name in spec.space}
                frame = runner.examples(config, spec.examples)
                if frame.height:
                    frames.append(frame.with_columns(pl.lit(label).alias("point"), pl.lit(row["trial_id"]).alias(
                        "trial_id"), pl.lit(json.dumps(config, sort_keys=True)).alias("config")))
            if frames:
                write_frame(join(directory, "examples.parquet"), pl.concat(frames, how="diagonal_relaxed"))
    with stages.stage("page"):
        try:
            result.page = render_sweep_page(directory)
        except Exception as err:  # trials and front are written; a page that fails loses nothing
            log(f"  sweep page: not rendered ({type(err).__name__}: {err})")
    result.stage_seconds = stages.seconds
    summary(summary_table(trials, result.pareto, spec))
    if result.errored:
        summary(f"{result.errored} trial(s) failed (see the `error` column); run the same command again to retry them")
    log(stages.report())
    summary(recommendation_line(result.recommended, spec))
    summary(f"trials: {join(directory, 'trials.parquet')}; front: {join(directory, 'pareto.parquet')}"
        + (f"; page: {result.page}" if result.page else ""))
    return result
