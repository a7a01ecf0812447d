"""Progressive Exaggeration's networks (Singla et al., ICLR 2020, §2 and App. A.1), sized for 28-64 px.

I_f(x, δ) = G(E(x), c_f(x, δ)) (Eq. 2): E maps x to a spatial code, G decodes it through residual blocks
whose batch normalisation is conditioned on the bin index c (BN-ReLU-Conv3-BN-ReLU-Conv3, App. A.1).
The discriminator is a projection discriminator (Miyato & Koyama 2018) with spectral normalisation and the
paper's ordinal conditional term r(c = k | x) = Σ_{i<k} v_iᵀ φ(x) (Eq. 3-4).

Every module records its JSON-able constructor kwargs in `hparams`, like the zoo's architectures.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import spectral_norm


def _levels(image_size: int) -> int:
    """Stride-2 stages from `image_size` down to a code of at most 8x8 (32 -> 8, 28 -> 7, 64 -> 8)."""
    return max(1, math.ceil(math.log2(image_size / 8)))


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without affine terms, then a per-bin scale and shift (conditional BN, Eq. 2's condition)."""

    def __init__(self, num_features: int, num_bins: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gamma = nn.Embedding(num_bins, num_features)
        self.beta = nn.Embedding(num_bins, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.gamma(c)[:, :, None, None] * self.bn(h) + self.beta(c)[:, :, None, None]


class GenBlock(nn.Module):
    """CBN-ReLU-(up)-Conv3-CBN-ReLU-Conv3 with a (1x1, upsampled) shortcut."""

    def __init__(self, cin: int, cout: int, num_bins: int, up: bool) -> None:
        super().__init__()
        self.up = up
        self.bn1, self.bn2 = ConditionalBatchNorm2d(cin, num_bins), ConditionalBatchNorm2d(cout, num_bins)
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or up) else nn.Identity()

    def _up(self, h: torch.Tensor) -> torch.Tensor:
        return F.interpolate(h, scale_factor=2, mode="nearest") if self.up else h

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self._up(F.relu(self.bn1(h, c))))
        out = self.conv2(F.relu(self.bn2(out, c)))
        return out + self.skip(self._up(h))


