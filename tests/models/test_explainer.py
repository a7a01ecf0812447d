"""Progressive Exaggeration's networks and training loop on tiny configurations (seconds on 2 CPU cores)."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch import nn

from engine.data import dataset_fingerprint
from engine.data.base import ArrayDataset
from engine.models.explainer import Explainer, ProjectionDiscriminator
from engine.models.explainer_training import (CHECKPOINT_NAME, ExplainerConfig, bernoulli_kl, bin_centres, bin_index,
                                              classifier_fingerprint, get_or_train_explainer, load_checkpoint,
                                              make_explainer_config, positive_log_probs, run_training,
                                              train_explainer)

TINY = dict(steps=4, batch_size=8, width=4, d_steps=2, num_bins=4)


class TinyClassifier(nn.Module):
    """Logits from the mean of the red channel: f(x) moves smoothly with the image."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[-8.0, 0.0, 0.0], [8.0, 0.0, 0.0]]))
            self.lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean(dim=(2, 3)) - 0.5)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def classifier() -> nn.Module:
    module = TinyClassifier().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _dataset(x: torch.Tensor) -> ArrayDataset:
    return ArrayDataset("tiny", x, torch.zeros(len(x), dtype=torch.int64), ["a", "b"], "image")


@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_explainer_shapes_range_and_batch_independence(channels: int, size: int) -> None:
    torch.manual_seed(0)
    net = Explainer(channels, size, num_bins=5, width=4, value_range=(-1.0, 1.0)).eval()
    x = torch.rand(6, channels, size, size) * 2 - 1
    c = torch.tensor([0, 1, 2, 3, 4, 2])
    with torch.no_grad():
        out = net(x, c)
        single = torch.cat([net(x[i:i + 1], c[i:i + 1]) for i in range(6)])
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, single, rtol=0, atol=1e-5)  # eval-mode BN: no batch coupling
    assert net.encode(x)[0].shape[-1] <= 8
    assert type(net)(**{**net.hparams, "value_range": tuple(net.hparams["value_range"])}).hparams == net.hparams


def test_generator_is_conditioned_on_the_bin_in_every_residual_block() -> None:
    torch.manual_seed(0)
    net = Explainer(3, 32, num_bins=4, width=4).eval()
    from engine.models.explainer import ConditionalBatchNorm2d, GenBlock

    blocks = [m for m in net.modules() if isinstance(m, GenBlock)]
    assert blocks and all(isinstance(b.bn1, ConditionalBatchNorm2d) and isinstance(b.bn2, ConditionalBatchNorm2d)
                          for b in blocks)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ConditionalBatchNorm2d):
                m.beta.weight.normal_()
        x = torch.rand(2, 3, 32, 32)
        a, b = net(x, torch.tensor([0, 0])), net(x, torch.tensor([3, 3]))
    assert (a - b).abs().max() > 1e-3


