"""`cfaudit train` with an `exaggeration` entry, and the audit spec's `explainer` section (tiny configurations)."""
import pytest

from engine.spec import AuditSpec, SpecError, load_spec
from engine.workflows.train import train_from_file

SPEC = """
name: t
dataset: {name: shapes, options: {size: 32, n_train: 64, n_test: 8, seed: 3}}
models:
  - {id: clf, kind: classifier, arch: cnn, epochs: 1}
  - id: pe
    kind: exaggeration
    classifier: clf
    train_options: {steps: 2, batch_size: 8, width: 4, d_steps: 1, checkpoint_uri: %s, checkpoint_every: 1}
cache_dir: %s
"""


def test_train_spec_trains_the_explainer_of_a_classifier_then_hits_the_cache(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(SPEC % (tmp_path / "ckpt", tmp_path / "cache"))
    first, second = [], []
    train_from_file(path, log=first.append)
    train_from_file(path, log=second.append)
    assert any("pe (exaggeration for clf): trained" in line for line in first)
    assert any("pe (exaggeration for clf): cache hit" in line for line in second)
    assert (tmp_path / "ckpt" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("models,match", [
    ("[{id: pe, kind: exaggeration, classifier: clf}]", r"models\[0\].classifier"),
    ("[{id: clf, kind: classifier}, {id: pe, kind: exaggeration, classifier: clf, epochs: 2}]", "takes `steps`"),
    ("[{id: clf, kind: classifier}, {id: pe, kind: exaggeration, classifier: clf, train_options: {stepz: 1}}]",
     "stepz"),
    ("[{id: clf, kind: classifier, classifier: x}]", "only exaggeration entries"),
])
def test_train_spec_errors(tmp_path, models, match):
    path = tmp_path / "bad.yaml"
    path.write_text(f"dataset: {{name: shapes}}\nmodels: {models}\n")
    with pytest.raises(SpecError, match=match):
        train_from_file(path)


AUDIT = """
output: {out}
dataset: {{name: shapes}}
fleet: [{{id: a, train: {{}}}}]
methods: [{{name: {method}}}]
{extra}
"""


def test_audit_spec_explainer_section(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text(AUDIT.format(out=tmp_path, method="exaggeration", extra=""))
    entry = load_spec(AuditSpec, path).explainer_entry()
    assert entry is not None and entry.train == {} and entry.workers == 1  # the defaults when none is given
    path.write_text(AUDIT.format(out=tmp_path, method="wachter", extra="explainer: {train: {steps: 3}}"))
    assert load_spec(AuditSpec, path).explainer_entry() is None  # no method needs it
    path.write_text(AUDIT.format(out=tmp_path, method="exaggeration", extra="explainer: {train: {bins: 3}}"))
    with pytest.raises(SpecError, match=r"explainer.train.*bins"):
        load_spec(AuditSpec, path)
    path.write_text(AUDIT.format(out=tmp_path, method="exaggeration", extra="explainer: {workers: 0}"))
    with pytest.raises(SpecError, match="explainer.workers"):
        load_spec(AuditSpec, path)


def test_example_spec_is_valid():
    spec = load_spec(AuditSpec, "jobs/specs/exaggeration.yaml")
    assert spec.explainer_entry().train["num_bins"] == 10
