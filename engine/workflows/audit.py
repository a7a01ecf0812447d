"""audit(spec): plan -> Ray Data actor pool of ModelHosts -> Parquet shards -> summary report."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import polars as pl

from engine.data import load_dataset
from engine.models.fleet import resolve_classifier, resolve_generator, resolve_oracle
from engine.runtime.plan import plan_units, select_queries, unit_row
from engine.spec.audit import AuditSpec
from engine.store.results import finished_units
from engine.store.uri import exists, filesystem, join, read_bytes, write_bytes_atomic
from engine.workflows.stages import Stages


@dataclass
class AuditResult:
    output: str
    units_total: int
    units_skipped: int
    units_done: int
    units_failed: list[tuple[str, str]] = field(default_factory=list)
    summary: pl.DataFrame | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


def claim_output(spec: AuditSpec) -> None:
    """Refuse to mix results of different specs in one output; `overwrite: true` clears it."""
    job_uri = join(spec.output, "_job.json")
    record = {"name": spec.name, "spec_hash": spec.spec_hash(), "spec": spec.model_dump(mode="json")}
    if exists(job_uri):
        previous = json.loads(read_bytes(job_uri))
        if previous.get("spec_hash") != record["spec_hash"]:
            if not spec.overwrite:
                raise ValueError(f"output {spec.output!r} holds results of a different spec "
                                 f"({previous.get('name')!r}, hash {previous.get('spec_hash')}); "
                                 "choose another output or set `overwrite: true`")
            fs, path = filesystem(spec.output)
            fs.rm(path, recursive=True)
    write_bytes_atomic(job_uri, json.dumps(record, indent=2).encode())


def audit(spec: AuditSpec, log: Callable[[str], None] = print, progress: bool = True) -> AuditResult:
    import ray
    import ray.data
    from tqdm import tqdm

    from engine.report.summary import write_summary
    from engine.runtime.cluster import start_ray
    from engine.runtime.host import ModelHost

    stages = Stages(log)
    with stages.stage("data"):
        queries_data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
        query_ids = select_queries(queries_data, spec.queries.count, spec.queries.seed, spec.queries.classes)
        log(f"  {spec.dataset.name}/{spec.queries.split}: {len(queries_data)} samples, {len(query_ids)} queries")
    with stages.stage("models"):
        # Train or fetch every built-in model once here, so the hosts only read the cache.
        for entry in spec.fleet:
            resolve_classifier(entry, spec.dataset, spec.runtime.cache_dir, log=log)
        if spec.generator is not None:
            resolve_generator(spec.generator, spec.dataset, spec.runtime.cache_dir, log=log)
        if spec.oracle is not None:
            resolve_oracle(spec.oracle, spec.dataset, spec.runtime.cache_dir, log=log)
    with stages.stage("plan"):
        claim_output(spec)
        units = plan_units(spec, query_ids)
        done = finished_units(spec.output)
        todo = [u for u in units if (u.model_id, u.method, u.part) not in done]
        log(f"  {len(units)} units ({len(spec.fleet)} models x {len(spec.methods)} methods x "
            f"{len(query_ids)} queries, batch {spec.runtime.batch_size}); {len(units) - len(todo)} already done")
    result = AuditResult(spec.output, len(units), len(units) - len(todo), 0)
    if todo:
        with stages.stage("explain"):
            start_ray(spec.runtime.address, include_dashboard=spec.runtime.include_dashboard)
            ray.data.DataContext.get_current().enable_progress_bars = False  # the driver's bar counts units
            rows = [unit_row(u, queries_data) for u in todo]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            threads = max(1, int(spec.runtime.num_cpus_per_actor))
            out = ds.map_batches(
                ModelHost, batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=spec.runtime.num_actors),
                num_cpus=spec.runtime.num_cpus_per_actor, num_gpus=spec.runtime.num_gpus_per_actor or None,
                fn_constructor_kwargs={"spec": spec.model_dump(mode="json"), "num_threads": threads})
            bar = tqdm(total=len(todo), desc="units", unit="unit", disable=not progress)
            for row in out.iter_rows():
                if row["error"]:
                    result.units_failed.append((row["unit_id"], row["error"]))
                    log(f"  unit {row['unit_id']} failed: {row['error'].splitlines()[0]}")
                else:
                    result.units_done += 1
                bar.update(1)
            bar.close()
    with stages.stage("report"):
        result.summary = write_summary(spec.output)
        with pl.Config(tbl_rows=50, tbl_cols=12, tbl_width_chars=140, float_precision=3):
            log(str(result.summary))
    result.stage_seconds = stages.seconds
    log(f"units: {result.units_done} done, {result.units_skipped} skipped (already written), "
        f"{len(result.units_failed)} failed; results in {join(spec.output, 'results')}")
    log(stages.report())
    return result
