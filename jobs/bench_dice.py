"""`python -m jobs.bench --peer dice`: cfaudit's tabular methods beside DiCE's, on one MLP and one set of queries.

Every method goes through the same judge: its counterfactual as a record in the user's units -> the schema's
encoding (numbers scaled without checks, so nothing is repaired yet) -> `codec.project` onto a valid record ->
the MLP's argmax against the target. cfaudit's results are valid records already (projection is a no-op);
DiCE's are projected here, and what that changed is reported (`record_ok`, `immutable_changed`, ...).
DiCE's side (its data layout and calls) is jobs.dice_peer. A peer benchmark, so it lives beside the jobs and not in
the library.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from engine.data import load_dataset
from engine.data.schema import TabularSchema, result_columns
from engine.explain import build_queries
from engine.methods import make_method
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.runtime.fleet import resolve_classifier
from engine.runtime.host import pick_device
from engine.runtime.plan import select_queries
from engine.spec import AuditSpec, load_spec
from engine.types import QueryBatch
from jobs.dice_peer import DICE_METHODS, device_of, run_dice

# GC §4.4.2: tabular tau 0.5; growing_spheres: gradient-free (forward passes only), its defaults
CFAUDIT_METHODS = {"gradual_construction": {"tau": 0.5}, "wachter": {}, "growing_spheres": {}}


def tabular_spec_path() -> Path:
    return Path(str(resources.files("jobs") / "specs" / "tabular.yaml"))


@dataclass
class PeerRow:
    """One method's line of the table; times are per counterfactual (= per query, one CF each)."""

    method: str                 # "cfaudit:gradual_construction", "dice:gradient", ...
    queries: int
    s_per_cf: float             # cfaudit: median over repeats of (batched call / queries); DiCE: median per query
    s_per_cf_mean: float        # cfaudit: mean over repeats; DiCE: total time / queries
    returned: float             # share of queries with a counterfactual returned
    validity: float             # share of queries whose projected CF the MLP puts in the target class
    validity_raw: float         # same before projection (the record as returned, encoded without repair)
    record_ok: float            # share of returned CFs that were valid records already (projection a no-op)
    l0: float                   # mean features changed, over valid CFs (a category switch once)
    l1: float                   # mean L1 on the [0, 1] scale, over valid CFs
    immutable_changed: int      # returned CFs that changed an immutable feature (before projection)
    direction_violated: int     # returned CFs that moved a monotone feature the wrong way (before projection)
    ratio_vs_gc: float = float("nan")       # s_per_cf / cfaudit GC's
    ratio_vs_wachter: float = float("nan")  # s_per_cf / cfaudit wachter's
    notes: str = ""


@dataclass
class Judged:
    """Per-query outcome of the shared judge (numpy, length B)."""

    returned: np.ndarray
    valid: np.ndarray
    valid_raw: np.ndarray
    record_ok: np.ndarray
    l0: np.ndarray
    l1: np.ndarray
    immutable_changed: np.ndarray
    direction_violated: np.ndarray
    records: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the judge

def encode_records(schema: TabularSchema, records: Sequence[Optional[dict]], fallback: torch.Tensor) -> torch.Tensor:
    """Records in the user's units -> [B, D] float32 like `schema.encode`, but without range or integrality
    checks (a value outside its range or between integers stays so, for `project` to repair); an ordinal may
    be given by label or by rank. A missing record (None) takes its row of `fallback`."""
    out = fallback.detach().cpu().float().clone()
    for i, rec in enumerate(records):
        if rec is None:
            continue
        col = 0
        for f in schema.features:
            v = rec[f.name]
            if f.type == "categorical":
                out[i, col:col + f.width] = 0.0
                out[i, col + f.categories.index(str(v))] = 1.0
            else:
                if f.categories is not None and isinstance(v, str):
                    v = f.categories.index(v)
                lo, hi = f.bounds
                out[i, col] = (float(v) - lo) / (hi - lo) if hi > lo else 0.0
            col += f.width
    return out


