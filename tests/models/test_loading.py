"""Loading of users' models (code-executing formats only with trust) and the classifier handle check."""
from __future__ import annotations

import io
import json
import logging
import zipfile

import pytest
import torch
from torch import nn

from engine.models.architectures import CNNClassifier, MLPClassifier
from engine.models.handles import ClassifierHandle
from engine.models.loading import classifier_handle_from_module, load_module
from engine.spec import AuditSpec, SpecError, parse_spec

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


def test_full_pickle_is_refused_without_trust(tmp_path, model, x, caplog):
    path = tmp_path / "full.pt"
    torch.save(model, path)
    with pytest.raises(ValueError, match=r"model 'm': .*full\.pt is a pickle of Python objects.*can execute code "
                                         r"from the file\. Set `trust: true`.*model\.state_dict\(\).*factory"):
        load_module(path, model_id="m")
    with pytest.raises(ValueError, match=r"full\.pt is to be loaded as a pickle .*\(format: pickle\).*trust: true"):
        load_module(path, format="pickle")
    for flags in ({"trust": True}, {"allow_pickle": True}, {"trust": True, "allow_pickle": True}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="engine.models.loading"):
            loaded = load_module(path, **flags)
        assert "code from the file may run" in caplog.text and len(caplog.records) == 1
        assert not loaded.training
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"`trust` \(False\) and its deprecated alias `allow_pickle` \(True\)"):
        load_module(path, trust=False, allow_pickle=True)
    with pytest.raises(ValueError, match=r"full\.pt is not a weights-only state dict \(format: state_dict\)"):
        load_module(path, format="state_dict", factory=FACTORY, factory_kwargs=KWARGS, trust=True)


def test_spec_trust_and_its_allow_pickle_alias():
    def fleet(**flags):
        return {"output": "memory://x", "dataset": {"name": "shapes"}, "methods": [{"name": "wachter"}],
                "fleet": [{"id": "u", "path": "m.pt", **flags}]}

    assert parse_spec(AuditSpec, fleet()).fleet[0].trust is False
    for flags in ({"trust": True}, {"allow_pickle": True}, {"trust": True, "allow_pickle": True}):
        assert parse_spec(AuditSpec, fleet(**flags)).fleet[0].trust is True
    with pytest.raises(SpecError, match=r"fleet\[0\].*`trust` \(False\) and its deprecated alias `allow_pickle` "
                                        r"\(True\) disagree"):
        parse_spec(AuditSpec, fleet(trust=False, allow_pickle=True))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_needs_trust_then_predicts_the_same(tmp_path, model, x, how, caplog):
    path = tmp_path / f"{how}.pt"
    scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, x)
    torch.jit.save(scripted, str(path))
    with pytest.raises(ValueError, match=rf"model 'u': .*{how}\.pt is a TorchScript archive, and loading it "
                                         r"can execute code from the file\. Set `trust: true`"):
        load_module(path, model_id="u")
    with pytest.raises(ValueError, match=r"to be loaded as a TorchScript archive \(format: torchscript\)"):
        load_module(path, format="torchscript")
    for fmt in ("auto", "torchscript"):
        with caplog.at_level(logging.WARNING, logger="engine.models.loading"):
            loaded = load_module(path, format=fmt, trust=True)
        assert "TorchScript archive with trust: code from the file may run" in caplog.text
        assert not loaded.training
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_torch_export_program_needs_trust_then_loads(tmp_path, x):
    torch.manual_seed(0)
    cnn = CNNClassifier(1, 8, 3).eval()
    images = torch.rand(4, 1, 8, 8)
    program = torch.export.export(cnn, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "cnn.pt2")
    for fmt in ("auto", "export"):
        with pytest.raises(ValueError, match=r"cnn\.pt2 .*torch\.export \(\.pt2\) archive.*trust: true"):
            load_module(tmp_path / "cnn.pt2", format=fmt)
    loaded = load_module(tmp_path / "cnn.pt2", trust=True)
    torch.testing.assert_close(loaded(images), cnn(images))
    handle = classifier_handle_from_module(loaded, "exported", (1, 8, 8), ["a", "b", "c"])
    assert handle.predict(images).shape == (4,)


def _pickle_payload_export(tmp_path) -> tuple:
    """A real torch.export archive of an nn.Linear, edited as an attacker would: its weights config flags
    `weight` as `use_pickle`, and that entry holds a pickle whose reduce calls open(marker, "w").
    torch.export.load (torch 2.14) reads such an entry with torch.load(weights_only=False), which creates the
    marker: checked by hand, never here, so the test suite runs no payload."""
    linear = nn.Linear(3, 2).eval()
    clean, evil, marker = tmp_path / "clean.pt2", tmp_path / "evil.pt2", tmp_path / "pwned"
    torch.export.save(torch.export.export(linear, (torch.rand(1, 3),)), clean)

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    payload = io.BytesIO()
    torch.save(Payload(), payload)
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(evil, "w") as out:
        config_name = next(n for n in src.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(src.read(config_name))
        config["config"]["weight"]["use_pickle"] = True
        weight_name = config_name.rsplit("/", 1)[0] + "/" + config["config"]["weight"]["path_name"]
        edited = {config_name: json.dumps(config).encode(), weight_name: payload.getvalue()}
        for info in src.infolist():
            out.writestr(info, edited.get(info.filename) or src.read(info))
    return evil, marker, payload.getvalue(), weight_name


def test_crafted_export_archive_is_refused_before_its_payload_runs(tmp_path):
    evil, marker, payload, entry = _pickle_payload_export(tmp_path)
    with zipfile.ZipFile(evil) as zf:  # the archive holds the payload, which the safe unpickler would reject
        assert zf.read(entry) == payload
        with pytest.raises(Exception, match="open"):
            torch.load(io.BytesIO(payload), weights_only=True)
    for fmt in ("auto", "export"):
        with pytest.raises(ValueError, match=r"model 'user': .*evil\.pt2 .*torch\.export \(\.pt2\) archive.*"
                                             r"can execute code from the file"):
            load_module(evil, format=fmt, model_id="user")
    assert not marker.exists()


def test_factory_and_state_dict(tmp_path, model, x, caplog):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="engine.models.loading"):
        loaded = load_module(path, factory=FACTORY, factory_kwargs=KWARGS)  # no trust needed, no warning
    assert caplog.records == []
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
        load_module(tmp_path / "sd.pt", format="keras")


def test_fsspec_uri(model, x):
    import fsspec

    with fsspec.open("memory://cfaudit-loading-test/script.pt", "wb") as f:
        torch.jit.save(torch.jit.script(model), f)
    torch.testing.assert_close(load_module("memory://cfaudit-loading-test/script.pt", trust=True)(x), model(x))
    with pytest.raises(FileNotFoundError, match="memory://cfaudit-loading-test/none.pt"):
        load_module("memory://cfaudit-loading-test/none.pt")


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
