"""Benchmark of the Ray path: its overhead over a direct in-process run of the same units, and the driver's
peak memory as the number of queries grows.

Each size runs in a fresh subprocess (so `ru_maxrss` is that run's driver peak): first the audit through
Ray Data (one model host with one thread), then the same work units directly in that process, one
batched `explain_unit` per unit with the same metrics, written to a scratch directory. Both use FGSM, the
cheapest method, so the figure is dominated by what the engine adds, not by the search.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

SPEC_TEMPLATE = {
    "name": "bench-runtime",
    "dataset": {"name": "shapes", "options": {"size": 32, "n_train": 4000, "seed": 0}},
    "fleet": [{"id": "cnn-bias1.0", "train": {"arch": "cnn", "dataset_options": {"bias": 1.0}, "epochs": 3}}],
    "targets": "flip",
    "methods": [{"name": "fgsm"}],
    "metrics": {"fid": {"extractor": "none"}},
}


def bench_spec(out: str, queries: int, batch_size: int, pool: int) -> dict:
    """`pool` test images to draw the queries from: the same for every size, so memory compares fairly."""
    spec = json.loads(json.dumps(SPEC_TEMPLATE))
    spec["dataset"]["options"]["n_test"] = max(pool, queries)
    spec.update(output=out, overwrite=True, queries={"count": queries, "seed": 0},
                runtime={"batch_size": batch_size, "num_actors": 1, "num_cpus_per_actor": 1})
    return spec


def run_one(queries: int, batch_size: int, pool: int) -> dict:
    """In this process: the Ray audit, then the same units directly. Returns the figures as a dict."""
    from engine.data import load_dataset
    from engine.explain import explain_unit
    from engine.methods import make_method
    from engine.metrics.per_query import MetricOptions
    from engine.models.fleet import resolve_classifier
    from engine.models.handles import ModelBundle
    from engine.runtime.plan import plan_units, select_queries
    from engine.spec import AuditSpec, parse_spec
    from engine.store.results import shard_uri, write_shard
    from engine.workflows.audit import audit

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        spec = parse_spec(AuditSpec, bench_spec(os.path.join(scratch, "ray"), queries, batch_size, pool))
        result = audit(spec, log=lambda *_: None, progress=False)
        ray_seconds = result.stage_seconds["explain"]
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
        reference = load_dataset(spec.dataset.name, "train", **spec.dataset.options)
        handle = resolve_classifier(spec.fleet[0], spec.dataset, spec.runtime.cache_dir, log=lambda *_: None)
        bundle = ModelBundle(classifier=handle, reference=reference)
        method = make_method("fgsm")
        options = MetricOptions.from_spec(spec.metrics, [])
        units = plan_units(spec, select_queries(data, queries, 0))
        start = time.perf_counter()
        for unit in units:
            index = torch.as_tensor(unit.query_ids)
            table = explain_unit(method, bundle, data.x[index], index, data.y[index], spec.targets, spec.seed,
                                 meta={"job": "direct", "spec_hash": "-", "model_id": unit.model_id,
                                       "method": unit.method, "config_hash": "-", "unit_id": unit.unit_id},
                                 metrics=options)
            write_shard(shard_uri(os.path.join(scratch, "direct"), unit.model_id, unit.method, unit.part), table)
        direct_seconds = time.perf_counter() - start
    return {"queries": queries, "pool": pool, "units": len(units), "batch_size": batch_size, "ray_seconds": ray_seconds,
            "direct_seconds": direct_seconds, "overhead_ratio": ray_seconds / direct_seconds,
            "driver_peak_rss_mb": rss_mb, "failed": len(result.units_failed)}


def bench_runtime(sizes: list[int], batch_size: int = 100, log: Callable[[str], None] = print) -> list[dict]:
    """One subprocess per size; prints a table of Ray vs direct seconds and the driver's peak RSS."""
    rows, pool = [], max(sizes)
    for queries in sizes:
        proc = subprocess.run([sys.executable, "-m", "jobs.bench", "--runtime-one", str(queries),
                               "--batch", str(batch_size), "--pool", str(pool)], capture_output=True, text=True,
                              env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        if proc.returncode != 0:
            raise RuntimeError(f"runtime bench at {queries} queries failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        log(f"{r['queries']:>7} of {r['pool']} test images ({r['units']} units of {r['batch_size']}): Ray {r['ray_seconds']:.1f}s, "
            f"direct {r['direct_seconds']:.1f}s, overhead x{r['overhead_ratio']:.2f}, "
            f"driver peak RSS {r['driver_peak_rss_mb']:.0f} MiB, failed units {r['failed']}")
    return rows
