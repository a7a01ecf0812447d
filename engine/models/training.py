"""Seeded CPU training routines for the built-in zoo.

Each `train_*(module, dataset, *, epochs, batch_size, lr, seed, ...)` trains `module` in place on an
ArrayDataset and returns `(module in eval mode, history)`, history being the per-epoch mean of the
objective it minimises. Randomness (shuffling, dropout, sampled attributes, GAN noise) comes from the global
torch RNG inside `seeded(seed)`, which restores the caller's RNG state afterwards, so a run is a function of
(module init, dataset, hyper-parameters, seed). Defaults are sized for a 2-core CPU. `log` (with `stage`, the name
progress lines carry) receives throttled progress lines (engine.progress); it only observes the loop.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from engine.data.base import ArrayDataset
from engine.models.architectures import AttributeOracle, DCGANDiscriminator
from engine.progress import Log, Progress

History = list[float]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block on the CPU RNG seeded with `seed`, then restore the previous RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _steps(n: int, batch_size: int) -> int:
    return -(-n // max(1, batch_size))


def _progress(stage: str, log: Log, epochs: int, n: int, batch_size: int) -> Progress:
    return Progress(stage, log, epochs * _steps(n, batch_size), epochs=epochs)


def _batches(n: int, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1 but got {batch_size}")
    perm = torch.randperm(n)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


def _check_fits(module: nn.Module, dataset: ArrayDataset) -> None:
    """A ValueError naming the mismatch when the dataset's samples cannot feed `module`."""
    hp = getattr(module, "hparams", {})
    if len(dataset) == 0:
        raise ValueError(f"Dataset {dataset.name!r} is empty")
    shape = dataset.input_shape
    if "image_size" in hp:
        channels = hp.get("in_channels", hp.get("out_channels"))
        want = (channels, hp["image_size"], hp["image_size"])
        if shape != want:
            raise ValueError(f"{type(module).__name__} expects images {want} but dataset {dataset.name!r} "
                             f"has samples of shape {shape}")
    if "in_features" in hp and int(torch.tensor(shape).prod()) != hp["in_features"]:
        raise ValueError(f"{type(module).__name__} expects {hp['in_features']} features but dataset "
                         f"{dataset.name!r} has samples of shape {shape}")


def _check_unit_range(dataset: ArrayDataset, who: str) -> None:
    if tuple(dataset.value_range) != (0.0, 1.0):
        raise ValueError(f"{who} generates images in [0, 1] but dataset {dataset.name!r} has value_range "
                         f"{dataset.value_range}")


def attribute_targets(dataset: ArrayDataset, module: Optional[nn.Module] = None) -> torch.Tensor:
    """The dataset's attributes [N, A] float, checked against the module's attribute outputs."""
    if dataset.attributes is None:
        raise ValueError(f"Dataset {dataset.name!r} has no attributes; attribute models need them")
    hp = getattr(module, "hparams", {})
    want = hp.get("num_attributes", hp.get("num_classes"))  # an MLP oracle has one output per attribute
    if want is not None and want != dataset.attributes.shape[1]:
        raise ValueError(f"{type(module).__name__} has {want} outputs but dataset {dataset.name!r} has "
                         f"{dataset.attributes.shape[1]} ({dataset.attribute_names})")
    return dataset.attributes.float()


def finish(module: nn.Module, history: History) -> tuple[nn.Module, History]:
    """(module in eval mode, history); a FloatingPointError when an epoch's loss is not finite."""
    bad = [i for i, v in enumerate(history) if v != v or v in (float("inf"), float("-inf"))]
    if bad:
        raise FloatingPointError(f"{type(module).__name__} training diverged (non-finite loss at epoch {bad[0]})")
    return module.eval(), history


def train_classifier(module: nn.Module, dataset: ArrayDataset, *, epochs: int = 6, batch_size: int = 64,
                     lr: float = 2e-3, weight_decay: float = 0.0, seed: int = 0, log: Log = None,
                     stage: str = "classifier") -> tuple[nn.Module, History]:
    """Cross-entropy with Adam. module: x [B, *input_shape] -> logits [B, K]."""
    _check_fits(module, dataset)
    num_classes = getattr(module, "hparams", {}).get("num_classes")
    if num_classes is not None and num_classes != dataset.num_classes:
        raise ValueError(f"{type(module).__name__} has num_classes={num_classes} but dataset {dataset.name!r} "
                         f"has {dataset.num_classes} classes")
    return fit(module, dataset.x.float(), dataset.y.long(), F.cross_entropy, epochs=epochs,
                batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed,
                progress=_progress(stage, log, epochs, len(dataset), batch_size))


