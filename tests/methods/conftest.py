"""Small real classifiers trained once per session: a CNN on scikit-learn digits (16×16) and an MLP on
breast cancer (min-max normalised). Self-contained: no dependency on the engine's data or model zoo.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from engine.data.base import ArrayDataset
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.types import QueryBatch


@dataclass
class Task:
    """A trained classifier with its training split as `bundle.reference` and a held-out split."""

    bundle: ModelBundle
    x_test: torch.Tensor
    y_test: torch.Tensor
    kind: str

    @property
    def handle(self) -> ClassifierHandle:
        return self.bundle.classifier

    def with_module(self, module: nn.Module) -> ModelBundle:
        h = self.handle
        handle = ClassifierHandle(module, h.model_id + "-wrapped", h.input_shape, h.class_names, h.value_range)
        return replace(self.bundle, classifier=handle)  # keeps the generator and reference

    def queries(self, n: int, *, offset: int = 0, seed: int = 0) -> QueryBatch:
        """The first n correctly classified test samples from `offset`, each aimed at its second most likely class."""
        with torch.no_grad():
            logits = self.handle.logits(self.x_test)
        ok = (logits.argmax(1) == self.y_test).nonzero().squeeze(1)[offset:offset + n]
        target = logits[ok].topk(2, dim=1).indices[:, 1]
        return QueryBatch(x=self.x_test[ok], target=target, query_id=ok, label=self.y_test[ok], seed=seed)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """These tensors are tiny: intra-op threads only add overhead (and stall badly on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="package", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


def l0(x_cf: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """GC Eq. 9: number of features changed by at least 1e-3, per query [B]."""
    return ((x_cf - x).abs().flatten(1) >= 1e-3).sum(1)


class RowWise(nn.Module):
    """Evaluates `inner` one row at a time: outputs that cannot depend on the batch, not even in the last bit."""

    def __init__(self, inner: nn.Module, encoder: bool = True) -> None:
        super().__init__()
        self.inner = inner
        if encoder and hasattr(inner, "encode"):
            self.encode = lambda x: self._rows(inner.encode, x)

    @staticmethod
    def _rows(fn, *args):
        """fn on each row of its tensor arguments (None passes through); tuple outputs are concatenated per part."""
        if not len(args[0]):
            return fn(*args)
        outs = [fn(*(a if a is None else a[i:i + 1] for a in args)) for i in range(len(args[0]))]
        if isinstance(outs[0], tuple):
            return tuple(None if part[0] is None else torch.cat(part) for part in zip(*outs))
        return torch.cat(outs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(self.inner, x)

    def decode(self, z: torch.Tensor, *a: torch.Tensor) -> torch.Tensor:
        return self._rows(self.inner.decode, z, *a)


class NaNNear(nn.Module):
    """Wraps a classifier and returns NaN logits for inputs near `center`.

    `radius` is an L2 ball; with `include_center=False` the center itself is classified normally, so a
    query at the center turns NaN only once its search moves it.
    """

    def __init__(self, inner: nn.Module, center: torch.Tensor, radius: float, include_center: bool) -> None:
        super().__init__()
        self.inner, self.radius, self.include_center = inner, radius, include_center
        self.register_buffer("center", center.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        d = (x - self.center).flatten(1).norm(dim=1)
        hit = (d <= self.radius) & ((d > 0) | self.include_center)
        return torch.where(hit[:, None], torch.full_like(out, float("nan")), out)


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _mlp(d: int, k: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, k))


def _train(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, seed: int) -> nn.Module:
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(module(x[idx]), y[idx]).backward()
            opt.step()
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _task(name: str, kind: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[str],
          epochs: int, lr: float) -> Task:
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    x_tr, x_te, y_tr, y_te = (torch.as_tensor(a) for a in (x_tr, x_te, y_tr, y_te))
    with one_thread():
        module = _train(module, x_tr, y_tr, epochs=epochs, lr=lr, seed=0)
    handle = ClassifierHandle(module, f"test-{name}", tuple(x.shape[1:]), classes, (0.0, 1.0))
    reference = ArrayDataset(name, x_tr, y_tr, classes, kind)
    return Task(ModelBundle(classifier=handle, reference=reference), x_te, y_te, kind)


@pytest.fixture(scope="session")
def digits() -> Task:
    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    with torch.random.fork_rng():  # seeded layer initialisation, global RNG left as it was
        torch.manual_seed(0)
        module = DigitsCNN()
    return _task("digits", "image", module, x.numpy(), y.numpy(), [str(i) for i in range(10)], epochs=12, lr=3e-3)


@pytest.fixture(scope="session")
def cancer() -> Task:
    data = load_breast_cancer()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    x = (x - x.amin(0)) / (x.amax(0) - x.amin(0))
    y = torch.as_tensor(data.target, dtype=torch.int64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = _mlp(x.shape[1], 2)
    return _task("cancer", "tabular", module, x.numpy(), y.numpy(), list(data.target_names),
                 epochs=60, lr=3e-3)
