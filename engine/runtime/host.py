"""ModelHost: the callable class Ray Data runs under `map_batches` with an actor pool.

Each actor keeps the fleet's classifiers, the reference data and the methods resident; a batch is a
few work units; each unit's rows are written as one atomic Parquet shard, and a small summary row
per unit goes back to the driver.
"""
from __future__ import annotations

import time
import traceback
from typing import Any, Optional

import numpy as np
import torch

from engine.data import load_dataset
from engine.explain import explain_unit
from engine.metrics.fid_reference import FidChoice, build_extractor
from engine.metrics.per_query import MetricOptions
from engine.methods import config_hash, make_method
from engine.models.fleet import resolve_classifier, resolve_explainer, resolve_generator, resolve_oracle
from engine.models.handles import ModelBundle
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


class ModelHost:
    def __init__(self, spec: dict[str, Any], run_id: str, num_threads: int = 1,
                 fid: Optional[dict[str, Any]] = None) -> None:
        """run_id: the run that holds the output's claim (checked before every write); fid: the driver's resolved
        FidChoice as a dict ({'kind': 'inception'|'domain'|None, 'weights': ...})."""
        torch.set_num_threads(max(1, num_threads))
        self.run_id = run_id
        self.spec = AuditSpec.model_validate(spec)
        self.device = pick_device(self.spec.runtime.device)
        self.reference = load_dataset(self.spec.dataset.name, "train", **self.spec.dataset.options)
        self.input_shape = self.reference.input_shape
        self.methods = {m.name: make_method(m.name, m.params) for m in self.spec.methods}
        self.entries = {m.id: m for m in self.spec.fleet}
        self.bundles: dict[str, ModelBundle] = {}
        self.spec_hash = self.spec.spec_hash()
        quiet, cache = (lambda *_: None), self.spec.runtime.cache_dir
        # The generator and the oracle are the domain's, shared by every model this actor hosts.
        self.generator = None if self.spec.generator is None else resolve_generator(
            self.spec.generator, self.spec.dataset, cache, self.device, log=quiet)
        self.oracle = None if self.spec.oracle is None else resolve_oracle(
            self.spec.oracle, self.spec.dataset, cache, self.device, log=quiet)
        extractor = build_extractor(FidChoice(**(fid or {"kind": None})), self.spec.dataset.name,
                                    self.spec.dataset.options, cache, self.device, log=quiet)
        self.metrics = MetricOptions.from_spec(self.spec.metrics, self.spec.confounders(), extractor)
        self.telemetry = Telemetry()

    def bundle(self, model_id: str) -> ModelBundle:
        if model_id not in self.bundles:
            handle = resolve_classifier(self.entries[model_id], self.spec.dataset, self.spec.runtime.cache_dir,
                                        self.device, log=lambda *_: None)
            entry = self.spec.explainer_entry()  # set when a method needs Progressive Exaggeration's explainer
            explainer = None if entry is None else resolve_explainer(
                handle, entry, self.spec.dataset, self.spec.runtime.cache_dir, self.device,
                checkpoint_root=self.spec.output, log=lambda *_: None)
            self.bundles[model_id] = ModelBundle(classifier=handle, generator=self.generator, oracle=self.oracle,
                                                 reference=self.reference, device=self.device, explainer=explainer)
        return self.bundles[model_id]

    def run_unit(self, row: dict[str, Any]) -> dict[str, Any]:
        start = time.perf_counter()
        model_id, method_name, part = str(row["model_id"]), str(row["method"]), int(row["part"])
        query_ids = np.frombuffer(row["query_ids"], dtype=np.int64)
        labels = np.frombuffer(row["labels"], dtype=np.int64)
        x = np.frombuffer(row["x"], dtype=np.float32).reshape(len(query_ids), *self.input_shape)
        method = self.methods[method_name]
        table = explain_unit(
            method, self.bundle(model_id), torch.from_numpy(x.copy()), torch.from_numpy(query_ids.copy()),
            torch.from_numpy(labels.copy()), self.spec.targets, seed=self.spec.seed,
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {k: [] for k in ("unit_id", "rows", "success", "seconds", "error", "attempts")}
        for i in range(len(batch["unit_id"])):
            result = self.run_with_retries({key: batch[key][i] for key in batch})
            for key, value in result.items():
                out[key].append(value)
        return {key: np.asarray(values) for key, values in out.items()}
