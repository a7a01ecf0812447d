"""Every built-in model learns on tiny data; generative models beat the mean image; attributes are controls."""
from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch.nn import functional as F

from engine.data.base import ArrayDataset
from engine.models import zoo
from engine.models.training import (seeded, train_attribute_autoencoder, train_classifier, train_dcgan,
                                    train_oracle, train_vae)


def _toy_digits(size: int = 16) -> tuple[ArrayDataset, ArrayDataset]:
    """sklearn digits upsampled to size x size; attribute `top_bright` adds a bright band to the top half
    (else to the bottom half), so the attribute is visible and independent of the digit."""
    d = load_digits()
    x = F.interpolate(torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, size=size, mode="bilinear")
    g = torch.Generator().manual_seed(0)
    top = (torch.rand(len(x), generator=g) < 0.5).float()
    band = torch.zeros_like(x)
    half = size // 2
    band[top == 1, :, :half] = 0.35
    band[top == 0, :, half:] = 0.35
    x = (x * 0.65 + band).clamp(0, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    full = ArrayDataset("toy_digits", x, y, [str(i) for i in range(10)], "image", attributes=top[:, None],
                        attribute_names=["top_bright"])
    return full.subset(torch.arange(0, 1200)), full.subset(torch.arange(1200, 1600))


@pytest.fixture(scope="module")
def toy():
    return _toy_digits()


def _top_minus_bottom(img: torch.Tensor) -> torch.Tensor:
    half = img.shape[-2] // 2
    return img[:, 0, :half].mean((1, 2)) - img[:, 0, half:].mean((1, 2))


def _build(arch: str, seed: int = 0, **kwargs):
    with seeded(seed):
        return zoo.build(arch, **kwargs)


# name -> (arch, arch kwargs, trainer, train kwargs); losses must fall from the first to the last epoch.
CASES = {
    "cnn": ("cnn", dict(in_channels=1, image_size=16, num_classes=10), train_classifier, dict(epochs=3)),
    "mlp": ("mlp", dict(in_features=256, num_classes=10), train_classifier, dict(epochs=4)),
    "oracle": ("attribute_oracle", dict(in_channels=1, image_size=16, num_attributes=1), train_oracle,
               dict(epochs=2)),
    "vae": ("conv_vae", dict(in_channels=1, image_size=16, latent_dim=8), train_vae, dict(epochs=3)),
    "attribute_autoencoder": ("attribute_autoencoder",
                              dict(in_channels=1, image_size=16, latent_dim=8, num_attributes=1),
                              train_attribute_autoencoder, dict(epochs=3, oracle_epochs=2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_falls_and_module_is_in_eval_mode(toy, case):
    arch, kwargs, trainer, train_kwargs = CASES[case]
    train, _ = toy
    module, history = trainer(_build(arch, **kwargs), train.subset(torch.arange(600)), seed=0, **train_kwargs)
    assert len(history) == train_kwargs["epochs"]
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0]
    assert not module.training


def test_classifiers_generalise(toy):
    train, test = toy
    cnn, _ = train_classifier(_build("cnn", in_channels=1, image_size=16, num_classes=10), train, epochs=10, seed=0)
    mlp, _ = train_classifier(_build("mlp", in_features=256, num_classes=10), train, epochs=15, seed=0)
    with torch.no_grad():
        assert (cnn(test.x).argmax(-1) == test.y).float().mean() > 0.85  # chance: 0.1
        assert (mlp(test.x).argmax(-1) == test.y).float().mean() > 0.8


def test_oracle_predicts_visible_attribute(toy):
    train, test = toy
    oracle, _ = train_oracle(_build("attribute_oracle", in_channels=1, image_size=16, num_attributes=1), train,
                             epochs=3, seed=0)
    with torch.no_grad():
        pred = (oracle(test.x) > 0).float()
    assert (pred == test.attributes).float().mean() > 0.95


def test_vae_reconstructs_better_than_mean_image(toy):
    train, test = toy
    vae, _ = train_vae(_build("conv_vae", in_channels=1, image_size=16, latent_dim=8), train, epochs=8, seed=0)
    with torch.no_grad():
        mse = F.mse_loss(vae.decode(vae.encode(test.x)), test.x)
        out = vae.decode(torch.randn(4, 8))
    baseline = F.mse_loss(train.x.mean(0, keepdim=True).expand_as(test.x), test.x)
    assert mse < 0.5 * baseline
    assert out.shape == (4, 1, 16, 16) and out.min() >= 0 and out.max() <= 1


def test_attribute_autoencoder_reconstructs_encodes_and_obeys_attributes(toy):
    train, test = toy
    ae, _ = train_attribute_autoencoder(
        _build("attribute_autoencoder", in_channels=1, image_size=16, latent_dim=8, num_attributes=1), train,
        epochs=14, oracle_epochs=3, seed=0)
    with torch.no_grad():
        z, a = ae.encode(test.x)
        rec = ae.decode(z, a)
        edited = ae.decode(z, 1 - a)
    baseline = F.mse_loss(train.x.mean(0, keepdim=True).expand_as(test.x), test.x)
    assert F.mse_loss(rec, test.x) < 0.5 * baseline
    assert a.shape == (len(test), 1) and a.min() >= 0 and a.max() <= 1
    assert ((a > 0.5).float() == test.attributes).float().mean() > 0.9  # chance is ~0.5
    # Flipping `top_bright` must move brightness towards the other half (measured on pixels, not by the oracle).
    direction = 1 - 2 * test.attributes[:, 0]  # +1: the edit should brighten the top
    shift = (_top_minus_bottom(edited) - _top_minus_bottom(rec)) * direction
    assert (shift > 0).float().mean() > 0.9
    assert shift.mean() > 0.15


def test_dcgan_samples_approach_the_data(toy):
    train, _ = toy
    gen = _build("dcgan_generator", latent_dim=8, out_channels=1, image_size=16)
    z = torch.randn(400, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = gen.eval().decode(z)
    gen, history = train_dcgan(gen, train, epochs=15, seed=0)
    with torch.no_grad():
        after = gen.decode(z)
    assert len(history) == 15 and not gen.training
    mean = train.x.mean(0)
    assert F.mse_loss(after.mean(0), mean) < 0.5 * F.mse_loss(before.mean(0), mean)
    nn_before = torch.cdist(before.flatten(1), train.x.flatten(1)).min(1).values.mean()
    nn_after = torch.cdist(after.flatten(1), train.x.flatten(1)).min(1).values.mean()
    assert nn_after < nn_before


def test_training_is_deterministic_and_restores_rng(toy):
    train, _ = toy
    small = train.subset(torch.arange(200))
    state = torch.random.get_rng_state()
    runs = [train_classifier(_build("cnn", seed=3, in_channels=1, image_size=16, num_classes=10), small,
                             epochs=1, seed=5) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert runs[0][1] == runs[1][1]
    for (k, v), w in zip(runs[0][0].state_dict().items(), runs[1][0].state_dict().values()):
        assert torch.equal(v, w), k


def test_mismatched_dataset_is_a_clear_error(toy):
    train, _ = toy
    with pytest.raises(ValueError, match=r"expects images \(3, 16, 16\)"):
        train_classifier(_build("cnn", in_channels=3, image_size=16, num_classes=10), train, epochs=1)
    no_attrs = ArrayDataset("plain", train.x, train.y, train.class_names, "image")
    with pytest.raises(ValueError, match="has no attributes"):
        train_oracle(_build("attribute_oracle", in_channels=1, image_size=16, num_attributes=1), no_attrs)
    with pytest.raises(ValueError, match="recon"):
        train_attribute_autoencoder(_build("attribute_autoencoder", in_channels=1, image_size=16), train,
                                    recon="l3")
