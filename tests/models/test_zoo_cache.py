"""get_or_train: cache hits return identical weights, any input change misses, entries are atomic."""
from __future__ import annotations

import json

import pytest
import torch

from engine.data.base import ArrayDataset
from engine.models import zoo
from engine.models.cache import CODE_VERSION, ModelCache, cache_key, default_cache_dir


@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    return ArrayDataset("rand", x, y, ["bottom", "top"], "image", attributes=y[:, None].float(),
                        attribute_names=["top"])


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_call_is_a_hit_with_identical_weights(tmp_path, data):
    args = ("classifier", "cnn", {"width": 4}, data, "rand-v1", {"epochs": 2, "batch_size": 32}, 7)
    first, info1 = zoo.get_or_train(*args, cache_dir=tmp_path)
    second, info2 = zoo.get_or_train(*args, cache_dir=tmp_path)
    assert not info1["cache_hit"] and info2["cache_hit"]
    assert info1["key"] == info2["key"] and info1["path"] == info2["path"]
    assert info2["history"] == info1["history"] and len(info1["history"]) == 2
    assert _same_weights(first, second) and not second.training
    assert info1["arch_kwargs"] == {"in_channels": 1, "image_size": 8, "num_classes": 2, "width": 4,
                                    "fc_hidden": [128, 64], "dropout": 0.0, "batch_norm": True}
    meta = json.loads((tmp_path / info1["key"] / "meta.json").read_text())
    assert meta["arch"] == "cnn" and meta["dataset_fingerprint"] == "rand-v1" and meta["train_seconds"] > 0
    assert meta["code_version"] == CODE_VERSION and meta["history"] == info1["history"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    module, meta2 = zoo.load_cached(info1["key"], cache_dir=tmp_path)
    assert _same_weights(first, module) and meta2["key"] == info1["key"]


def test_explicit_defaults_hit_and_any_change_misses(tmp_path, data):
    base = dict(kind="classifier", arch="mlp", arch_kwargs={"hidden": [8]}, dataset=data,
                dataset_fingerprint="rand-v1", train_kwargs={"epochs": 1}, seed=0, cache_dir=tmp_path)
    _, info = zoo.get_or_train(**base)
    same = dict(base, arch_kwargs={"hidden": (8,), "in_features": 64},
                train_kwargs={"epochs": 1, "batch_size": 64, "lr": 2e-3})
    assert zoo.get_or_train(**same)[1]["key"] == info["key"]
    keys = {info["key"]}
    for change in [dict(train_kwargs={"epochs": 1, "lr": 1e-3}), dict(seed=1), dict(dataset_fingerprint="rand-v2"),
                   dict(arch_kwargs={"hidden": [9]})]:
        _, other = zoo.get_or_train(**dict(base, **change))
        assert not other["cache_hit"], change
        keys.add(other["key"])
    assert len(keys) == 5


def test_same_seed_trains_the_same_weights_in_separate_caches(tmp_path, data):
    args = ("oracle", "attribute_oracle", {"width": 4}, data, "rand-v1", {"epochs": 1}, 3)
    a, _ = zoo.get_or_train(*args, cache_dir=tmp_path / "a")
    b, _ = zoo.get_or_train(*args, cache_dir=tmp_path / "b")
    assert _same_weights(a, b)


@pytest.mark.parametrize("kind, arch", [("vae", "conv_vae"), ("dcgan", "dcgan_generator"),
                                        ("attribute_autoencoder", "attribute_autoencoder")])
def test_generative_kinds_train_and_hit(tmp_path, data, kind, arch):
    train_kwargs = {"epochs": 1} if kind != "attribute_autoencoder" else {"epochs": 1, "oracle_epochs": 1}
    arch_kwargs = {"width": 4} if kind == "dcgan" else {"width": 4, "latent_dim": 4}  # dcgan: default 16
    module, info = zoo.get_or_train(kind, arch, arch_kwargs, data, "rand-v1", train_kwargs, 0, cache_dir=tmp_path)
    again, hit = zoo.get_or_train(kind, arch, arch_kwargs, data, "rand-v1", train_kwargs, 0, cache_dir=tmp_path)
    assert not info["cache_hit"] and hit["cache_hit"] and _same_weights(module, again)
    assert hasattr(module, "decode") and module.latent_dim == (16 if kind == "dcgan" else 4)


def test_cache_dir_from_environment(tmp_path, monkeypatch, data):
    monkeypatch.setenv("CFAUDIT_CACHE", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    assert default_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    _, info = zoo.get_or_train("classifier", "mlp", {"hidden": [4]}, data, "fp", {"epochs": 1}, 0)
    assert info["path"].startswith(str(tmp_path / "env"))
    monkeypatch.delenv("CFAUDIT_CACHE")
    assert str(default_cache_dir()).endswith("cfaudit/models")


def test_save_is_atomic_and_keeps_the_first_entry(tmp_path):
    cache = ModelCache(tmp_path)
    key = cache_key("classifier", "mlp", {"a": 1}, {"epochs": 1}, 0, "fp")
    assert cache.load(key) is None
    cache.save(key, {"w": torch.ones(2)}, {"n": 1})
    cache.save(key, {"w": torch.zeros(2)}, {"n": 2})  # a second writer loses the race quietly
    state, meta = cache.load(key)
    assert torch.equal(state["w"], torch.ones(2)) and meta == {"n": 1}
    assert sorted(p.name for p in (tmp_path / key).iterdir()) == ["meta.json", "weights.pt"]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "weights.pt").write_bytes(b"")
    assert "half" not in cache  # an entry needs both files


def test_unknown_names_and_unjsonable_inputs_are_value_errors(tmp_path, data):
    with pytest.raises(ValueError, match=r"Unknown model kind 'gan'; expected one of \['attribute_autoencoder'"):
        zoo.get_or_train("gan", "cnn", {}, data, "fp", {}, 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown architecture 'vit'; expected one of \['attribute_autoencoder'"):
        zoo.get_or_train("classifier", "vit", {}, data, "fp", {}, 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"cannot be trained as kind 'classifier'; expected one of \['cnn', 'mlp', 'text_cnn'\]"):
        zoo.get_or_train("classifier", "conv_vae", {}, data, "fp", {}, 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"Unknown training argument\(s\) \['epoch'\]"):
        zoo.get_or_train("classifier", "cnn", {}, data, "fp", {"epoch": 1}, 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="JSON-able"):
        zoo.get_or_train("classifier", "cnn", {}, data, "fp", {"lr": object()}, 0, cache_dir=tmp_path)
