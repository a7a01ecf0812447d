"""Fleet entries resolve to classifier handles: built-in (train-or-cache) and a user's trusted TorchScript file."""
import pytest
import torch

from engine.data import load_dataset
from engine.runtime.fleet import resolve_classifier
from engine.spec.audit import DatasetRef, FleetModel

DIGITS = DatasetRef(name="digits")


def test_builtin_entry_trains_then_hits_the_cache(tmp_path):
    entry = FleetModel(id="d", train={"arch": "mlp", "epochs": 2})
    first_logs, second_logs = [], []
    first = resolve_classifier(entry, DIGITS, str(tmp_path), log=first_logs.append)
    second = resolve_classifier(entry, DIGITS, str(tmp_path), log=second_logs.append)
    assert "epoch 2/2" in first_logs[-2] and "trained" in first_logs[-1]  # progress, then the outcome
    assert second_logs == [second_logs[0]] and "cache hit" in second_logs[0]
    assert first.meta["cache_key"] == second.meta["cache_key"]
    assert first.input_shape == (1, 8, 8) and first.num_classes == 10
    x = load_dataset("digits", "test").x[:5]
    assert torch.equal(first.logits(x), second.logits(x))


class Linear(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_user_torchscript_entry(tmp_path):
    path = tmp_path / "clf.ts"
    torch.jit.script(Linear(10)).save(str(path))
    with pytest.raises(ValueError, match=r"model 'u': .*clf\.ts is a TorchScript archive.*`trust: true`"):
        resolve_classifier(FleetModel(id="u", path=str(path)), DIGITS)
    handle = resolve_classifier(FleetModel(id="u", path=str(path), trust=True), DIGITS)
    assert handle.meta["source"] == "file" and handle.predict(load_dataset("digits", "test").x[:3]).shape == (3,)


def test_user_model_with_wrong_class_count_is_refused(tmp_path):
    path = tmp_path / "clf.ts"
    torch.jit.script(Linear(3)).save(str(path))
    with pytest.raises(ValueError, match=r"expected \[1, 10\] logits"):
        resolve_classifier(FleetModel(id="u", path=str(path), trust=True), DIGITS)


def test_a_host_loads_a_builtin_model_by_its_key_without_its_training_data(tmp_path, monkeypatch):
    """What the driver resolved, a host rebuilds from the cache by key: the same weights, no training split read."""
    import engine.runtime.fleet as fleet

    entry = FleetModel(id="d", train={"arch": "mlp", "epochs": 1})
    driver = resolve_classifier(entry, DIGITS, str(tmp_path), log=lambda *_: None)

    def no_training_data(*args, **kwargs):
        raise AssertionError("the host read the training split")

    monkeypatch.setattr(fleet, "load_dataset", no_training_data)
    host = resolve_classifier(entry, DIGITS, str(tmp_path), log=lambda *_: None, cache_key=driver.meta["cache_key"])
    x = load_dataset("digits", "test").x[:5]
    assert torch.equal(driver.logits(x), host.logits(x))
    assert (host.input_shape, host.class_names, host.value_range) == \
        (driver.input_shape, driver.class_names, driver.value_range)
    with pytest.raises(AssertionError, match="read the training split"):  # without the key it would have
        resolve_classifier(entry, DIGITS, str(tmp_path), log=lambda *_: None)
