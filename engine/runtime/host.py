"""ModelHost: one Ray actor that keeps models resident and runs work units on them.

A host holds the domain's generator and oracle, the reference logits of its models (engine.runtime.reference:
computed once per model for the whole job, from a bounded sample of the training split), and at most
`runtime.models_per_host` fleet models (least recently used evicted); the driver's scheduler routes each unit
to the host already holding its model (engine.runtime.scheduler). A unit arrives as query ids; the host reads
those rows from the dataset's files (engine.data.source), so no process holds a whole split. Each unit's rows
are written as one atomic Parquet shard, and a small summary row goes back to the driver.
"""
from __future__ import annotations

import gc
import os
import resource
import time
import traceback
from collections import OrderedDict
from typing import Any, Optional

import numpy as np
import torch

from engine.data.source import open_split
from engine.explain import explain_unit
from engine.metrics.fid_reference import FidChoice, build_extractor
from engine.metrics.per_query import MetricOptions
from engine.methods import config_hash, make_method
from engine.models.handles import ModelBundle
from engine.models.loading import weights_digest
from engine.runtime.fleet import resolve_classifier, resolve_explainer, resolve_generator, resolve_oracle
from engine.runtime.reference import SharedReference
from engine.runtime.telemetry import Telemetry
from engine.spec.audit import AuditSpec
from engine.store.commit import ClaimError
from engine.store.results import write_unit

