"""audit(spec): plan -> Ray Data actor pool of ModelHosts -> Parquet shards -> summary report."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable

import polars as pl
import torch

from engine.data.source import open_split
from engine.methods import get_method_class
from engine.metrics.fid_reference import (FidChoice, build_extractor, read_reference, reference_state, resolve_choice,
                                          write_reference)
from engine.models.loading import weights_digest
from engine.progress import Progress
from engine.report.bias import fleet_headline, write_reports
from engine.report.dashboard import render_dashboard
from engine.report.summary import audit_states, headline, write_summary
from engine.runtime.cluster import start_ray
from engine.runtime.fleet import resolve_classifier, resolve_explainer, resolve_generator, resolve_oracle
from engine.runtime.host import ModelHost, peak_rss_mib, pick_device
from engine.runtime.host_start import probe_host
from engine.runtime.plan import WorkUnit, plan_units, select_queries
from engine.runtime.scheduler import run_scheduled
from engine.spec.audit import AuditSpec
from engine.store.commit import Claim, check_unclaimed
from engine.store.frames import write_frame
from engine.store.results import result_files
from engine.store.uri import check_writable, join, write_bytes_atomic
from engine.workflows.preflight import PROBE_QUERIES, check_claim, check_fleet, check_split
from engine.workflows.resume import check_resumable, claim_output, units_to_run
from engine.workflows.stages import Stages


@dataclass
class AuditResult:
    output: str
    units_total: int
    units_skipped: int
    units_done: int
    units_failed: list[tuple[str, str]] = field(default_factory=list)
    units_retried: int = 0
    summary: pl.DataFrame | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    account: dict = field(default_factory=dict)  # reports/account.json: peak memory, model loads per host


def check_confounders(spec: AuditSpec, oracle, log: Callable[[str], None]) -> None:
    """Confounders must be attributes the oracle reads; without an oracle none can be measured."""
    names = spec.confounders()
    if not names:
        return
    if oracle is None:
        if spec.metrics.confounders:
            raise ValueError(f"metrics.confounders {names} need an `oracle` entry to read attributes")
        log(f"  confounder {names} named by the dataset, but no oracle: confounding is not measured")
        return
    unknown = [n for n in names if n not in oracle.class_names]
    if unknown:
        raise ValueError(f"metrics.confounders: {unknown} are not attributes of the oracle "
                         f"{oracle.model_id!r}, which reads {list(oracle.class_names)}")


def write_failures(out: str, failed: list[tuple[str, str]]) -> None:
    """<out>/reports/failures.parquet: this run's units that failed every retry (empty when none did)."""
    frame = pl.DataFrame({"unit_id": [u for u, _ in failed], "error": [e for _, e in failed]},
                         schema={"unit_id": pl.String, "error": pl.String})
    write_frame(join(out, "reports", "failures.parquet"), frame)


def write_account(out: str, result: AuditResult) -> None:
    """<out>/reports/account.json: this run's driver peak RSS, and per host its units, model loads, peak resident
    models and peak RSS (MiB); `model_loads` per model id."""
    result.account = {"hosts": [], "model_loads": {}, **result.account,
                      "driver_peak_rss_mib": round(peak_rss_mib(), 1), "units_done": result.units_done,
                      "units_failed": len(result.units_failed),
                      "explain_seconds": round(result.stage_seconds.get("explain", 0.0), 3)}
    write_bytes_atomic(join(out, "reports", "account.json"), json.dumps(result.account, indent=1).encode())


def write_fid_reference(spec: AuditSpec, extractor, source, log: Callable[[str], None]) -> None:
    """The real-image FrechetState of the query split (only the sampled rows are read), once per output (kept
    on resume)."""
    previous = read_reference(spec.output)
    if previous is not None and previous[0] == extractor.name:
        return
    state = reference_state(extractor, source, spec.metrics.fid.reference_samples, spec.seed, log)
    write_reference(spec.output, extractor.name, state)
    log(f"  FID reference: {state.n} real {spec.queries.split} images through {extractor.name}")


@dataclass
class ResolvedModels:
    """What the driver's models stage hands on; the models themselves are dropped once it ends."""

    digests: dict[str, str]  # weights SHA-256 per fleet id, "generator", "oracle" (the job record)
    cache_keys: dict[str, str]  # built-in models' cache keys: hosts load them by key, reading no training data
    fid: object  # the resolved FidChoice
    extractor: object = None  # the FID feature extractor until the reference is written