def train_oracle(module: nn.Module, dataset: ArrayDataset, *, epochs: int = 6, batch_size: int = 64,
                 lr: float = 2e-3, seed: int = 0, log: Log = None,
                 stage: str = "oracle") -> tuple[nn.Module, History]:
    """Multi-label BCE on `dataset.attributes`. module: x -> attribute logits [B, A]."""
    _check_fits(module, dataset)
    return fit(module, dataset.x.float(), attribute_targets(dataset, module), F.binary_cross_entropy_with_logits,
                epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.0, seed=seed,
                progress=_progress(stage, log, epochs, len(dataset), batch_size))


def fit(module: nn.Module, x: torch.Tensor, targets: torch.Tensor,
         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, epochs: int, batch_size: int,
         lr: float, weight_decay: float, seed: int, progress: Progress) -> tuple[nn.Module, History]:
    """The supervised Adam loop the zoo's trainers share (classifier, oracle); history = mean loss per epoch."""
    history: History = []
    with seeded(seed):
        opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
        module.train()
        for _ in range(epochs):
            total, seen = 0.0, 0
            for idx in _batches(len(x), batch_size):
                loss = loss_fn(module(x[idx]), targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + loss.item() * len(idx), seen + len(idx)
                progress.update(loss=total / seen)
            history.append(total / len(x))
    progress.close()
    return finish(module, history)


def train_vae(module: nn.Module, dataset: ArrayDataset, *, epochs: int = 12, batch_size: int = 64,
              lr: float = 2e-3, beta: float = 1.0, seed: int = 0, log: Log = None,
              stage: str = "vae") -> tuple[nn.Module, History]:
    """Negative ELBO per image: Bernoulli reconstruction (BCE summed over pixels) + beta * KL(q(z|x) || N(0, I)).

    module: a ConvVAE-like module with `encode_dist(x) -> (mu, logvar)` and `decode_logits(z)`.
    """
    _check_fits(module, dataset)
    _check_unit_range(dataset, type(module).__name__)
    x = dataset.x.float()
    history: History = []
    progress = _progress(stage, log, epochs, len(x), batch_size)
    with seeded(seed):
        opt = torch.optim.Adam(module.parameters(), lr=lr)
        module.train()
        for _ in range(epochs):
            total, seen = 0.0, 0
            for idx in _batches(len(x), batch_size):
                xb = x[idx]
                mu, logvar = module.encode_dist(xb)
                z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
                rec = F.binary_cross_entropy_with_logits(module.decode_logits(z), xb, reduction="sum") / len(idx)
                kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(idx)
                loss = rec + beta * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, seen = total + loss.item() * len(idx), seen + len(idx)
                progress.update(loss=total / seen)
            history.append(total / len(x))
    progress.close()
    return finish(module, history)


def train_dcgan(module: nn.Module, dataset: ArrayDataset, *, epochs: int = 20, batch_size: int = 32,
                lr: float = 5e-4, disc_width: int = 32, seed: int = 0, log: Log = None,
                stage: str = "dcgan") -> tuple[nn.Module, History]:
    """Non-saturating GAN (Goodfellow et al.) with Adam(beta1=0.5) as in DCGAN; the discriminator is discarded.

    module: a DCGANGenerator (`latent_dim`, `decode(z)`). History: per-epoch mean of d_loss + g_loss, which
    for a GAN measures the game's balance rather than sample quality.
    """
    _check_fits(module, dataset)
    _check_unit_range(dataset, type(module).__name__)
    x = dataset.x.float()
    history: History = []
    progress = _progress(stage, log, epochs, len(x), batch_size)
    with seeded(seed):
        disc = DCGANDiscriminator(x.shape[1], x.shape[-1], width=disc_width)
        opt_g = torch.optim.Adam(module.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
        module.train()
        disc.train()
        for _ in range(epochs):
            total, seen = 0.0, 0
            for idx in _batches(len(x), batch_size):
                real = x[idx]
                fake = module.decode(torch.randn(len(idx), module.latent_dim))
                ones, zeros = torch.ones(len(idx)), torch.zeros(len(idx))
                d_loss = (F.binary_cross_entropy_with_logits(disc(real), ones)
                          + F.binary_cross_entropy_with_logits(disc(fake.detach()), zeros))
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                g_loss = F.binary_cross_entropy_with_logits(disc(fake), ones)
                opt_g.zero_grad(set_to_none=True)
                g_loss.backward()
                opt_g.step()
                total, seen = total + (d_loss.item() + g_loss.item()) * len(idx), seen + len(idx)
                progress.update(loss=total / seen)
            history.append(total / len(x))
    progress.close()
    return finish(module, history)


def train_attribute_autoencoder(module: nn.Module, dataset: ArrayDataset, *, epochs: int = 15,
                                batch_size: int = 64, lr: float = 2e-3, recon: str = "l2",
                                rec_weight: float = 20.0, attr_weight: float = 1.0, disc_weight: float = 1.0,
                                oracle_epochs: int = 6, seed: int = 0,
                                oracle: Optional[nn.Module] = None, log: Log = None,
                                stage: str = "attribute_autoencoder") -> tuple[nn.Module, History]:
    """Attribute-informed latent space, AIP Eq. 4 plus the encoder's attribute head.

    Per batch, with (z, a_hat) = encode(x), a the true attributes and a' = a[perm] a draw from P(a):
        rec_weight  * rec(x, decode(z, a_hat))                     reconstruction term of Eq. 4 (l2: MSE, or l1)
      + disc_weight * BCE(D(decode(z, a')), a')                     discrimination term of Eq. 4
      + attr_weight * BCE(a_hat, a)                                 trains the encoder's attribute head
    D is an attribute classifier trained separately and frozen (AIP: "trained separately"): `oracle` if
    given (x -> attribute logits), else an AttributeOracle fitted here for `oracle_epochs`. The decoder sees
    a_hat detached, so the attribute head stays a pure classifier. AIP's image models follow AttGAN, which adds
    a real/fake adversarial term; Eq. 4 has none and neither does this routine. The discrimination term is
    what makes `a` a control: decoding with an edited a' must show a' to D even when z still encodes a.
    """
    if recon not in ("l1", "l2"):
        raise ValueError(f"Expected argument `recon` to be 'l1' or 'l2' but got {recon!r}")
    _check_fits(module, dataset)
    _check_unit_range(dataset, type(module).__name__)
    x, a = dataset.x.float(), attribute_targets(dataset, module)
    if oracle is None:
        with seeded(seed + 1):
            oracle = AttributeOracle(x.shape[1], x.shape[-1], a.shape[1])
        oracle, _ = train_oracle(oracle, dataset, epochs=oracle_epochs, batch_size=batch_size, seed=seed + 1,
                                 log=log, stage=f"{stage} oracle")
    oracle.eval()
    frozen = [p for p in oracle.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    rec_fn = F.mse_loss if recon == "l2" else F.l1_loss
    history: History = []
    progress = _progress(stage, log, epochs, len(x), batch_size)
    try:
        with seeded(seed):
            opt = torch.optim.Adam(module.parameters(), lr=lr)
            module.train()
            for _ in range(epochs):
                total, seen = 0.0, 0
                for idx in _batches(len(x), batch_size):
                    xb, ab = x[idx], a[idx]
                    z, a_logits = module.encode_logits(xb)
                    rec = rec_fn(module.decode(z, torch.sigmoid(a_logits).detach()), xb)
                    a_prime = ab[torch.randperm(len(idx))]
                    disc = F.binary_cross_entropy_with_logits(oracle(module.decode(z, a_prime)), a_prime)
                    attr = F.binary_cross_entropy_with_logits(a_logits, ab)
                    loss = rec_weight * rec + disc_weight * disc + attr_weight * attr
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, seen = total + loss.item() * len(idx), seen + len(idx)
                    progress.update(loss=total / seen)
                history.append(total / len(x))
        progress.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return finish(module, history)