def judge(schema: TabularSchema, handle: ClassifierHandle, x0: torch.Tensor, target: torch.Tensor,
          records: Sequence[Optional[dict]]) -> Judged:
    """x0 [B, D] queries, target [B]; records[i] the i-th counterfactual as a record (None: none returned)."""
    codec = schema.codec("cpu")
    x0 = x0.detach().cpu().float()
    target = target.detach().cpu()
    raw = encode_records(schema, records, x0)
    proj = codec.project(raw, x0)
    returned = np.array([r is not None for r in records])
    with torch.no_grad():
        valid = (handle.module(proj.to(device_of(handle))).argmax(-1).cpu() == target).numpy() & returned
        valid_raw = (handle.module(raw.to(device_of(handle))).argmax(-1).cpu() == target).numpy() & returned
    record_ok = ((proj - raw).abs().amax(1) < 1e-5).numpy() & returned
    # Immutables and directions judged on the record as returned, before projection restores them.
    ch = codec.changes(x0, codec.project(raw, raw))  # rounding only, to count a feature once
    immutable = torch.tensor([f.immutable for f in schema.features])
    immutable_changed = (ch["changed"] & immutable).any(1).numpy() & returned
    violated = np.zeros(len(records), dtype=bool)
    if len(codec.num_cols):
        d = (raw[:, codec.num_cols] - x0[:, codec.num_cols]).double()  # on [0, 1]; float32 noise is ~1e-7
        wrong = ((codec.num_dir > 0) & (d < -1e-4)) | ((codec.num_dir < 0) & (d > 1e-4))
        violated = wrong.any(1).numpy() & returned
    cols = result_columns(schema, x0, proj)
    return Judged(returned, valid, valid_raw, record_ok, cols["l0"], cols["l1"], immutable_changed, violated,
                  list(records))


def _row(method: str, judged: Judged, times: list[float], mean_time: float, notes: str = "") -> PeerRow:
    v, ret = judged.valid, judged.returned
    return PeerRow(
        method=method, queries=len(v), s_per_cf=statistics.median(times), s_per_cf_mean=mean_time,
        returned=float(ret.mean()), validity=float(v.mean()), validity_raw=float(judged.valid_raw.mean()),
        record_ok=float(judged.record_ok.sum() / max(1, ret.sum())),
        l0=float(judged.l0[v].mean()) if v.any() else float("nan"),
        l1=float(judged.l1[v].mean()) if v.any() else float("nan"),
        immutable_changed=int(judged.immutable_changed.sum()), direction_violated=int(judged.direction_violated.sum()),
        notes=notes)


# ---------------------------------------------------------------------------------------------- cfaudit

def run_cfaudit(name: str, params: dict, queries: QueryBatch, bundle: ModelBundle, repeats: int
                ) -> tuple[list[float], object]:
    """Seconds per CF of `repeats` batched calls (one call for all queries) and the last call's CFBatch."""
    method = make_method(name, params)
    method.explain(queries.select(slice(0, 2)), bundle)  # warm-up (reference statistics, allocator)
    times, cf = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        cf = method.explain(queries, bundle)
        times.append((time.perf_counter() - start) / len(queries))
    return times, cf


# ---------------------------------------------------------------------------------------------- the bench

