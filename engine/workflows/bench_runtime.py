"""Benchmark of the Ray path: its overhead over a direct in-process run of the same units, and the driver's
peak memory as the number of queries grows.

The queries are a user's Parquet that grows with them: a generated Hugging Face-style set of 32x32 RGB PNGs
(engine/workflows/bench_inputs.py) whose `split` column puts `pool` rows (default: as many as the queries) in the
test split, so every test image is a query and the data are as large as the work. The model is a random-init,
deterministic TorchScript CNN from the same module. Each size runs in a fresh subprocess (so `ru_maxrss` is that
run's driver peak): first the audit through Ray Data (one model host with one thread), then the same work units
directly in that process, one batched `explain_unit` per unit with the same metrics, written to a scratch
directory. Both use FGSM, the cheapest method, so the figure is dominated by what the engine adds, not by the
search.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.data import open_split
from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.runtime.fleet import resolve_classifier
from engine.runtime.plan import plan_units, select_queries
from engine.spec import AuditSpec, parse_spec
from engine.store.results import shard_uri, write_shard
from engine.workflows.audit import audit
from engine.workflows.bench_inputs import build_cnn_fleet, cached_images, default_data_dir

IMAGE_SIZE = 32


def runtime_inputs(pool: int, data_dir: Optional[os.PathLike] = None,
                   log: Optional[Callable[[str], None]] = None) -> tuple[str, dict]:
    """The cached Parquet directory with `pool` test rows (and as many train rows) and the model's fleet entry."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    path = cached_images(data_dir, 2 * pool, size=IMAGE_SIZE, split_column=True, log=log)
    return path, build_cnn_fleet(data_dir, 1, size=IMAGE_SIZE, log=log)[0]


def bench_spec(out: str, queries: int, batch_size: int, data_path: str, model: dict) -> dict:
    return {"name": "bench-runtime", "output": out, "overwrite": True,
            "dataset": {"name": "parquet_images", "options": {"path": data_path, "split_column": "split"}},
            "fleet": [{**model, "id": "cnn"}], "targets": "flip", "methods": [{"name": "fgsm"}],
            "metrics": {"fid": {"extractor": "none"}}, "queries": {"count": queries, "seed": 0},
            "runtime": {"batch_size": batch_size, "num_actors": 1, "num_cpus_per_actor": 1}}


def run_one(queries: int, batch_size: int, pool: Optional[int] = None,
            data_dir: Optional[os.PathLike] = None) -> dict:
    """In this process: the Ray audit, then the same units directly. Returns the figures as a dict.
    pool: test images the queries are drawn from (default: `queries`, every test image is a query)."""
    pool = queries if pool is None else pool
    data_path, model = runtime_inputs(pool, data_dir)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        spec = parse_spec(AuditSpec, bench_spec(os.path.join(scratch, "ray"), queries, batch_size, data_path, model))
        result = audit(spec, log=lambda *_: None, progress=False)
        ray_seconds = result.stage_seconds["explain"]
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        # The direct path reads each unit's rows as a host does (decoding is part of the work, not of the overhead).
        data = open_split(spec.dataset.name, spec.queries.split, **spec.dataset.options)
        reference = data.info  # fgsm reads no training data; a host hands it the split's description too
        handle = resolve_classifier(spec.fleet[0], spec.dataset, spec.runtime.cache_dir, log=lambda *_: None)
        bundle = ModelBundle(classifier=handle, reference=reference)
        method = make_method("fgsm")
        options = MetricOptions.from_spec(spec.metrics, [])
        units = plan_units(spec, select_queries(data, queries, 0))
        start = time.perf_counter()
        for unit in units:
            index = torch.as_tensor(unit.query_ids)
            rows = data.take(index)
            table = explain_unit(method, bundle, rows.x, index, rows.y, spec.targets, spec.seed,
                                 meta={"job": "direct", "spec_hash": "-", "model_id": unit.model_id,
                                       "method": unit.method, "config_hash": "-", "unit_id": unit.unit_id},
                                 metrics=options)
            write_shard(shard_uri(os.path.join(scratch, "direct"), unit.model_id, unit.method, unit.part), table)
        direct_seconds = time.perf_counter() - start
    return {"queries": queries, "pool": pool, "units": len(units), "batch_size": batch_size, "ray_seconds": ray_seconds,
            "ray_run_seconds": result.account.get("host_run_seconds", ray_seconds),
            "direct_seconds": direct_seconds, "overhead_ratio": ray_seconds / direct_seconds,
            "driver_peak_rss_mb": rss_mb, "failed": len(result.units_failed)}


def runtime_table(rows: list[dict]) -> list[str]:
    """Ray s: the explain stage (Ray and the host start included); run s: the hosts' run, first host ready to last
    result; overhead: Ray s / direct s, and (run) run s / direct s."""
    lines = [f"{'queries':>8} {'units':>6} {'Ray s':>8} {'run s':>8} {'direct s':>9} {'overhead':>8} {'(run)':>7} "
             f"{'driver MiB':>10} {'failed':>6}"]
    for r in rows:
        run = r.get("ray_run_seconds", r["ray_seconds"])
        lines.append(f"{r['queries']:>8} {r['units']:>6} {r['ray_seconds']:>8.1f} {run:>8.1f} "
                     f"{r['direct_seconds']:>9.1f} {'x' + format(r['overhead_ratio'], '.2f'):>8} "
                     f"{'x' + format(run / r['direct_seconds'], '.2f'):>7} {r['driver_peak_rss_mb']:>10.0f} "
                     f"{r['failed']:>6}")
    return lines


def bench_runtime(sizes: list[int], batch_size: int = 100, data_dir: Optional[os.PathLike] = None,
                  command: str = "", log: Callable[[str], None] = print) -> list[dict]:
    """One subprocess per size, each on a pool of as many test images as queries; prints a table of Ray vs
    direct seconds and the driver's peak RSS."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if command:
        log(f"$ {command}")
    rows = []
    for queries in sizes:
        runtime_inputs(queries, data_dir, log)  # made here, so the subprocess's peak is the audit's alone
        log(f"  {queries} queries: running (a fresh process: the Ray audit, then the same units directly)")
        proc = subprocess.run([sys.executable, "-m", "jobs.bench", "--runtime-one", str(queries),
                               "--batch", str(batch_size), "--pool", str(queries), "--data-dir", str(data_dir)],
                              capture_output=True, text=True,
                              env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        if proc.returncode != 0:
            raise RuntimeError(f"runtime bench at {queries} queries failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        log(f"{r['queries']:>7} of {r['pool']} test images ({r['units']} units of {r['batch_size']}): "
            f"Ray {r['ray_seconds']:.1f}s, direct {r['direct_seconds']:.1f}s, overhead x{r['overhead_ratio']:.2f}, "
            f"driver peak RSS {r['driver_peak_rss_mb']:.0f} MiB, failed units {r['failed']}")
    if command:
        log(f"$ {command}")
    for line in runtime_table(rows):
        log(line)
    return rows
