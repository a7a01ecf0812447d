"""Safe loading of users' models and the classifier handle check."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from engine.models.architectures import CNNClassifier, MLPClassifier
from engine.models.handles import ClassifierHandle
from engine.models.loading import classifier_handle_from_module, load_module

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

FACTORY = "engine.models.architectures:MLPClassifier"
KWARGS = {"in_features": 12, "num_classes": 3, "hidden": [8]}


@pytest.fixture()
def model() -> nn.Module:
    torch.manual_seed(0)
    return MLPClassifier(**KWARGS).eval()


@pytest.fixture()
def x() -> torch.Tensor:
    return torch.rand(5, 12, generator=torch.Generator().manual_seed(1))


def test_full_pickle_is_refused_without_allow_pickle(tmp_path, model, x, caplog):
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(ValueError, match=r"full\.pt.*allow_pickle: true.*TorchScript.*state dict"):
        load_module(path)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_module(path, format="pickle")
    with caplog.at_level(logging.WARNING, logger="engine.models.loading"):
        loaded = load_module(path, allow_pickle=True)
    assert "weights_only=False" in caplog.text
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_loads_and_predicts_the_same(tmp_path, model, x, how):
    path = tmp_path / f"{how}.pt"
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    torch.jit.save(scripted, str(path))
    for fmt in ("auto", "torchscript"):
        loaded = load_module(path, format=fmt)
        assert not loaded.training
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_torch_export_program_loads(tmp_path, x):
    torch.manual_seed(0)
    cnn = CNNClassifier(1, 8, 3).eval()
    images = torch.rand(4, 1, 8, 8)
    program = torch.export.export(cnn, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    loaded = load_module(tmp_path / "cnn.pt2")
    torch.testing.assert_close(loaded(images), cnn(images))
    handle = classifier_handle_from_module(loaded, "exported", (1, 8, 8), ["a", "b", "c"])
    assert handle.predict(images).shape == (4,)


def test_factory_and_state_dict(tmp_path, model, x):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded = load_module(path, factory=FACTORY, factory_kwargs=KWARGS)
    assert isinstance(loaded, MLPClassifier) and not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # a checkpoint dict holding the state dict, and a callable factory
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    loaded = load_module(tmp_path / "ckpt.pt", format="state_dict", factory=lambda: MLPClassifier(**KWARGS))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_user_package_factory(tmp_path, monkeypatch, x):
    pkg = tmp_path / "usermodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch\n"
        "def make(k=2):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(12, k))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 4))
    torch.save(net.state_dict(), tmp_path / "user.pt")
    loaded = load_module(tmp_path / "user.pt", factory="usermodels.nets:make", factory_kwargs={"k": 4})
    torch.testing.assert_close(loaded(x), net(x))


def test_state_dict_that_does_not_fit_names_file_and_keys(tmp_path, model):
    path = tmp_path / "other.pt"
    torch.save(MLPClassifier(in_features=12, num_classes=3, hidden=[8, 8]).state_dict(), path)
    with pytest.raises(ValueError, match=r"other\.pt.*unexpected keys \['net\.5\.bias', 'net\.5\.weight'\]"):
        load_module(path, factory=FACTORY, factory_kwargs=KWARGS)
    torch.save(MLPClassifier(in_features=10, num_classes=3, hidden=[8]).state_dict(), path)
    with pytest.raises(ValueError, match=r"other\.pt.*shape mismatches \['net\.1\.weight: file \(8, 10\)"):
        load_module(path, factory=FACTORY, factory_kwargs=KWARGS)


def test_other_clear_errors(tmp_path, model):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_module(tmp_path / "missing.pt")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"sd\.pt holds a state dict; give a `factory"):
        load_module(tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="Cannot import module 'no_such_pkg.models'"):
        load_module(tmp_path / "sd.pt", factory="no_such_pkg.models:make")
    with pytest.raises(ValueError, match="'package.module:callable'"):
        load_module(tmp_path / "sd.pt", factory="engine.models.architectures.MLPClassifier")
    for junk in (b"not a model at all", b"hello world"):  # UnpicklingError and KeyError inside torch.load
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(ValueError, match=r"junk\.pt is not a TorchScript"):
            load_module(tmp_path / "junk.pt", factory=FACTORY, factory_kwargs=KWARGS)
    with pytest.raises(ValueError, match="`format`"):
        load_module(tmp_path / "sd.pt", format="onnx")


def test_fsspec_uri(model, x):
    import fsspec

    with fsspec.open("memory://cfaudit-test/script.pt", "wb") as f:
        torch.jit.save(torch.jit.script(model), f)
    torch.testing.assert_close(load_module("memory://cfaudit-test/script.pt")(x), model(x))
    with pytest.raises(FileNotFoundError, match="memory://cfaudit-test/none.pt"):
        load_module("memory://cfaudit-test/none.pt")


def test_classifier_handle_from_module(model, x):
    handle = classifier_handle_from_module(model, "m1", (12,), ["a", "b", "c"])
    assert isinstance(handle, ClassifierHandle) and handle.num_classes == 3 and handle.input_shape == (12,)
    assert handle.predict(x).shape == (5,)
    with pytest.raises(ValueError, match=r"'m1' returned shape \[1, 3\].*expected \[1, 2\]"):
        classifier_handle_from_module(model, "m1", (12,), ["a", "b"])
    with pytest.raises(ValueError, match=r"'m1' failed on a dummy input of shape \[1, 1, 8, 8\]"):
        classifier_handle_from_module(model, "m1", (1, 8, 8), ["a", "b", "c"])
    flat = nn.Sequential(nn.Linear(12, 3), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"returned shape \[3\]"):
        classifier_handle_from_module(flat, "m2", (12,), ["a", "b", "c"])
