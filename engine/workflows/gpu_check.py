"""The GPU check (`python -m jobs.gpu_check`): Gradual Construction and Wachter counterfactuals per minute on
28×28 images with the built-in CNN, on whatever device is present.

Two parts, each on the same model, queries and method settings: directly in this process (one `explain_unit`
per batch, as a model host runs a work unit; peak GPU memory per run), then through the audit (`audit(spec)`,
Ray Data and its model hosts) with k hosts sharing the device (`num_gpus_per_actor = 1/k`), to find how many
hosts one GPU takes. On a CPU the same code runs (hosts get one CPU each, no GPU) and memory reads "n/a".
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from engine.data import load_dataset
from engine.explain import explain_unit
from engine.methods import config_hash, make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ModelBundle
from engine.runtime.cluster import start_ray
from engine.runtime.fleet import resolve_classifier
from engine.runtime.host import pick_device
from engine.runtime.plan import select_queries
from engine.spec import AuditSpec, parse_spec
from engine.workflows.audit import audit

METHODS = ("gradual_construction", "wachter")
DATASET = {"name": "digits", "options": {"size": 28}}  # scikit-learn's shipped digits at 28×28: nothing to download
MODEL = {"id": "cnn-digits28", "train": {"arch": "cnn", "epochs": 3}}  # the zoo's CNN; ~5 s to train on 1 CPU thread
TARGETS = "second"  # ten classes: one query, one row
# The warm-up call (CUDA context, kernels, allocator) runs a few iterations whatever the timed params are.
WARMUP = {"gradual_construction": {"sigma": 2, "max_features": 1}, "wachter": {"max_iter": 2}}
HOSTS = {"cuda": (1, 2, 4), "cpu": (1, 2)}  # hosts sharing the device, by device type
NO_HOST_PEAK = "n/a (per-host peak in the direct run above)"  # the audit returns no per-host memory


@dataclass(frozen=True)
class CheckConfig:
    device: str = "auto"                    # "auto": cuda when available, else cpu
    params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> params; absent: paper defaults
    params_label: str = "paper defaults"    # where `params` came from, for the printout
    batches: tuple[int, ...] = (64, 256)    # queries per direct batched call
    hosts: Optional[tuple[int, ...]] = None  # hosts sharing the device; None: HOSTS of the device; (): no audit
    audit_queries: int = 256                # queries per method through the audit
    audit_batch: int = 64                   # queries per work unit (runtime.batch_size)
    budget_s: float = 300.0                 # wall-clock guide: a run estimated past what is left is skipped
    cache_dir: Optional[str] = None         # model cache; None: $CFAUDIT_CACHE, else ~/.cache/cfaudit/models

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("batches", "hosts"):
            values = getattr(self, name) or ()
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}: expected integers >= 1, got {list(values)}")
        if not self.batches:
            raise ValueError("batches: expected at least one batch size, got none")
        for name in ("audit_queries", "audit_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s: expected seconds > 0, got {self.budget_s}")
        unknown = sorted(set(self.params) - set(METHODS))
        if unknown:
            raise ValueError(f"params: expected methods among {list(METHODS)}, got {unknown}")


class Budget:
    """The check's wall clock. A run is never interrupted; one whose estimate exceeds what is left is skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def skip_reason(self, estimate: Optional[float]) -> Optional[str]:
        left = self.seconds - self.elapsed()
        if left <= 0:
            return f"skipped: the {self.seconds:.0f}s budget is spent"
        if estimate is not None and estimate > left:
            return f"skipped: needs ~{estimate:.0f}s, {left:.0f}s of the budget left"
        return None