class EncBlock(nn.Module):
    """(2x2 average pool when `down`), BN-ReLU-Conv3-BN-ReLU-Conv3 with a shortcut: G's block, downsampling."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  nn.BatchNorm2d(cout), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.down:  # pool first: the convolutions run at the lower resolution (4x cheaper on a CPU)
            h = F.avg_pool2d(h, 2, ceil_mode=True)
        return self.body(h) + self.skip(h)


class Explainer(nn.Module):
    """I_f(x, c) = G(E(x), c). x [B, C, S, S] in `value_range`, c [B] int64 bin indices -> x_c [B, C, S, S].

    E: a stem conv and `levels` downsampling blocks (0: down to ≤ 8x8) to a [B, width·2^levels, S/2^levels, ...]
    code (a spatial code keeps the query's identity; App. A.1: "the encoder uses the same structure but
    downsamples"; a shallower code reconstructs sooner, which matters on a CPU budget).
    G: one CBN residual block at the code's size, then `levels` upsampling CBN blocks, BN-ReLU-Conv3 and a
    sigmoid mapped onto `value_range`. `positive_class` is the class whose probability f(x) is exaggerated.
    """

    def __init__(self, in_channels: int, image_size: int, num_bins: int = 10, width: int = 16,
                 positive_class: int = 1, value_range: tuple[float, float] = (0.0, 1.0), levels: int = 0,
                 skip: bool = False) -> None:
        super().__init__()
        if num_bins < 2:
            raise ValueError(f"Expected num_bins >= 2 but got {num_bins}")
        if not 8 <= int(image_size) <= 128:
            raise ValueError(f"Expected image_size in [8, 128] but got {image_size}")
        self.hparams = dict(in_channels=int(in_channels), image_size=int(image_size), num_bins=int(num_bins),
                            width=int(width), positive_class=int(positive_class),
                            value_range=[float(value_range[0]), float(value_range[1])], levels=int(levels),
                            skip=bool(skip))
        levels = int(levels) or _levels(image_size)
        chans = [width * min(2 ** i, 4) for i in range(levels + 1)]
        self.image_size, self.num_bins, self.positive_class = int(image_size), int(num_bins), int(positive_class)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.stem = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.enc = nn.Sequential(*[EncBlock(chans[i], chans[i + 1], down=True) for i in range(levels)])
        self.mid = GenBlock(chans[-1], chans[-1], num_bins, up=False)
        self.dec = nn.ModuleList([GenBlock(chans[i + 1], chans[i], num_bins, up=True)
                                  for i in reversed(range(levels))])
        # skip: G's output is an edit of the query in logit space, sigmoid(logit(x) + G(...)) (not in the paper):
        # small details such as a 3x3 corner marker survive from the first steps instead of after long training.
        self.skip = bool(skip)
        self.out_bn = nn.BatchNorm2d(chans[0])
        self.out = nn.Conv2d(chans[0], in_channels, 3, padding=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """E(x): [B, C, S, S] -> [code [B, F, s, s]] (plus logit(x) [B, C, S, S] with `skip`), row-aligned."""
        lo, hi = self.value_range
        unit = (x - lo) / (hi - lo)
        code = self.enc(self.stem(unit * 2 - 1))
        return [code, torch.logit(unit.clamp(1e-3, 1 - 1e-3))] if self.skip else [code]

    def decode(self, codes: list[torch.Tensor], c: torch.Tensor) -> torch.Tensor:
        """G(E(x), c): codes from `encode` (every tensor [B, ...]), c [B] bins -> x [B, C, S, S] in value_range."""
        h = self.mid(codes[0], c)
        for block in self.dec:
            h = block(h, c)
        s = self.image_size
        logits = self.out(F.relu(self.out_bn(h)))[..., :s, :s]
        if self.skip:
            logits = logits + codes[1]
        lo, hi = self.value_range
        return lo + (hi - lo) * torch.sigmoid(logits)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), c)


class DiscBlock(nn.Module):
    """ReLU-Conv3-ReLU-Conv3 (App. A.1), spectrally normalised, average-pooled when `down`; SN 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, down: bool, first: bool = False) -> None:
        super().__init__()
        self.down, self.first = down, first
        self.conv1 = spectral_norm(nn.Conv2d(cin, cout, 3, padding=1))
        self.conv2 = spectral_norm(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.first else F.relu(x)  # the first block sees the image, not activations
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h, x = F.avg_pool2d(h, 2, ceil_mode=True), F.avg_pool2d(x, 2, ceil_mode=True)
        return h + self.skip(x)


class ProjectionDiscriminator(nn.Module):
    """D(x, c = k) = ψ(φ(x)) + r(k | x), r(k | x) = Σ_{i<k} v_iᵀ φ(x) (Eq. 3-4; ordinal, Frank & Hall 2001).

    φ: SN residual blocks down to ≤4x4, ReLU, global sum pooling -> [B, F]; ψ: SN linear -> scalar;
    v_1..v_{n-1}: an SN linear map F -> n-1 (the n-1 binary "bin > i" terms).
    """

    def __init__(self, in_channels: int, image_size: int, num_bins: int = 10, width: int = 16) -> None:
        super().__init__()
        self.hparams = dict(in_channels=int(in_channels), image_size=int(image_size), num_bins=int(num_bins),
                            width=int(width))
        levels = _levels(image_size) + 1
        chans = [width * min(2 ** i, 4) for i in range(levels)]
        blocks, prev = [], in_channels
        for i, c in enumerate(chans):
            blocks.append(DiscBlock(prev, c, down=True, first=i == 0))
            prev = c
        blocks.append(DiscBlock(prev, prev, down=False))
        self.phi = nn.Sequential(*blocks)
        self.psi = spectral_norm(nn.Linear(prev, 1))
        self.v = spectral_norm(nn.Linear(prev, num_bins - 1, bias=False))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.phi(x * 2 - 1)).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, C, S, S] (scaled to [0, 1]), c [B] bins -> [B] scores."""
        phi = self.features(x)
        proj = self.v(phi)  # [B, n-1]: v_iᵀ φ(x)
        below = torch.arange(proj.shape[1], device=c.device)[None, :] < c[:, None]  # i < k
        return self.psi(phi).squeeze(1) + (proj * below).sum(1)
