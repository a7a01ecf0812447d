"""The driver's half of the commit protocol (engine/store/commit.py): claim an output, refuse to resume on top of
results that another plan or other models produced, and find the units still to run."""
from __future__ import annotations

import json
from typing import Any, Callable, Optional

import numpy as np

from engine.runtime.plan import WorkUnit
from engine.spec.audit import AuditSpec
from engine.store.commit import (Claim, clear_output, new_run_id, output_state, query_hash, read_record,
                                 remove_temporaries)
from engine.store.uri import exists, join, write_bytes_atomic

JOB = "_job.json"


def plan_record(spec: AuditSpec, units: list[WorkUnit]) -> dict:
    """How the queries were cut into units: a resume must cut them the same way."""
    ids = np.concatenate([u.query_ids for u in units]) if units else np.zeros(0, np.int64)
    return {"batch_size": spec.runtime.batch_size, "units": len(units), "queries": query_hash(ids)}


def job_record(spec: AuditSpec, units: list[WorkUnit], models: dict[str, str]) -> dict:
    return {"name": spec.name, "spec_hash": spec.spec_hash(), "spec": spec.model_dump(mode="json"),
            "plan": plan_record(spec, units), "models": models}


def different_spec(directory: str, previous: dict, spec_hash: str) -> Optional[str]:
    if previous.get("spec_hash") != spec_hash:
        return (f"{directory!r} holds results of a different spec ({previous.get('name')!r}, hash "
                f"{previous.get('spec_hash')}); choose another output or set `overwrite: true`")
    return None


def resume_problem(directory: str, previous: dict, record: dict) -> Optional[str]:
    """Why the results in `directory` (its job record `previous`) cannot be continued by `record`, or None."""
    problem = different_spec(directory, previous, record["spec_hash"])
    if problem:
        return problem
    before, now = previous.get("plan"), record["plan"]
    if before is not None and before != now:
        if before.get("batch_size") != now["batch_size"]:
            return (f"{directory!r} was written with runtime.batch_size {before.get('batch_size')}, this run cuts its "
                    f"units at {now['batch_size']}: resuming would drop or repeat queries. Re-run with "
                    f"runtime.batch_size: {before.get('batch_size')}, or set `overwrite: true` to start again")
        return (f"{directory!r} was written for other queries or another cut of them (plan {before}, now {now}); "
                "set `overwrite: true` to start again")
    changed = sorted(k for k, v in (previous.get("models") or {}).items() if k in record["models"]
                     and record["models"][k] != v)
    if changed:
        return (f"{directory!r} holds results of other weights for {changed}: the model file or its cached training "
                f"changed since the output was written (digest {previous['models'][changed[0]][:12]} -> "
                f"{record['models'][changed[0]][:12]}), so its results would mix two models. Set `overwrite: true` "
                "to start again, or restore the file")
    return None


def check_resumable(spec: AuditSpec, units: list[WorkUnit], models: Optional[dict[str, str]] = None) -> None:
    """Preflight: refuse early (before training, when `models` is None) an output this run could not continue."""
    uri = join(spec.output, JOB)
    if spec.overwrite or not exists(uri):
        return
    previous = read_record(uri, "job record")
    problem = resume_problem(spec.output, previous, job_record(spec, units, models or {}))
    if problem:
        raise ValueError(problem)


def claim_output(spec: AuditSpec, units: list[WorkUnit], models: dict[str, str],
                 log: Callable[[str], Any] = print) -> Claim:
    """Claim the output exclusively for this run and record its job (spec, plan, model digests).

    An output this run cannot continue is refused, or cleared with `overwrite: true` (only while this run holds
    the claim, so never under another run's hosts). Temporaries that killed writers left are removed.
    """
    claim = Claim(spec.output, new_run_id()).acquire(log)
    try:
        uri, record = join(spec.output, JOB), job_record(spec, units, models)
        if exists(uri):
            try:
                problem = resume_problem(spec.output, read_record(uri, "job record"), record)
            except ValueError as err:
                problem = str(err)
            if problem and not spec.overwrite:
                raise ValueError(problem)
            if problem:
                clear_output(spec.output)
                log(f"  overwrite: removed the previous results at {spec.output}")
        write_bytes_atomic(uri, json.dumps(record, indent=2).encode())
        removed = remove_temporaries(spec.output)
        if removed:
            log(f"  removed {removed} temporary file(s) that an interrupted run left")
    except BaseException:
        claim.release()
        raise
    return claim


def units_to_run(spec: AuditSpec, units: list[WorkUnit], log: Callable[[str], Any] = print) -> list[WorkUnit]:
    """The planned units without a valid commit: no manifest entry, an entry that does not match its shard (size,
    SHA-256) or its unit's queries, or a shard of another spec."""
    state = output_state(spec.output, spec.spec_hash(), verify=True)
    todo, redo = [], []
    for unit in units:
        key = (unit.model_id, unit.method, unit.part)
        committed = state.committed.get(key)
        if committed is not None and committed.entry["queries"] == query_hash(unit.query_ids):
            continue
        todo.append(unit)
        if committed is not None:
            redo.append(f"{unit.unit_id}: its manifest entry is of other queries")
        elif key in state.problems:
            redo.append(f"{unit.unit_id}: {state.problems[key]}")
    for line in redo[:5]:
        log(f"  re-running {line}")
    if len(redo) > 5:
        log(f"  ... and {len(redo) - 5} more unit(s) whose commit did not hold up")
    return todo

