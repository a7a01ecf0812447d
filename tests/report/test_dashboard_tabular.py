"""The dashboard shows tabular counterfactuals as records: each changed feature, before -> after (issue #11)."""
import json
import re

import torch

from engine.data import load_dataset
from engine.data.registry import dataset_fingerprint
from engine.explain import explain_unit
from engine.methods import make_method
from engine.metrics.per_query import MetricOptions
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.models.zoo import get_or_train
from engine.report.bias import write_reports
from engine.report.dashboard import render_dashboard
from engine.report.summary import write_summary
from engine.store.uri import join, write_bytes_atomic
from tests.fixtures.results import SPEC_HASH, commit_shard


def test_tabular_examples_are_records_with_their_changes(tmp_path):
    train, test = load_dataset("german_credit", "train"), load_dataset("german_credit", "test")
    module, _ = get_or_train("classifier", "mlp", {"hidden": [64, 32]}, train, dataset_fingerprint(train), {"epochs": 10},
                             0, tmp_path / "cache")
    handle = ClassifierHandle(module, "mlp", tuple(train.input_shape), train.class_names)
    bundle = ModelBundle(classifier=handle, reference=train)
    out = str(tmp_path / "audit")
    model_id = "mlp-credit"
    meta = {"job": "t", "spec_hash": "h", "model_id": model_id, "method": "gradual_construction",
            "config_hash": "c", "unit_id": "u"}
    table = explain_unit(make_method("gradual_construction", {"tau": 0.5, "sigma": 50}), bundle, test.x[:8],
                         torch.arange(8), test.y[:8], "flip", seed=0, meta=meta,
                         metrics=MetricOptions(deletion_steps=0))
    commit_shard(out, model_id, "gradual_construction", 0, table)
    spec = {"name": "tab", "dataset": {"name": "german_credit", "options": {}}, "queries": {"split": "test"},
            "metrics": {"confidence": 0.95, "bootstrap_samples": 50}}
    write_bytes_atomic(join(out, "_job.json"), json.dumps({"spec": spec, "spec_hash": SPEC_HASH}).encode())
    write_reports(out, summary=write_summary(out, 0.95, 50))
    html = open(render_dashboard(out, max_examples=4), encoding="utf-8").read()
    block = re.search(r'<figure class="records".*?</figure>', html, re.S).group(0)
    rows = table.to_pylist()
    shown = sorted(rows, key=lambda r: (not r["success"], r["query_id"]))[:4]
    for r in shown:
        for change in r["changes"]:
            assert change.replace(">", "&gt;").replace("<", "&lt;") in block
    assert block.count("<tr>") == 1 + len(shown) and ("good → bad" in block or "bad → good" in block)
