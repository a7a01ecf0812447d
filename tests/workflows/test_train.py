import pytest

from engine.spec import SpecError
from engine.workflows.train import train_from_file

SPEC = """
name: t
dataset: {name: digits}
models:
  - {id: clf, kind: classifier, arch: cnn, epochs: 1}
  - {id: orc, kind: classifier, arch: mlp, epochs: 1}
cache_dir: %s
"""


def test_second_train_hits_the_cache(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(SPEC % (tmp_path / "cache"))
    first, second = [], []
    train_from_file(path, log=first.append)
    train_from_file(path, log=second.append)
    assert sum("trained" in line for line in first) == 2
    assert sum("cache hit" in line for line in second) == 2


def test_train_spec_errors_name_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset: {name: digits}\nmodels:\n  - {id: x, kind: transformer}\n")
    with pytest.raises(SpecError, match=r"models\[0\].kind"):
        train_from_file(path)
    path.write_text("dataset: {name: digits}\n")
    with pytest.raises(SpecError, match="needs `models`"):
        train_from_file(path)
