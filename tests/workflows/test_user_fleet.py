"""A team's fleet as it arrives (issue 24): a normalised CNN, a one-logit head, an ONNX CNN, scikit-learn gradient
boosting and LightGBM, built from scratch, audited as given through one spec per dataset on a real local Ray."""
import polars as pl
import pytest

from engine.spec import AuditSpec, load_spec
from engine.store.results import result_files
from engine.workflows.audit import audit
from engine.workflows.user_fleet import write_specs

pytestmark = pytest.mark.ray
pytest.importorskip("onnx2torch")
pytest.importorskip("hummingbird")
pytest.importorskip("lightgbm")


def test_five_user_models_are_audited_as_given(tmp_path, local_ray):
    built: list[str] = []  # each model's training accuracy, shown if an assertion fails
    images, records = write_specs(str(tmp_path), queries=10, epochs=3, log=built.append)
    for path, models, method in ((images, {"normalised-cnn", "one-logit-cnn", "onnx-cnn"}, "wachter"),
                                 (records, {"gradient-boosting", "lightgbm"}, "growing_spheres")):
        spec = load_spec(AuditSpec, path)
        spec = spec.model_copy(update={"methods": [m for m in spec.methods if m.name == method]})
        result = audit(spec, log=lambda *_: None, progress=False)
        assert result.units_failed == []
        rows = pl.read_parquet(result_files(spec.output))
        validity = rows.group_by("model_id").agg(pl.col("success").mean())
        assert set(validity["model_id"]) == models
        assert validity["success"].min() >= 0.8, (validity, built)