# Errors a re-run of the same unit on the same host cannot change: reported at once, not retried.
DETERMINISTIC = (ValueError, TypeError, IndexError, KeyError, AttributeError, AssertionError, ZeroDivisionError,
                 NotImplementedError, ClaimError)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ModelHost:
    def __init__(self, spec: dict[str, Any], run_id: str, num_threads: int = 1,
                 fid: Optional[dict[str, Any]] = None, cache_keys: Optional[dict[str, str]] = None,
                 digests: Optional[dict[str, str]] = None) -> None:
        """run_id: the run that holds the output's claim (checked before every write); fid: the driver's resolved
        FidChoice as a dict ({'kind': 'inception'|'domain'|None, 'weights': ...}); cache_keys: the driver's cache
        keys of the built-in models (fleet id, "generator", "oracle"), loaded by key without their training data;
        digests: the fleet models' weights digests (keys of the shared reference logits; computed here if absent)."""
        torch.set_num_threads(max(1, num_threads))
        self.run_id = run_id
        self.spec = AuditSpec.model_validate(spec)
        self.device = pick_device(self.spec.runtime.device)
        dataset = self.spec.dataset
        self.queries = open_split(dataset.name, self.spec.queries.split, **dataset.options)
        self.input_shape = self.queries.info.input_shape
        self.methods = {m.name: make_method(m.name, m.params) for m in self.spec.methods}
        # Methods get the split's description (value range, tabular schema); Gradual Construction also its models'
        # reference logits, read from the job's store or computed once from a bounded sample of the train split.
        self.reference = self.queries.info
        self.shared_reference = None
        if any("reference" in method.requires for method in self.methods.values()):
            self.shared_reference = SharedReference(dataset.name, dataset.options, self.spec.runtime.reference_samples,
                                                    self.spec.seed, self.spec.output, self.device)
        self.digests = dict(digests or {})
        self.entries = {m.id: m for m in self.spec.fleet}
        self.cache_keys = dict(cache_keys or {})
        self.bundles: "OrderedDict[str, ModelBundle]" = OrderedDict()  # least recently used first
        self.budget = self.spec.runtime.models_per_host
        self.loaded: list[str] = []  # models loaded since the last `run` reported them
        self.peak_resident = 0
        self.spec_hash = self.spec.spec_hash()
        quiet, cache = (lambda *_: None), self.spec.runtime.cache_dir
        # The generator and the oracle are the domain's, shared by every model this actor hosts.
        self.generator = None if self.spec.generator is None else resolve_generator(
            self.spec.generator, dataset, cache, self.device, log=quiet, cache_key=self.cache_keys.get("generator"))
        self.oracle = None if self.spec.oracle is None else resolve_oracle(
            self.spec.oracle, dataset, cache, self.device, log=quiet, cache_key=self.cache_keys.get("oracle"))
        extractor = build_extractor(FidChoice(**(fid or {"kind": None})), dataset.name,
                                    dataset.options, cache, self.device, log=quiet)
        self.metrics = MetricOptions.from_spec(self.spec.metrics, self.spec.confounders(), extractor)
        self.telemetry = Telemetry()

    def ready(self) -> int:
        """The scheduler's start (and restart) check: returns once the constructor has run."""
        return os.getpid()

    def bundle(self, model_id: str) -> ModelBundle:
        """The model's bundle, loaded when not resident (evicting the least recently used past the budget)."""
        if model_id in self.bundles:
            self.bundles.move_to_end(model_id)
            return self.bundles[model_id]
        while len(self.bundles) >= self.budget:
            self.bundles.popitem(last=False)
            gc.collect()  # a module's tensors go now, not at the next collection
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        handle = resolve_classifier(self.entries[model_id], self.spec.dataset, self.spec.runtime.cache_dir,
                                    self.device, log=lambda *_: None, cache_key=self.cache_keys.get(model_id))
        entry = self.spec.explainer_entry()  # set when a method needs Progressive Exaggeration's explainer
        explainer = None if entry is None else resolve_explainer(
            handle, entry, self.spec.dataset, self.spec.runtime.cache_dir, self.device,
            checkpoint_root=self.spec.output, log=lambda *_: None)
        logits = None
        if self.shared_reference is not None:
            digest = self.digests.get(model_id) or weights_digest(handle.module)
            logits = self.shared_reference.logits(handle, digest)
        self.bundles[model_id] = ModelBundle(classifier=handle, generator=self.generator, oracle=self.oracle,
                                             reference=self.reference, device=self.device, explainer=explainer,
                                             reference_logits=logits)
        self.loaded.append(model_id)
        self.peak_resident = max(self.peak_resident, len(self.bundles))
        return self.bundles[model_id]

    def run_unit(self, row: dict[str, Any]) -> dict[str, Any]:
        """Explain one unit and write its shard. `row` holds its ids (`query_ids` as int64 bytes); the query
        rows are read from the dataset unless the row carries them (`x` float32 and `labels` int64 bytes)."""
        start = time.perf_counter()
        model_id, method_name, part = str(row["model_id"]), str(row["method"]), int(row["part"])
        query_ids = np.frombuffer(row["query_ids"], dtype=np.int64)
        if "x" in row:
            labels = torch.from_numpy(np.frombuffer(row["labels"], dtype=np.int64).copy())
            x = torch.from_numpy(np.frombuffer(row["x"], dtype=np.float32).reshape(
                len(query_ids), *self.input_shape).copy())
        else:
            rows = self.queries.take(query_ids)
            x, labels = rows.x.float(), rows.y
        method = self.methods[method_name]
        bundle = self.bundle(model_id)
        table = explain_unit(
            method, bundle, x, torch.from_numpy(query_ids.copy()), labels, self.spec.targets, seed=self.spec.seed,
            meta={"job": self.spec.name, "spec_hash": self.spec_hash, "model_id": model_id,
                  "method": method_name, "config_hash": config_hash(method_name, method.config),
                  "unit_id": str(row["unit_id"])}, metrics=self.metrics)
        success = table.column("success").to_numpy(zero_copy_only=False)
        result = {"unit_id": str(row["unit_id"]), "rows": table.num_rows, "success": int(success.sum()),
                  "seconds": time.perf_counter() - start, "error": ""}
        write_unit(self.spec.output, table, model_id=model_id, method=method_name, part=part, query_ids=query_ids,
                   spec_hash=self.spec_hash, run_id=self.run_id, rows=result["rows"], success=result["success"],
                   seconds=result["seconds"])
        return result

    def run_with_retries(self, row: dict[str, Any]) -> dict[str, Any]:
        """run_unit, re-run up to runtime.max_retries times when it raises an error a re-run may change (I/O,
        memory, a runtime error); a deterministic one (DETERMINISTIC: a bad value, an index out of range, a lost
        claim) is reported at once. The last error is reported.

        A re-run rewrites the same shard name atomically, so a unit is never written twice. A host that
        dies instead (out of memory, killed) is Ray's to restart; Ray Data re-submits its unit.
        """
        tags = {"model": str(row["model_id"]), "method": str(row["method"])}
        self.telemetry.in_flight(tags, +1)
        error, attempt = "", 0
        try:
            while attempt <= self.spec.runtime.max_retries:
                attempt += 1
                try:
                    result = self.run_unit(row)
                    result["attempts"] = attempt
                    self.telemetry.unit_done(tags, result["rows"], result["seconds"])
                    return result
                except Exception as err:  # recorded; the job goes on with the other units
                    error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                    if isinstance(err, DETERMINISTIC):
                        break
            self.telemetry.unit_failed(tags, len(np.frombuffer(row["query_ids"], dtype=np.int64)))
            return {"unit_id": str(row["unit_id"]), "rows": 0, "success": 0, "seconds": 0.0, "error": error,
                    "attempts": attempt}
        finally:
            self.telemetry.in_flight(tags, -1)

    def run(self, row: dict[str, Any]) -> dict[str, Any]:
        """The scheduler's call: run_with_retries, plus this host's account (models it loaded for this unit,
        models resident, peak RSS) so that the driver's account survives a host's restart."""
        result = self.run_with_retries(row)
        result.update(loaded_models=list(self.loaded), resident=len(self.bundles), peak_resident=self.peak_resident,
                      peak_rss_mib=peak_rss_mib(), pid=os.getpid(), rows_read=self.queries.rows_read,
                      reference_rows_read=0 if self.shared_reference is None else self.shared_reference.rows_read)
        self.loaded.clear()
        return result

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("unit_id", "rows", "success", "seconds", "error", "attempts")}
        for i in range(len(batch["unit_id"])):
            result = self.run_with_retries({key: batch[key][i] for key in batch})
            for key, value in result.items():
                out[key].append(value)
        return {key: np.asarray(values) for key, values in out.items()}