def resolve_models(spec: AuditSpec, source, query_ids, log: Callable[[str], None]) -> ResolvedModels:
    """Train or fetch every built-in model once (so the hosts only read the cache), load the user's files, and dry
    run each on a few queries; return what the rest of the job needs, not the models."""
    generator = None
    if spec.generator is not None:
        generator = resolve_generator(spec.generator, spec.dataset, spec.runtime.cache_dir, log=log)
    oracle = None
    if spec.oracle is not None:
        oracle = resolve_oracle(spec.oracle, spec.dataset, spec.runtime.cache_dir, log=log)
    check_confounders(spec, oracle, log)
    probe = source.take(query_ids[:PROBE_QUERIES])
    named = [(name, model) for name, model in (("generator", generator), ("oracle", oracle)) if model is not None]
    digests = {name: weights_digest(model.module) for name, model in named}
    keys = {name: model.meta["cache_key"] for name, model in named if model.meta.get("source") == "builtin"}
    explainer = spec.explainer_entry()
    # One fleet model at a time (loaded, dry-run, digested, dropped): the driver never holds the whole fleet.
    for entry in spec.fleet:
        handle = resolve_classifier(entry, spec.dataset, spec.runtime.cache_dir, log=log)
        explainers = {}
        if explainer is not None:  # Progressive Exaggeration: one explainer per classifier
            explainers[entry.id] = resolve_explainer(handle, explainer, spec.dataset, spec.runtime.cache_dir,
                                                     checkpoint_root=spec.output, log=log)
        check_fleet(spec, [handle], probe, torch.arange(len(probe)), generator, oracle, explainers)  # a dry run
        digests[entry.id] = weights_digest(handle.module)
        if handle.meta.get("source") == "builtin":
            keys[entry.id] = handle.meta["cache_key"]
        del handle, explainers
    fid = resolve_choice(spec.metrics.fid.extractor, spec.metrics.fid.weights, source.info.kind == "image", log)
    extractor = build_extractor(fid, spec.dataset.name, spec.dataset.options, spec.runtime.cache_dir,
                                pick_device(spec.runtime.device), log)
    if getattr(extractor, "cache_key", None):
        fid = FidChoice(fid.kind, fid.weights, extractor.cache_key)
    return ResolvedModels(digests, keys, fid, extractor)


def audit(spec: AuditSpec, log: Callable[[str], None] = print, progress: bool = True,
          summary: Callable[[str], None] | None = None) -> AuditResult:
    """`log` gets the stage and progress lines, `summary` (default: `log`) the closing summary: units, the
    fleet table and the dashboard's path (`--quiet` silences `log` and keeps `summary`)."""
    check_writable(spec.output)  # a missing bucket or dead endpoint fails here, not after training
    check_claim(spec.output, "_job.json", spec, "results")  # another spec's output: refused before training
    check_unclaimed(spec.output)  # another live run writing it: refused before training
    stages = Stages(log)
    with stages.stage("data"):
        # Read on demand: the labels now, the rows of the queries when needed (user files are never held whole).
        source = open_split(spec.dataset.name, spec.queries.split, **spec.dataset.options)
        query_ids = select_queries(source, spec.queries.count, spec.queries.seed, spec.queries.classes)
        check_split(source, spec.queries.split, query_ids)
        units = plan_units(spec, query_ids)
        check_resumable(spec, units)  # another cut of the queries into units: refused before training
        log(f"  {spec.dataset.name}/{spec.queries.split}: {len(source)} samples, {len(query_ids)} queries"
            + (" (read from its files as needed)" if source.streaming else ""))
    with stages.stage("models"):
        models = resolve_models(spec, source, query_ids, log)
    with stages.stage("plan"):
        claim = claim_output(spec, units, models.digests, log)  # this run's from here on: released when it ends
        try:
            if models.extractor is not None:
                write_fid_reference(spec, models.extractor, source, log)
            models.extractor = None
            todo = units_to_run(spec, units, log)
        except BaseException:
            claim.release()
            raise
        log(f"  {len(units)} units ({len(spec.fleet)} models x {len(spec.methods)} methods, batch "
            f"{spec.runtime.batch_size}); {len(units) - len(todo)} already done")
    try:
        return _run(spec, claim, units, todo, stages, models, log, progress, summary or log)
    finally:
        claim.release()


