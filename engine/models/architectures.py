"""Small built-in networks that train in seconds on a CPU.

Every class records its JSON-able constructor kwargs in `module.hparams`, so `type(m)(**m.hparams)` rebuilds
it for `weights_only` loading. Images are [B, C, S, S] in [0, 1] with S in 8..64 (any S, not only powers of
two: decoders generate the next size up and crop). BatchNorm appears only in the CNN classifier (it trains
reliably with it) and the DCGAN generator (Radford et al.); both run in eval mode in the engine, where
BatchNorm is a fixed affine map, so a sample's output never depends on the rest of its batch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 64


def _check_image(in_channels: int, image_size: int) -> None:
    if not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise ValueError(f"Expected image_size in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] but got {image_size}")
    if int(in_channels) < 1:
        raise ValueError(f"Expected in_channels >= 1 but got {in_channels}")


def _levels(image_size: int) -> int:
    """Stride-2 stages that bring `image_size` down to at most 4 pixels."""
    return max(1, math.ceil(math.log2(image_size / 4)))


def _base_size(image_size: int) -> int:
    return math.ceil(image_size / 2 ** _levels(image_size))


def _channels(width: int, levels: int) -> list[int]:
    """Feature widths per stage, doubling and capped at 8x `width`."""
    return [width * min(2 ** i, 8) for i in range(levels)]


class _ConvEncoder(nn.Module):
    """x [B, C, S, S] -> features [B, F]: stride-2 conv + LeakyReLU stages down to <= 4x4."""

    def __init__(self, in_channels: int, image_size: int, width: int) -> None:
        super().__init__()
        chans = _channels(width, _levels(image_size))
        layers: list[nn.Module] = []
        prev = in_channels
        for c in chans:
            layers += [nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            prev = c
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.out_features = prev * _base_size(image_size) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _ConvDecoder(nn.Module):
    """code [B, D] -> logits [B, C, S, S]: linear to a <= 4x4 map, transposed-conv upsampling, crop to S."""

    def __init__(self, code_dim: int, out_channels: int, image_size: int, width: int, batchnorm: bool = False):
        super().__init__()
        levels = _levels(image_size)
        chans = _channels(width, levels)[::-1]
        self.image_size, self.base, self.top = image_size, _base_size(image_size), chans[0]
        self.fc = nn.Linear(code_dim, chans[0] * self.base ** 2)
        layers: list[nn.Module] = [nn.BatchNorm2d(chans[0]) if batchnorm else nn.Identity(), nn.ReLU()]
        for i, c in enumerate(chans):
            last = i == len(chans) - 1
            nxt = out_channels if last else chans[i + 1]
            layers.append(nn.ConvTranspose2d(c, nxt, 4, stride=2, padding=1))
            if not last:
                layers += [nn.BatchNorm2d(nxt) if batchnorm else nn.Identity(), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        h = self.fc(code).view(-1, self.top, self.base, self.base)
        s = self.image_size
        return self.net(h)[..., :s, :s]


class CNNClassifier(nn.Module):
    """Gradual Construction's MNIST net, scaled down: (conv-conv-pool) x 2 then three FC layers.

    x [B, C, S, S] -> logits [B, num_classes]. Dropout (off by default) is inactive in eval mode.
    width=16 (not 32) keeps 4000 32x32 RGB images x 6 epochs under 20 s on 2 CPU cores; width=32 costs ~4x.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 16,
                 fc_hidden: Sequence[int] = (128, 64), dropout: float = 0.0, batch_norm: bool = True) -> None:
        super().__init__()
        _check_image(in_channels, image_size)
        self.hparams = dict(in_channels=int(in_channels), image_size=int(image_size), num_classes=int(num_classes),
                            width=int(width), fc_hidden=[int(h) for h in fc_hidden], dropout=float(dropout),
                            batch_norm=bool(batch_norm))
        w = int(width)

        def conv(cin: int, cout: int) -> list[nn.Module]:
            # BatchNorm breaks the long loss plateau a plain CNN shows on `shapes` (stuck at ln 2 for 4
            # epochs); in eval mode it is a fixed affine map, so a sample's output never depends on its batch.
            return [nn.Conv2d(cin, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if batch_norm else []), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(in_channels, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2), nn.Flatten())
        dims = [2 * w * (image_size // 4) ** 2, *self.hparams["fc_hidden"]]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
        self.head = nn.Sequential(*layers, nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLPClassifier(nn.Module):
    """x [B, in_features] (or any [B, ...], flattened) -> logits [B, num_classes]."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 64, 32)) -> None:
        super().__init__()
        self.hparams = dict(in_features=int(in_features), num_classes=int(num_classes),
                            hidden=[int(h) for h in hidden])
        dims = [int(in_features), *self.hparams["hidden"]]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvVAE(nn.Module):
    """Convolutional VAE. `encode(x) -> z` is the posterior mean; `decode(z) -> x` in [0, 1]."""

    def __init__(self, in_channels: int, image_size: int, latent_dim: int = 16, width: int = 32) -> None:
        super().__init__()
        _check_image(in_channels, image_size)
        self.hparams = dict(in_channels=int(in_channels), image_size=int(image_size), latent_dim=int(latent_dim),
                            width=int(width))
        self.latent_dim = int(latent_dim)
        self.encoder = _ConvEncoder(in_channels, image_size, width)
        self.to_stats = nn.Linear(self.encoder.out_features, 2 * latent_dim)
        self.decoder = _ConvDecoder(latent_dim, in_channels, image_size, width)

    def encode_dist(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, S, S] -> (mu [B, L], logvar [B, L])."""
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_dist(x)[0]

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the posterior mean."""
        return self.decode(self.encode(x))


class DCGANGenerator(nn.Module):
    """z [B, latent_dim] -> x [B, C, S, S] in [0, 1]: linear + transposed convs with BatchNorm (DCGAN)."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        _check_image(out_channels, image_size)
        self.hparams = dict(latent_dim=int(latent_dim), out_channels=int(out_channels), image_size=int(image_size),
                            width=int(width))
        self.latent_dim = int(latent_dim)
        self.decoder = _ConvDecoder(latent_dim, out_channels, image_size, width, batchnorm=True)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)


class DCGANDiscriminator(nn.Module):
    """x [B, C, S, S] -> real/fake logit [B]. No BatchNorm (batch-independent)."""

    def __init__(self, in_channels: int, image_size: int, width: int = 32) -> None:
        super().__init__()
        _check_image(in_channels, image_size)
        self.hparams = dict(in_channels=int(in_channels), image_size=int(image_size), width=int(width))
        self.encoder = _ConvEncoder(in_channels, image_size, width)
        self.out = nn.Linear(self.encoder.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(x)).squeeze(-1)


class AttributeAutoencoder(nn.Module):
    """Attribute-informed auto-encoder (AIP Sec. 3.2): latent z ⊕ a.

    `encode(x) -> (z [B, latent_dim], a [B, num_attributes])` with `a` the predicted attribute probabilities;
    `decode(z, a) -> x [B, C, S, S]` in [0, 1]. `a` is a control: `train_attribute_autoencoder` makes
    decoding with an edited `a` render the edited attributes.
    """

    def __init__(self, in_channels: int, image_size: int, latent_dim: int = 16, num_attributes: int = 1,
                 width: int = 32) -> None:
        super().__init__()
        _check_image(in_channels, image_size)
        if int(num_attributes) < 1:
            raise ValueError(f"Expected num_attributes >= 1 but got {num_attributes}")
        self.hparams = dict(in_channels=int(in_channels), image_size=int(image_size), latent_dim=int(latent_dim),
                            num_attributes=int(num_attributes), width=int(width))
        self.latent_dim, self.num_attributes = int(latent_dim), int(num_attributes)
        self.encoder = _ConvEncoder(in_channels, image_size, width)
        self.to_z = nn.Linear(self.encoder.out_features, latent_dim)
        self.to_a = nn.Linear(self.encoder.out_features, num_attributes)
        self.decoder = _ConvDecoder(latent_dim + num_attributes, in_channels, image_size, width)

    def encode_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (z, attribute logits)."""
        h = self.encoder(x)
        return self.to_z(h), self.to_a(h)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, logits = self.encode_logits(x)
        return z, torch.sigmoid(logits)

    def decode(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(torch.cat([z, a.to(z.dtype)], dim=-1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the attribute-informed latent."""
        return self.decode(*self.encode(x))


class AttributeOracle(nn.Module):
    """Multi-label attribute classifier: x [B, C, S, S] -> attribute logits [B, num_attributes].

    The same conv trunk as CNNClassifier; used as AIP's attribute discriminator D_xi (Eq. 4) and to measure
    confounding (Progressive Exaggeration, Table 3).
    """

    def __init__(self, in_channels: int, image_size: int, num_attributes: int, width: int = 16) -> None:
        super().__init__()
        self.hparams = dict(in_channels=int(in_channels), image_size=int(image_size),
                            num_attributes=int(num_attributes), width=int(width))
        self.net = CNNClassifier(in_channels, image_size, num_attributes, width=width, fc_hidden=(64,), dropout=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