def bench_dice(spec_path: Optional[str] = None, queries: int = 50, peers: Sequence[str] = DICE_METHODS,
               repeats: int = 3, device: str = "cpu", out: Optional[str] = "cfaudit-out",
               command: Optional[str] = None, log: Callable[[str], None] = print) -> list[PeerRow]:
    """cfaudit GC, wachter and growing_spheres (batched) beside DiCE's `peers` (per query; skipped with a note
    when dice-ml is not installed) on the spec's last fleet model and `queries` seeded test queries, targets the
    other class; writes `<out>/bench/dice.parquet` (+ .json)."""
    unknown = sorted(set(peers) - set(DICE_METHODS))
    if unknown:
        raise ValueError(f"Expected `peers` among {list(DICE_METHODS)}, got {unknown}")
    spec = load_spec(AuditSpec, spec_path or str(tabular_spec_path()))
    dev = pick_device(device)
    entry = spec.fleet[-1]
    handle = resolve_classifier(entry, spec.dataset, spec.runtime.cache_dir, dev, log=log)
    reference = load_dataset(spec.dataset.name, "train", **spec.dataset.options)
    data = load_dataset(spec.dataset.name, spec.queries.split, **spec.dataset.options)
    schema = getattr(data, "schema", None)
    if schema is None:
        raise ValueError(f"dataset {spec.dataset.name!r} has no tabular schema; the DiCE bench needs one")
    ids = select_queries(data, queries, spec.queries.seed)
    bundle = ModelBundle(classifier=handle, reference=reference, device=dev)
    batch, _ = build_queries(bundle, data.x[ids], ids, data.y[ids], "flip", spec.seed)
    log(f"bench --peer dice: model {entry.id}, {spec.dataset.name} {spec.queries.split}, {len(batch)} queries, "
        f"device {dev}, torch threads {torch.get_num_threads()}")
    rows = []
    for name, params in CFAUDIT_METHODS.items():
        params = {**next((m.params for m in spec.methods if m.name == name), {}), **params}
        times, cf = run_cfaudit(name, params, batch, bundle, repeats)
        records = schema.decode(torch.nan_to_num(cf.x_cf.cpu()))
        judged = judge(schema, handle, batch.x, batch.target, records)
        rows.append(_row(f"cfaudit:{name}", judged, times, statistics.mean(times),
                         f"batched, median of {repeats}, params {params}"))
        log(_line(rows[-1]))
    dice_config = {}
    if peers and importlib.util.find_spec("dice_ml") is None:
        log(f"  dice-ml is not installed (pip install -e '.[dice]'): skipping dice:{', dice:'.join(peers)}")
        peers = ()
    for method in peers:
        times, records, dice_config = run_dice(method, schema, handle, reference, batch, spec.seed, log=log)
        judged = judge(schema, handle, batch.x, batch.target, records)
        rows.append(_row(f"dice:{method}", judged, times, sum(times) / len(times), "per query, total_CFs=1"))
        log(_line(rows[-1]))
    by = {r.method: r for r in rows}
    for r in rows:
        r.ratio_vs_gc = r.s_per_cf / by["cfaudit:gradual_construction"].s_per_cf
        r.ratio_vs_wachter = r.s_per_cf / by["cfaudit:wachter"].s_per_cf
    log(format_table(rows))
    if out is not None:
        meta = {"command": command or " ".join([Path(sys.executable).name, "-m", "jobs.bench", *sys.argv[1:]]),
                "versions": _versions(), "spec": str(spec_path or tabular_spec_path()), "model": entry.id,
                "queries": len(batch), "query_ids": batch.query_id.tolist(), "device": str(dev),
                "torch_threads": torch.get_num_threads(), "dice": dice_config,
                "cfaudit_params": CFAUDIT_METHODS}
        path = write_table(rows, meta, out)
        log(f"wrote {path} (+ {path.with_suffix('.json').name})")
    return rows


def _line(r: PeerRow) -> str:
    return (f"  {r.method:30s} {r.s_per_cf * 1e3:10.2f} ms/cf  validity {r.validity:.2f} "
            f"(raw {r.validity_raw:.2f})  l0 {r.l0:.2f}  l1 {r.l1:.3f}  immutable changed {r.immutable_changed}")


def format_table(rows: Sequence[PeerRow]) -> str:
    head = (f"{'method':30s} {'s/cf (median)':>13s} {'s/cf (mean)':>11s} {'returned':>8s} {'valid':>6s} "
            f"{'valid raw':>9s} {'record ok':>9s} {'l0':>5s} {'l1':>6s} {'immut.':>6s} {'dir.':>4s} "
            f"{'x GC':>8s} {'x wachter':>9s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:30s} {r.s_per_cf:13.5f} {r.s_per_cf_mean:11.5f} {r.returned:8.2f} {r.validity:6.2f} "
                     f"{r.validity_raw:9.2f} {r.record_ok:9.2f} {r.l0:5.2f} {r.l1:6.3f} {r.immutable_changed:6d} "
                     f"{r.direction_violated:4d} {r.ratio_vs_gc:8.1f} {r.ratio_vs_wachter:9.1f}")
    return "\n".join(lines)


def write_table(rows: Sequence[PeerRow], meta: dict, out: str) -> Path:
    path = Path(out) / "bench" / "dice.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([asdict(r) for r in rows])
    table = table.replace_schema_metadata({b"cfaudit.bench": json.dumps(meta).encode()})
    pq.write_table(table, path)
    path.with_suffix(".json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2,
                                                    default=float))
    return path


def _versions() -> dict[str, Any]:
    out = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for dist in ("dice-ml", "numpy", "pandas", "cfaudit"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
