"""Shapes, ranges, hparams round trips and batch independence for every built-in architecture."""
from __future__ import annotations

import json

import pytest
import torch

from engine.models import zoo
from engine.models.architectures import AttributeAutoencoder, ConvVAE, DCGANGenerator


def _kwargs(arch: str, c: int, s: int) -> dict:
    return {
        "cnn": dict(in_channels=c, image_size=s, num_classes=5),
        "mlp": dict(in_features=c * s * s, num_classes=5, hidden=(16, 8)),
        "conv_vae": dict(in_channels=c, image_size=s, latent_dim=6, width=8),
        "dcgan_generator": dict(latent_dim=6, out_channels=c, image_size=s, width=8),
        "dcgan_discriminator": dict(in_channels=c, image_size=s, width=8),
        "attribute_autoencoder": dict(in_channels=c, image_size=s, latent_dim=6, num_attributes=3, width=8),
        "attribute_oracle": dict(in_channels=c, image_size=s, num_attributes=3, width=8),
        "text_cnn": dict(embed_dim=6, num_classes=2, filters=4),
        "text_vae": dict(seq_len=5, embed_dim=6, vocab_size=11, latent_dim=4),
    }[arch]


IMAGE_ARCHS = sorted(a for a in zoo.ARCHITECTURES if not a.startswith("text_"))  # text: tests/methods/test_text_*


@pytest.mark.parametrize("size", [8, 13, 28, 32, 64])
@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_shapes_and_ranges(arch, size):
    c = 3 if size % 2 == 0 else 1
    module = zoo.build(arch, **_kwargs(arch, c, size)).eval()
    x = torch.rand(2, c, size, size)
    with torch.no_grad():
        if isinstance(module, AttributeAutoencoder):
            z, a = module.encode(x)
            assert z.shape == (2, 6) and a.shape == (2, 3) and a.min() >= 0 and a.max() <= 1
            out = module.decode(z, a)
        elif isinstance(module, ConvVAE):
            mu, logvar = module.encode_dist(x)
            assert mu.shape == logvar.shape == (2, 6)
            assert torch.equal(module.encode(x), mu)
            out = module.decode(mu)
        elif isinstance(module, DCGANGenerator):
            z = torch.randn(2, 6)
            out = module.decode(z)
            assert torch.equal(out, module(z))
        else:
            out = module(x)
    expected = {"cnn": (2, 5), "mlp": (2, 5), "dcgan_discriminator": (2,), "attribute_oracle": (2, 3)}
    if arch in expected:
        assert out.shape == expected[arch]
    else:
        assert out.shape == (2, c, size, size)
        assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("arch", sorted(zoo.ARCHITECTURES))
def test_hparams_are_json_and_rebuild_the_module(arch):
    module = zoo.build(arch, **_kwargs(arch, 1, 16))
    hparams = json.loads(json.dumps(module.hparams))
    clone = zoo.rebuild(arch, hparams, module.state_dict())
    assert clone.hparams == module.hparams and not clone.training
    assert zoo.arch_name(clone) == arch
    for (k, v), w in zip(module.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("arch", ["cnn", "mlp", "attribute_oracle", "conv_vae", "attribute_autoencoder"])
def test_a_sample_does_not_depend_on_its_batch(arch):
    module = zoo.build(arch, **_kwargs(arch, 1, 16)).eval()
    x = torch.rand(6, 1, 16, 16)
    with torch.no_grad():
        out = module.encode(x) if hasattr(module, "encode") else module(x)
        single = module.encode(x[2:3]) if hasattr(module, "encode") else module(x[2:3])
    outs = out if isinstance(out, tuple) else (out,)
    singles = single if isinstance(single, tuple) else (single,)
    for o, s in zip(outs, singles):
        torch.testing.assert_close(o[2:3], s, rtol=1e-5, atol=1e-6)


def test_attribute_autoencoder_decoder_reads_attributes():
    module = zoo.build("attribute_autoencoder", **_kwargs("attribute_autoencoder", 1, 16)).eval()
    z = torch.randn(2, 6)
    with torch.no_grad():
        assert not torch.equal(module.decode(z, torch.zeros(2, 3)), module.decode(z, torch.ones(2, 3)))


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="Unknown architecture 'resnet'.*'cnn'"):
        zoo.build("resnet")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['depth'\]"):
        zoo.build("cnn", in_channels=1, image_size=16, num_classes=2, depth=3)
    with pytest.raises(ValueError, match=r"lacks \['num_classes'\]"):
        zoo.build("cnn", in_channels=1, image_size=16)
    with pytest.raises(ValueError, match="image_size in \\[8, 64\\]"):
        zoo.build("conv_vae", in_channels=1, image_size=128)