def _run(spec: AuditSpec, claim: Claim, units: list[WorkUnit], todo: list[WorkUnit], stages: Stages,
         models: "ResolvedModels", log: Callable[[str], None], progress: bool, summary: Callable[[str], None]) -> AuditResult:
    """The claimed part of an audit: the units still to run, through Ray, then the reports."""
    result = AuditResult(spec.output, len(units), len(units) - len(todo), 0)
    if todo:
        with stages.stage("explain"):
            run_units(spec, todo, models, claim.run_id, result, log, progress)
    write_failures(spec.output, result.units_failed)
    result.stage_seconds = stages.seconds
    write_account(spec.output, result)
    closing: list[str] = []  # the fleet table and the dashboard's path end the job's output
    with stages.stage("report"):
        if result_files(spec.output):
            reports = join(spec.output, "reports")
            log(f"  reading the results; writing {reports}/summary.parquet and groups.parquet")
            states = audit_states(spec.output)  # every shard read once, for all reports
            confidence, bootstrap = spec.metrics.confidence, spec.metrics.bootstrap_samples
            result.summary = write_summary(spec.output, confidence, bootstrap, states)
            log(headline(result.summary))
            log(f"  writing {reports}/bias, confounding, attributes and fleet.parquet")
            closing.append(fleet_headline(write_reports(spec.output, confidence, bootstrap, summary=result.summary,
                                                        states=states)["fleet"]))
            log(f"  rendering the dashboard under {join(spec.output, 'dashboard')}")
            try:
                closing.append(f"dashboard: {render_dashboard(spec.output)}")
            except Exception as err:  # results and reports are written; a page that fails loses nothing
                closing.append(f"dashboard: not rendered ({type(err).__name__}: {err}); "
                               f"`cfaudit report {spec.output}` retries it")
        else:
            log("  no unit produced results: no summary")
    result.stage_seconds = stages.seconds
    summary(f"units: {result.units_done} done ({result.units_retried} needed a retry), {result.units_skipped} "
            f"skipped (already written), {len(result.units_failed)} failed; results in {join(spec.output, 'results')}")
    if result.units_failed:
        summary(f"  failed units and their errors: {join(spec.output, 'reports', 'failures.parquet')}; "
                "re-run the same command to retry only those")
    write_account(spec.output, result)  # again, with the report stage in the driver's peak
    log(stages.report())
    for text in closing:
        summary(text)
    return result


def run_units(spec: AuditSpec, todo: list[WorkUnit], models: "ResolvedModels", run_id: str, result: AuditResult,
              log: Callable[[str], None], progress: bool) -> None:
    """Run the units on `runtime.num_actors` ModelHosts, each unit routed to the host holding its model
    (engine.runtime.scheduler); count what each reported in `result`, and the hosts' account."""
    log(f"  starting Ray and {spec.runtime.num_actors} model host(s)")
    start_ray(spec.runtime.address, include_dashboard=spec.runtime.include_dashboard)
    threads = max(1, int(spec.runtime.num_cpus_per_actor))
    host_kwargs = {"spec": spec.model_dump(mode="json"), "run_id": run_id, "num_threads": threads,
                   "fid": dataclasses.asdict(models.fid), "cache_keys": models.cache_keys,
                   "digests": models.digests}

    def probe() -> None:
        """A host whose constructor raises or dies every time ends the job, not Ray's endless restarts. The probe
        starts beside the hosts (it reserves no CPU, so it never delays them) and needs the same GPU share."""
        probe_host(ModelHost, host_kwargs, {"num_cpus": 0, "num_gpus": spec.runtime.num_gpus_per_actor},
                   attempts=spec.runtime.max_retries + 1, timeout_s=spec.runtime.host_start_timeout_s)

    sizes = {u.unit_id: len(u.query_ids) for u in todo}
    # A tqdm bar on a terminal, else a plain line every few seconds (logs, CI, `ray job submit`).
    bar = Progress("explain", log if progress else None, sum(sizes.values()), unit="queries", bar=True)

    def on_result(row: dict) -> None:
        attempts = int(row.get("attempts", 1))
        if row["error"]:
            result.units_failed.append((row["unit_id"], row["error"]))
            why = row["error"].splitlines()[0]
            host = why.startswith(("HostDied", "HostStartError"))  # its count is in the message
            log(f"  unit {row['unit_id']} failed" + ("" if host else f" after {attempts} attempt(s)") + f": {why}")
        else:
            result.units_done += 1
            result.units_retried += int(attempts > 1)
        bar.update(sizes.get(row["unit_id"], 0), units=f"{result.units_done}/{len(todo)}",
                   failed=len(result.units_failed))

    # Gradual Construction's reference logits are computed by the first host that loads a model: a second host
    # shares that model's units once they are in the job's store (engine.runtime.reference).
    warm_first = any("reference" in get_method_class(m.name).requires for m in spec.methods)
    account = run_scheduled(ModelHost, host_kwargs, todo, spec.runtime, on_result, log, while_starting=probe,
                            share_when_warm=warm_first)
    bar.close()
    result.account = account.as_dict()
    loads = sum(result.account["model_loads"].values())
    log(f"  model loads: {loads} for {len(result.account['model_loads'])} model(s); resident per host at most "
        f"{max((h['peak_resident'] for h in result.account['hosts']), default=0)} "
        f"(runtime.models_per_host {spec.runtime.models_per_host})")