def device_info(device: torch.device) -> dict[str, Any]:
    """Versions and the device: name and total memory for a GPU."""
    info = {"device": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device_name": "cpu", "gpu_total_mib": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, gpu_total_mib=props.total_memory / 2**20)
    return info


def query_split(count: int) -> str:
    """The test split when it holds `count` queries, else the (larger) train split."""
    for split in ("test", "train"):
        if count <= len(load_dataset(DATASET["name"], split, **DATASET["options"])):
            return split
    raise ValueError(f"{DATASET['name']} 28x28 holds at most "
                     f"{len(load_dataset(DATASET['name'], 'train', **DATASET['options']))} queries, asked for {count}")


def check_spec(config: CheckConfig, device: str, output: str, hosts: int, split: str) -> AuditSpec:
    """The audit job: the built-in CNN on 28×28 digits, both methods, `hosts` hosts sharing the device."""
    return parse_spec(AuditSpec, {
        "name": "gpu-check", "output": output, "overwrite": True, "dataset": DATASET, "fleet": [MODEL],
        "targets": TARGETS, "queries": {"split": split, "count": config.audit_queries, "seed": 0},
        "methods": [{"name": m, "params": config.params.get(m, {})} for m in METHODS],
        "metrics": {"fid": {"extractor": "none"}},
        "runtime": {"batch_size": config.audit_batch, "num_actors": hosts, "num_cpus_per_actor": 1,
                    "num_gpus_per_actor": 1 / hosts if device == "cuda" else 0, "device": device,
                    "cache_dir": config.cache_dir}}, source="gpu check")


def timed(run: Callable[[], Any], device: torch.device) -> tuple[Any, float, Optional[float]]:
    """run() -> (its result, wall seconds, peak GPU MiB allocated during it, None on a CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return out, seconds, torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None


def direct_rows(config: CheckConfig, device: torch.device, budget: Budget,
                log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per method and batch size: one `explain_unit` (method, per-query metrics, Arrow rows) on `device`."""
    split = query_split(max(config.batches))
    spec = check_spec(config, device.type, "memory://gpu-check", 1, split)
    handle = resolve_classifier(spec.fleet[0], spec.dataset, spec.runtime.cache_dir, device, log=log)
    bundle = ModelBundle(classifier=handle, reference=load_dataset(DATASET["name"], "train", **DATASET["options"]),
                         device=device)
    data = load_dataset(DATASET["name"], split, **DATASET["options"])
    ids = select_queries(data, max(config.batches), seed=0)
    options = MetricOptions.from_spec(spec.metrics, spec.confounders())

    def unit(method, n: int):
        index = ids[:n]
        meta = {"job": spec.name, "spec_hash": "-", "model_id": handle.model_id, "method": method.name,
                "config_hash": config_hash(method.name, method.config), "unit_id": f"direct-{n}"}
        return explain_unit(method, bundle, data.x[index], index, data.y[index], TARGETS, spec.seed, meta, options)

    rows = []
    for name in METHODS:
        method = make_method(name, config.params.get(name, {}))
        unit(make_method(name, {**config.params.get(name, {}), **WARMUP[name]}), 2)
        last = None  # (queries, seconds) of the previous batch: a larger one costs at most proportionally more
        for n in sorted(config.batches):
            row = {"path": "direct", "method": name, "hosts": None, "queries": n}
            skipped = budget.skip_reason(None if last is None else last[1] * n / last[0])
            if skipped:
                log(f"  direct {name}, {n} queries: {skipped}")
                rows.append({**row, "note": skipped})
                continue
            table, seconds, peak = timed(lambda: unit(method, n), device)
            method_s = float(sum(table.column("seconds").to_pylist()))  # each row holds its share of explain()
            success = table.column("success").to_pylist()
            rows.append({**row, "seconds": seconds, "cf_per_min": 60 * n / seconds,
                         "method_cf_per_min": 60 * n / max(method_s, 1e-9), "validity": sum(success) / len(success),
                         "valid": int(sum(success)), "peak_gpu_mib": peak, "note": None})
            last = (n, seconds)
            log(f"  direct {name}, {n} queries: {seconds:.2f}s, {rows[-1]['cf_per_min']:.0f} cf/min, "
                f"validity {rows[-1]['validity']:.2f}, peak GPU memory {mib(peak)}")
    return rows


def host_rows(config: CheckConfig, device: torch.device, hosts: tuple[int, ...], budget: Budget,
              direct: list[dict[str, Any]], log: Callable[[str], None],
              audit_log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per k: the audit of both methods with k hosts sharing the device; cf/min over its explain stage, which
    includes starting the hosts (each loads the model and, on a GPU, its CUDA context) but not Ray itself."""
    split = query_split(config.audit_queries)
    total = config.audit_queries * len(METHODS)
    # First estimate: one host at the direct rate of the batch nearest a work unit, plus 30 s to start.
    rates = [nearest_rate(direct, m, config.audit_batch) for m in METHODS]
    estimate = None if None in rates else sum(60 * config.audit_queries / rate for rate in rates) + 30
    rows = []
    if hosts and budget.skip_reason(estimate) is None:
        start_ray()  # before the first audit, so its explain stage does not count Ray's own start
    for k in hosts:
        row = {"path": "audit", "method": "+".join(METHODS), "hosts": k, "queries": total,
               "gpus_per_host": 1 / k if device.type == "cuda" else 0}
        skipped = budget.skip_reason(estimate)
        if skipped:
            log(f"  audit, {k} host(s): {skipped}")
            rows.append({**row, "note": skipped})
            continue
        log(f"  audit, {k} host(s) ({row['gpus_per_host']:g} GPU each), {total} queries in units of "
            f"{config.audit_batch}: running")
        with tempfile.TemporaryDirectory(prefix="cfaudit-gpu-check-") as out:
            start = time.perf_counter()
            result = audit(check_spec(config, device.type, out, k, split), log=audit_log, progress=False)
            wall = time.perf_counter() - start
        summary = result.summary  # per model and method: queries, validity
        if summary is not None and "queries" in summary.columns:
            done = int(summary["queries"].sum())
            valid = float((summary["validity"].fill_null(0.0) * summary["queries"]).sum())
        else:  # no summary: each unit done held a full batch of queries
            done, valid = min(result.units_done * config.audit_batch, total), 0.0
        seconds = result.stage_seconds.get("explain", 0.0)
        rows.append({**row, "seconds": seconds, "wall_s": wall, "cf_per_min": 60 * done / seconds if seconds else 0.0,
                     "validity": valid / done if done else 0.0, "done": done, "units_done": result.units_done,
                     "units_failed": len(result.units_failed),
                     "peak_gpu_mib": NO_HOST_PEAK if device.type == "cuda" else None, "note": None})
        estimate = wall  # the next k does the same work
        log(f"  audit, {k} host(s): {done} counterfactuals in {seconds:.1f}s of explain stage "
            f"({wall:.1f}s in all), {rows[-1]['cf_per_min']:.0f} cf/min, validity {rows[-1]['validity']:.2f}, "
            f"{len(result.units_failed)} unit(s) failed")
    return rows


def nearest_rate(direct: list[dict[str, Any]], method: str, batch: int) -> Optional[float]:
    """The direct cf/min of `method` at the batch size nearest `batch` (None when none ran)."""
    ran = [r for r in direct if r["method"] == method and "cf_per_min" in r]
    return min(ran, key=lambda r: abs(r["queries"] - batch))["cf_per_min"] if ran else None


def best_hosts(rows: list[dict[str, Any]]) -> Optional[int]:
    """The host count with the highest audit rate among the runs where no unit failed."""
    ran = [r for r in rows if r.get("cf_per_min") and not r.get("units_failed")]
    return max(ran, key=lambda r: r["cf_per_min"])["hosts"] if ran else None


def gpu_check(config: CheckConfig, log: Callable[[str], None] = print,
              audit_log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Run the check; returns the report (JSON-ready). `audit_log`: the audits' own lines (default: none)."""
    budget = Budget(config.budget_s)
    device = pick_device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but torch finds no CUDA device (torch.cuda.is_available() "
                         "is False); use 'auto' or 'cpu'")
    info = device_info(device)
    hosts = HOSTS[device.type] if config.hosts is None else config.hosts
    log(f"gpu check: device {device.type} ({describe_device(info)}); torch {info['torch']}, CUDA build {info['cuda']}, "
        f"cuDNN {info['cudnn']}; {info['cpu_count']} CPU cores, torch threads {info['torch_threads']}")
    log(f"  {DATASET['name']} 28x28, built-in CNN {MODEL['id']}, targets {TARGETS}; params: {config.params_label}: "
        + "; ".join(f"{m} {config.params.get(m) or '{} (paper defaults)'}" for m in METHODS)
        + f"; budget {config.budget_s:.0f}s")
    direct = direct_rows(config, device, budget, log)
    audits = host_rows(config, device, tuple(hosts), budget, direct, log, audit_log or (lambda *_: None))
    return {**info, "dataset": {**DATASET, "image": "1x28x28"}, "model": MODEL, "targets": TARGETS,
            "params": {m: config.params.get(m, {}) for m in METHODS}, "params_label": config.params_label,
            "budget_s": config.budget_s, "wall_s": budget.elapsed(), "direct": direct, "hosts": audits,
            "best_hosts": best_hosts(audits)}


def describe_device(info: dict[str, Any]) -> str:
    if info["device"] == "cuda":
        return f"{info['device_name']}, {info['gpu_total_mib'] / 1024:.1f} GiB"
    return "no CUDA device" if not info["cuda_available"] else "CUDA present, not used"


def mib(value: Any) -> str:
    return "n/a" if value is None else value if isinstance(value, str) else f"{value:.0f} MiB"


def format_table(report: dict[str, Any]) -> str:
    """The closing table: one line per direct run and per host count, then the best host count."""
    head = (f"{'path':6}  {'method':33}  {'hosts':>5}  {'queries':>7}  {'seconds':>8}  {'cf/min':>9}  "
            f"{'method cf/min':>13}  {'validity':>8}  peak GPU memory")
    lines = [f"gpu check on {report['device']} ({describe_device(report)}), torch {report['torch']}, "
             f"CUDA build {report['cuda']}; params: {report['params_label']}", head]
    for r in report["direct"] + report["hosts"]:
        start = f"{r['path']:6}  {r['method']:33}  {r['hosts'] or '-':>5}  {r['queries']:>7}  "
        if r.get("note"):
            lines.append(start + r["note"])
            continue
        method_rate = f"{r['method_cf_per_min']:.0f}" if "method_cf_per_min" in r else "-"
        lines.append(start + f"{r['seconds']:8.2f}  {r['cf_per_min']:9.0f}  {method_rate:>13}  "
                             f"{r['validity']:8.2f}  {mib(r['peak_gpu_mib'])}")
    best = report["best_hosts"]
    if best is not None:
        rate = next(r["cf_per_min"] for r in report["hosts"] if r["hosts"] == best)
        lines.append(f"best hosts per {'GPU' if report['device'] == 'cuda' else 'device'}: {best} "
                     f"({rate:.0f} cf/min through the audit; its explain stage includes the hosts' start-up)")
    lines.append(f"wall time {report['wall_s']:.0f}s of a {report['budget_s']:.0f}s budget")
    return "\n".join(lines)
