"""Benchmark: seconds per counterfactual, one batched call versus a per-query loop of the same code."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from engine.data import load_dataset
from engine.methods import make_method
from engine.models.handles import ModelBundle
from engine.runtime.fleet import resolve_classifier, resolve_generator, resolve_oracle
from engine.runtime.host import pick_device
from engine.runtime.plan import select_queries
from engine.spec import AuditSpec, load_spec
from engine.explain import build_queries, bundle_for


@dataclass
class BenchRow:
    method: str
    queries: int
    batched_s_per_cf: float      # median over repeats of (batched call time / queries)
    loop_s_per_cf: float         # mean single-call time over queries spread evenly through the batch
    ratio: float                 # loop / batched: how much faster batching is
    batched_validity: float
    loop_validity: float


def bench(spec_path: str, methods: list[str] | None, batch: int = 256, loop_queries: int = 32, repeats: int = 3,
          device: str = "auto", params: dict[str, dict] | None = None,
          log: Callable[[str], None] = print) -> list[BenchRow]:
    """Both timings run in this one process, side by side, on the same queries and settings."""
    spec = load_spec(AuditSpec, spec_path)
    dev = pick_device(device)
    entry = spec.fleet[-1]
    handle = resolve_classifier(entry, spec.dataset, spec.runtime.cache_dir, dev, log=log)
    reference = load_dataset(spec.dataset.name, "train", **spec.dataset.options)
    data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
    ids = select_queries(data, batch, spec.queries.seed)
    cache = spec.runtime.cache_dir
    generator = None if spec.generator is None else resolve_generator(spec.generator, spec.dataset, cache, dev, log)
    oracle = None if spec.oracle is None else resolve_oracle(spec.oracle, spec.dataset, cache, dev, log)
    full_bundle = ModelBundle(classifier=handle, generator=generator, oracle=oracle, reference=reference,
                              device=dev)
    queries, _ = build_queries(full_bundle, data.x[ids], ids, data.y[ids], spec.targets, spec.seed)
    log(f"bench: model {entry.id}, {len(queries)} queries, device {dev}, torch threads {torch.get_num_threads()}")
    spec_params = {m.name: m.params for m in spec.methods}
    rows = []
    for name in methods or list(spec_params):
        method = make_method(name, {**spec_params.get(name, {}), **(params or {}).get(name, {})})
        bundle = bundle_for(method, full_bundle)
        method.explain(queries.select(slice(0, 2)), bundle)  # warm-up (reference statistics, allocator)
        batched, ok = [], 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            cf = method.explain(queries, bundle)
            batched.append((time.perf_counter() - start) / len(queries))
            ok = cf.success.float().mean().item()
        singles, loop_ok = [], 0
        for i in torch.linspace(0, len(queries) - 1, min(loop_queries, len(queries))).long().tolist():
            start = time.perf_counter()
            cf1 = method.explain(queries.select(slice(i, i + 1)), bundle)
            singles.append(time.perf_counter() - start)
            loop_ok += int(cf1.success.item())
        # Per counterfactual, the loop costs its mean (total / n), like the batched call; a median would
        # hide the slow queries that run their whole budget.
        loop = sum(singles) / len(singles)
        row = BenchRow(name, len(queries), statistics.median(batched), loop, loop / statistics.median(batched),
                       ok, loop_ok / len(singles))
        log(f"  {name:22s} batched {row.batched_s_per_cf * 1e3:8.2f} ms/cf (validity {row.batched_validity:.2f}) | "
            f"loop {row.loop_s_per_cf * 1e3:8.2f} ms/cf (mean of {len(singles)} single calls, "
            f"validity {row.loop_validity:.2f}) | loop/batched {row.ratio:6.1f}x")
        rows.append(row)
    return rows
