"""Gradual Construction's reference logits (Eq. 7) are computed once per (model, dataset sample) for the whole job
and shared through the job's store: a second host reads them, reads no training row, and gets the counterfactuals
it would get from the reference sample in memory; in an audit over 2 hosts the sample is read once."""
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from engine.data import open_split
from engine.explain import explain_unit
from engine.methods import make_method
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.runtime.placement import Placement
from engine.runtime.plan import WorkUnit
from engine.runtime.reference import SharedReference
from engine.spec import AuditSpec, parse_spec
from engine.store.results import result_files
from engine.workflows.audit import audit
from tests.fixtures.images import png_bytes, random_images

ROWS, SIDE, SAMPLE = 240, 8, 60
GC = {"sigma": 15, "n_reference": 10, "max_features": 3}


def _brightness_model() -> nn.Module:
    """Class 1 when the image's mean is above 0.5: both classes occur among random images."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-torch.ones(3 * SIDE * SIDE), torch.ones(3 * SIDE * SIDE)]) * 40 / (3 * SIDE * SIDE))
        model[1].bias.copy_(torch.tensor([20.0, -20.0]))
    return model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-reference")
    x = random_images(ROWS, SIDE, SIDE, seed=3)
    y = np.arange(ROWS) % 2
    pq.write_table(pa.table({"image": [{"bytes": png_bytes(a), "path": None} for a in x], "label": y}),
                   root / "images.parquet", row_group_size=20)
    model = _brightness_model()
    torch.jit.script(model).save(str(root / "m.pt"))
    return root, {"path": str(root / "images.parquet"), "test_fraction": 0.5}


def _handle(model: nn.Module) -> ClassifierHandle:
    return ClassifierHandle(model, "m", (3, SIDE, SIDE), ["0", "1"])


def test_a_second_host_reads_the_first_hosts_logits_and_gets_the_same_counterfactuals(images, tmp_path):
    _, options = images
    handle = _handle(_brightness_model())
    first, second = (SharedReference("parquet_images", options, SAMPLE, 0, str(tmp_path), torch.device("cpu"))
                     for _ in range(2))
    computed = first.logits(handle, "digest-a")
    assert (first.computed, first.loaded, first.rows_read) == (1, 0, SAMPLE)  # the sample, once, in blocks
    stored = second.logits(handle, "digest-a")
    assert (second.computed, second.loaded, second.rows_read) == (0, 1, 0)  # no training row read
    assert torch.equal(stored, computed) and computed.shape == (SAMPLE, 2)
    other = second.logits(handle, "digest-b")  # another model's weights: its own entry
    assert second.computed == 1 and torch.equal(other, computed)
    assert len({first.key("digest-a"), first.key("digest-b"),
                SharedReference("parquet_images", options, SAMPLE + 1, 0, str(tmp_path), torch.device("cpu")).key(
                    "digest-a"),
                SharedReference("parquet_images", options, SAMPLE, 1, str(tmp_path), torch.device("cpu")).key(
                    "digest-a")}) == 4  # weights, sample size and seed are all in the key

    # GC given the stored logits equals GC given the reference sample itself (the path before sharing).
    train, test = open_split("parquet_images", "train", **options), open_split("parquet_images", "test", **options)
    sample = train.sample(SAMPLE, 0)
    queries = test.take(np.arange(8))
    tables = []
    for bundle in (ModelBundle(classifier=handle, reference=sample),
                   ModelBundle(classifier=handle, reference=test.info, reference_logits=stored)):
        tables.append(pl.from_arrow(explain_unit(
            make_method("gradual_construction", GC), bundle, queries.x, torch.arange(8), queries.y, "flip", 0,
            meta={"job": "t", "spec_hash": "-", "model_id": "m", "method": "gradual_construction",
                  "config_hash": "-", "unit_id": "u"})).drop("seconds"))
    assert tables[0].equals(tables[1]) and tables[0]["success"].sum() > 0


def test_a_second_host_shares_a_models_queue_only_once_a_result_came_back():
    units = [WorkUnit("m", "gradual_construction", i, np.arange(2)) for i in range(4)]
    cold = Placement(units, ["a", "b"], 1, share_when_warm=True)
    assert cold.next_unit("a").unit.part == 0
    assert cold.next_unit("b") is None  # a is still computing what b would need
    cold.done("m")
    assert cold.next_unit("b").unit.part == 1
    eager = Placement(units, ["a", "b"], 1)
    assert eager.next_unit("a") and eager.next_unit("b")  # without the flag, b shares at once
    forced = Placement(units, ["a", "b"], 1, share_when_warm=True)
    forced.next_unit("a")
    assert forced.next_unit("b", force=True) is not None  # no other host would run it


@pytest.mark.ray
def test_an_audit_over_two_hosts_reads_the_reference_sample_once(images, tmp_path, local_ray):
    root, options = images
    spec = parse_spec(AuditSpec, {
        "name": "shared-reference", "output": str(tmp_path / "out"), "overwrite": True,
        "dataset": {"name": "parquet_images", "options": options},
        "fleet": [{"id": "m", "path": str(root / "m.pt"), "format": "torchscript", "trust": True}],
        "queries": {"count": 24, "seed": 0}, "targets": "flip",
        "methods": [{"name": "gradual_construction", "params": GC}],
        "metrics": {"fid": {"extractor": "none"}, "deletion_steps": 0, "bootstrap_samples": 10},
        "runtime": {"batch_size": 4, "num_actors": 2, "num_cpus_per_actor": 1, "reference_samples": SAMPLE}})
    result = audit(spec, progress=False)
    hosts = result.account["hosts"]
    assert result.units_failed == [] and result.units_done == 6
    assert sum(h["reference_rows_read"] for h in hosts) == SAMPLE  # once for the job, whichever host ran units
    assert len(list((tmp_path / "out" / "cache" / "reference-logits").glob("*.pt"))) == 1
    rows = pl.read_parquet(result_files(str(tmp_path / "out")))
    assert rows.height == 24 and rows["success"].sum() > 0
