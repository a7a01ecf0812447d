"""Counterfactual data augmentation (issue #10): the Ray job's provenance, validity and exactly-once output,
the loader, the plausibility filter and the evaluation protocol, on small generated data."""
import pyarrow.parquet as pq
import pytest
import torch

from engine.data import load_dataset
from engine.data.augmented import augmented_files, concat, load_augmented, torch_concat
from engine.metrics.plausibility import KnnPlausibility
from engine.runtime.fleet import resolve_classifier
from engine.spec import parse_spec
from engine.spec.augment import AugmentSpec
from tests.fixtures.s3 import tiny_audit_spec

PROVENANCE = ["sample_id", "label", "job", "spec_hash", "model_id", "method", "config_hash", "seed", "source_split",
              "source_id", "source_label", "source_pred", "target", "p_target", "plausibility", "x"]


def test_knn_plausibility_keeps_typical_samples_and_rejects_outliers():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 10])
    labels = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    filt = KnnPlausibility.fit(real, labels, 3, k=5, quantile=0.95)
    probe = torch.tensor([[0.0, 0, 0, 0], [10.0, 10, 10, 10], [5.0, 5, 5, 5], [0.0, 0, 0, 0]])
    score, ok = filt.score(probe, torch.tensor([0, 1, 0, 2]))
    assert ok.tolist() == [True, True, False, False]  # class 2 has no real samples: never plausible
    assert score[0] < 1.5 and score[2] > 3


def tiny_augment_spec(out: str) -> dict:
    spec = tiny_audit_spec(out)
    spec.update(name="tiny-augment", queries={"split": "train", "count": 30, "seed": 0},
                augment={"plausibility": {"k": 3, "quantile": 0.95, "reference_samples": 200},
                         "evaluation": {"per_class": 20, "seeds": [0, 1], "extra_fraction": 0.2}})
    return spec


@pytest.mark.ray
def test_augment_job_provenance_validity_and_exactly_once(local_ray, tmp_path):
    from engine.workflows.augment import augment

    spec = parse_spec(AugmentSpec, tiny_augment_spec(str(tmp_path / "out")))
    first = augment(spec, progress=False)
    assert first.generated == 30 and 0 < first.kept <= first.valid <= 30
    files = augmented_files(spec.output)
    assert len(files) == 3  # one per results shard (30 queries, units of 10)
    table = pq.read_table(files[0])
    assert table.column_names == PROVENANCE
    data = load_augmented(spec.output)
    prov = data.meta["provenance"]
    assert len(data) == first.kept and len(set(prov["sample_id"])) == len(data)
    assert torch.equal(data.y, torch.tensor(prov["target"])) and set(prov["source_split"]) == {"train"}
    assert all(t != p for t, p in zip(prov["target"], prov["source_pred"]))
    # every kept sample is classified as its target by the model that generated it
    handle = resolve_classifier(spec.fleet[0], spec.dataset, spec.runtime.cache_dir, log=lambda *_: None)
    assert torch.equal(handle.predict(data.x), data.y)
    # the sources are real training samples with their true labels
    train = load_dataset(spec.dataset.name, "train", **spec.dataset.options)
    assert torch.equal(train.y[torch.tensor(prov["source_id"])], torch.tensor(prov["source_label"]))
    # usable at once: concatenated with the original training data
    both = concat(train, data)
    assert len(both) == len(train) + len(data) and len(torch_concat(train, data)) == len(both)
    # a re-run resumes: no unit re-explained, no sample duplicated
    again = augment(spec, progress=False)
    assert again.kept == first.kept and augmented_files(spec.output) == files
    assert sorted(load_augmented(spec.output).meta["provenance"]["sample_id"]) == sorted(prov["sample_id"])


def test_evaluation_protocol_writes_both_arms(tmp_path):
    import polars as pl

    from engine.workflows.augment_eval import evaluate

    raw = tiny_augment_spec(str(tmp_path / "out"))
    # German credit: a table, so the filter's features are the records themselves (no domain network)
    raw.update(dataset={"name": "german_credit"}, methods=[{"name": "wachter", "params": {"max_iter": 300}}],
               fleet=[{"id": "mlp", "train": {"arch": "mlp", "arch_options": {"hidden": [64, 32]}, "epochs": 10}}])
    raw["augment"]["evaluation"]["per_class"] = 50
    summary = evaluate(parse_spec(AugmentSpec, raw), log=lambda *_: None)
    assert summary["arm"].to_list() == ["baseline", "wachter", "duplicates"]
    assert summary["seeds"].to_list() == [2, 2, 2] and summary["n_initial"].to_list() == [100, 100, 100]
    runs = pl.read_parquet(tmp_path / "out" / "reports" / "augmentation_runs.parquet")
    assert runs.height == 6 and runs["accuracy"].is_between(0, 1).all()
    added = runs.filter(pl.col("arm") == "wachter")["n_added"]
    assert (added > 0).all() and (added <= 20).all()  # at most 20% of the 100 initial samples
    html = (tmp_path / "out" / "dashboard" / "index.html").read_text()
    assert 'id="augmentation-table"' in html and "duplicates" in html


def test_augment_spec_defaults_and_errors():
    raw = tiny_augment_spec("/tmp/x")
    raw.pop("queries")
    spec = parse_spec(AugmentSpec, raw)
    assert spec.queries.split == "train" and "augment" not in spec.audit_spec().model_dump()
    raw["augment"] = {"plausibility": {"quantile": 1.5}}
    with pytest.raises(ValueError, match=r"augment.plausibility.quantile"):
        parse_spec(AugmentSpec, raw)