def test_discriminator_has_the_ordinal_projection_term_and_spectral_norm() -> None:
    torch.manual_seed(0)
    disc = ProjectionDiscriminator(3, 32, num_bins=5, width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        phi = disc.features(x)
        proj = disc.v(phi)  # [B, 4]: v_iᵀ φ(x)
        base = disc(x, torch.zeros(3, dtype=torch.long))
        for k in range(5):
            got = disc(x, torch.full((3,), k))
            torch.testing.assert_close(got - base, proj[:, :k].sum(1), rtol=1e-5, atol=1e-5)  # Σ_{i<k} v_iᵀ φ(x)
    sn = [m for m in disc.modules() if hasattr(m, "parametrizations")]
    assert len(sn) >= 3 and all("weight" in m.parametrizations for m in sn)


def test_bins_centres_and_bernoulli_kl() -> None:
    p = torch.tensor([0.0, 0.05, 0.1, 0.55, 0.999, 1.0])
    assert bin_index(p, 10).tolist() == [0, 0, 1, 5, 9, 9]
    torch.testing.assert_close(bin_centres(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    log_q, log_1mq = positive_log_probs(logits, 1)
    q = torch.softmax(logits, 1)[:, 1]
    torch.testing.assert_close(log_q.exp(), q)
    torch.testing.assert_close(log_1mq.exp(), 1 - q)
    torch.testing.assert_close(bernoulli_kl(q, log_q, log_1mq), torch.zeros(2), atol=1e-6, rtol=0)
    assert (bernoulli_kl(torch.tensor([0.9, 0.1]), log_q, log_1mq) > 0).all()
    three = torch.tensor([[1.0, 2.0, 3.0]])  # K = 3: 1 - f sums the other two classes
    torch.testing.assert_close(positive_log_probs(three, 0)[1].exp(), torch.softmax(three, 1)[:, 1:].sum(1))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="Unknown explainer training parameter"):
        make_explainer_config({"stepz": 3})
    with pytest.raises(ValueError, match="explainer.num_bins"):
        ExplainerConfig(num_bins=1)
    with pytest.raises(ValueError, match="explainer.beta2"):
        ExplainerConfig(beta2=1.0)
    assert ExplainerConfig().lambda_rec == 100.0 and ExplainerConfig().num_bins == 10


def test_training_is_deterministic_and_never_touches_the_classifier(images, classifier) -> None:
    before = classifier_fingerprint(classifier)
    cfg = ExplainerConfig(**TINY)
    a, hist = run_training(classifier, images, (0.0, 1.0), cfg, seed=3)
    b, _ = run_training(classifier, images, (0.0, 1.0), cfg, seed=3)
    assert classifier_fingerprint(classifier) == before
    assert all(not p.requires_grad for p in classifier.parameters())
    for (name, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(t, u), name
    assert hist and {"d", "adv", "kl", "rec", "cyc"} <= set(hist[-1]) and hist[-1]["step"] == TINY["steps"]
    assert not a.training


@pytest.mark.parametrize("root", ["local", "memory"])
def test_a_killed_training_resumes_from_its_last_checkpoint(images, classifier, tmp_path, root) -> None:
    uri = str(tmp_path / "ckpt") if root == "local" else f"memory://cfaudit-test/{tmp_path.name}/ckpt"
    cfg = ExplainerConfig(**{**TINY, "steps": 6})
    full, full_hist = run_training(classifier, images, (0.0, 1.0), cfg, seed=1)

    class Killed(Exception):
        pass

    def kill_at_5(step: int, values: dict) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        run_training(classifier, images, (0.0, 1.0), cfg, seed=1, checkpoint_uri=uri, checkpoint_every=2,
                     callback=kill_at_5)
    assert load_checkpoint(uri)["step"] == 4
    seen: list[int] = []
    resumed, hist = run_training(classifier, images, (0.0, 1.0), cfg, seed=1, checkpoint_uri=uri,
                                 checkpoint_every=2, callback=lambda step, _: seen.append(step))
    assert seen == [5, 6]  # only the missing steps ran
    for (name, t), (_, u) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(t, u), name
    assert load_checkpoint(uri)["step"] == 6
    with pytest.raises(ValueError, match="another explainer config"):
        run_training(classifier, images, (0.0, 1.0), ExplainerConfig(**{**TINY, "steps": 6, "lr": 1e-3}),
                     seed=1, checkpoint_uri=uri)
    if root == "memory":
        from engine.store.uri import filesystem, join

        fs, path = filesystem(join(uri, CHECKPOINT_NAME))
        fs.rm(path)


def test_cache_reuses_the_explainer_per_classifier(images, classifier, tmp_path) -> None:
    data = _dataset(images)
    cfg = ExplainerConfig(**{**TINY, "steps": 2})
    first, info = get_or_train_explainer(classifier, data, dataset_fingerprint(data), cfg, cache_dir=tmp_path)
    again, info2 = get_or_train_explainer(classifier, data, dataset_fingerprint(data), cfg, cache_dir=tmp_path)
    assert not info["cache_hit"] and info2["cache_hit"] and info["key"] == info2["key"]
    for t, u in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(t, u)
    other = TinyClassifier()
    with torch.no_grad():
        other.lin.bias.fill_(0.5)
    _, info3 = get_or_train_explainer(other, data, dataset_fingerprint(data), cfg, cache_dir=tmp_path)
    assert info3["key"] != info["key"] and not info3["cache_hit"]  # an explainer belongs to one classifier
    _, info4 = get_or_train_explainer(classifier, data, dataset_fingerprint(data),
                                      ExplainerConfig(**{**TINY, "steps": 3}), cache_dir=tmp_path)
    assert info4["key"] != info["key"]


def test_train_explainer_rejects_non_images(classifier) -> None:
    table = ArrayDataset("tab", torch.rand(8, 5), torch.zeros(8, dtype=torch.int64), ["a", "b"], "tabular")
    with pytest.raises(ValueError, match="trains on images"):
        train_explainer(classifier, table, ExplainerConfig(**TINY))
    with pytest.raises(ValueError, match="positive_class=2"):
        run_training(classifier, torch.rand(4, 3, 32, 32), (0.0, 1.0), ExplainerConfig(**{**TINY, "positive_class": 2}))


def test_checkpoint_holds_optimizer_states_and_config(images, classifier, tmp_path) -> None:
    cfg = ExplainerConfig(**{**TINY, "steps": 2})
    run_training(classifier, images, (0.0, 1.0), cfg, seed=0, checkpoint_uri=str(tmp_path), checkpoint_every=1)
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 2 and ckpt["config"] == asdict(cfg) and ckpt["seed"] == 0
    assert ckpt["opt_g"]["state"] and ckpt["opt_d"]["state"]
    assert {"explainer", "disc", "history"} <= set(ckpt)
    assert ckpt["disc"]["phi.0.conv1.bias"].shape == (TINY["width"],)  # disc_width 0: D as wide as E and G


def test_disc_width_sizes_only_the_discriminator(images, classifier, tmp_path) -> None:
    cfg = ExplainerConfig(**{**TINY, "steps": 1, "disc_width": 2})
    explainer, _ = run_training(classifier, images, (0.0, 1.0), cfg, checkpoint_uri=str(tmp_path))
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["disc"]["phi.0.conv1.bias"].shape == (2,) and explainer.hparams["width"] == TINY["width"]
    assert explainer.stem.weight.is_contiguous()  # trained channels_last, returned in the default layout
    with pytest.raises(ValueError, match="explainer.disc_width"):
        ExplainerConfig(disc_width=-1)
