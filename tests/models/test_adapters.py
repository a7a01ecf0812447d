"""A real team's models as they arrive (issue 24): input preprocessing and output heads in a fleet entry.

- A model trained on normalised inputs, given `input: {mean, std}`, yields the counterfactuals of the same model
  with the normalisation folded into its first conv layer (gradual_construction and wachter).
- A one-logit TorchScript model is refused naming `output: sigmoid`, and audited with it.
- Probability, log-probability, tuple and dict heads; resize and crop; channels_last; float64; 0-255 inputs.
- Preflight names the option to set; a spec without the new fields hashes as before.
- End to end through a real local Ray: a normalised user model and a one-logit model in one fleet.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Iterator

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import load_dataset
from engine.data.base import ArrayDataset
from engine.methods import make_method
from engine.models.adapters import ModelAdapter, sigmoid_to_logits
from engine.runtime.fleet import adapt_classifier, resolve_classifier
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.models.loading import classifier_handle_from_module
from engine.spec import AuditSpec, SpecError, parse_spec
from engine.spec.audit import DatasetRef, FleetModel, InputSpec, OutputSpec
from engine.types import QueryBatch
from engine.workflows.preflight import check_classifier
from tests.fixtures.linear import build as build_linear

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

SMALL = {"size": 32, "n_train": 600, "n_test": 100, "seed": 3}  # shapes: binary, 3x32x32 in [0, 1]
MEAN, STD = [0.47, 0.43, 0.46], [0.33, 0.32, 0.33]  # about the per-channel statistics of SMALL's train split


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def train() -> ArrayDataset:
    return load_dataset("shapes", "train", **SMALL)


@pytest.fixture(scope="module")
def held_out() -> ArrayDataset:
    return load_dataset("shapes", "test", **SMALL)


def fit(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int,
        loss=F.cross_entropy) -> nn.Module:
    """A seeded model trained by a few Adam steps on mini-batches: enough for one worth auditing."""
    torch.manual_seed(0)
    module = build()
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (64,))
        opt.zero_grad()
        loss(module(x[idx]), y[idx]).backward()
        opt.step()
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def handle_of(module: nn.Module, data: ArrayDataset, model_id: str = "m", input: InputSpec | None = None,
              output: OutputSpec | None = None) -> ClassifierHandle:
    """What resolve_classifier does with a loaded module: adapt it, then check it on a dummy input."""
    adapted = adapt_classifier(module, input, output, data.input_shape, data.num_classes, model_id)
    return classifier_handle_from_module(adapted, model_id, data.input_shape, data.class_names, data.value_range)


def flip_queries(handle: ClassifierHandle, data: ArrayDataset, n: int) -> QueryBatch:
    """The first n held-out samples, each aimed at the class the model does not predict (shapes is binary)."""
    x = data.x[:n]
    with torch.no_grad():
        pred = handle.logits(x).argmax(1)
    return QueryBatch(x=x, target=1 - pred, query_id=torch.arange(n), label=data.y[:n], seed=0)


# --- the acceptance check: normalisation in the adapter == normalisation folded into the first conv ---------------

class SmallCNN(nn.Module):
    """x [B, 3, 32, 32] -> logits [B, 2]. The first conv has no padding: zero padding does not commute with
    normalisation (a normalised zero is the raw mean), so only an unpadded first layer folds exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 7 * 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.head(F.max_pool2d(F.relu(self.conv2(h)), 2).flatten(1))


def fold_normalisation(model: SmallCNN, mean: list[float], std: list[float]) -> SmallCNN:
    """The same function of raw inputs: w' = w / std[c], b' = b - Σ w·mean[c]/std[c]."""
    folded = copy.deepcopy(model)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    w = model.conv1.weight / s
    folded.conv1.weight.copy_(w)
    folded.conv1.bias.copy_(model.conv1.bias - (w * m).sum((1, 2, 3)))
    return folded


@pytest.fixture(scope="module")
def normalised_pair(train) -> tuple[nn.Module, nn.Module]:
    """A CNN trained on normalised inputs, and its copy with the normalisation folded in (takes [0, 1] data)."""
    m, s = torch.tensor(MEAN).view(1, -1, 1, 1), torch.tensor(STD).view(1, -1, 1, 1)
    model = fit(SmallCNN, (train.x - m) / s, train.y, steps=300)
    return model, fold_normalisation(model, MEAN, STD)


@pytest.mark.parametrize("method, params", [
    ("wachter", {"max_iter": 150}),
    ("gradual_construction", {"sigma": 40, "max_features": 12, "n_reference": 40, "lr": 0.01}),
])
def test_normalised_model_gives_the_counterfactuals_of_its_folded_copy(method, params, normalised_pair, train,
                                                                       held_out):
    """Logits agree to float32 rounding. The searches are compared in float64 (`input.dtype` on both): Adam turns
    last-bit gradient differences into full steps wherever a gradient nearly cancels, and in float32 one query in a
    few then drifts by up to 1e-2. In float64, with GC's lr at 0.01, 23 of 24 seeded models agreed to 1e-6."""
    normalised, folded = normalised_pair
    adapted = handle_of(normalised, train, "normalised", input=InputSpec(mean=MEAN, std=STD))
    plain = handle_of(folded, train, "folded")
    assert isinstance(adapted.module, ModelAdapter) and plain.module is folded  # no option: no wrapper
    with torch.no_grad():
        assert torch.allclose(adapted.logits(held_out.x), plain.logits(held_out.x), atol=1e-5)
        assert (adapted.predict(held_out.x) == held_out.y).float().mean() > 0.8  # a model worth auditing

    adapted = handle_of(copy.deepcopy(normalised), train, "normalised", input=InputSpec(mean=MEAN, std=STD,
                                                                                         dtype="float64"))
    plain = handle_of(copy.deepcopy(folded), train, "folded", input=InputSpec(dtype="float64"))
    q = flip_queries(plain, held_out, 8)
    runs = [make_method(method, params).explain(q, ModelBundle(h, reference=train)) for h in (adapted, plain)]
    assert runs[1].success.float().mean() >= 0.5
    assert torch.equal(runs[0].success, runs[1].success) and torch.equal(runs[0].n_iter, runs[1].n_iter)
    assert torch.allclose(runs[0].x_cf, runs[1].x_cf, atol=1e-4)
    assert torch.allclose(runs[0].p_cf, runs[1].p_cf, atol=1e-4)


# --- a one-logit binary TorchScript model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_logit_file(train, tmp_path_factory) -> str:
    """A binary CNN with one logit, x -> z [B, 1] (trained with BCE), saved as TorchScript."""
    def one_logit() -> nn.Module:
        model = SmallCNN()
        model.head = nn.Linear(model.head.in_features, 1)
        return model

    model = fit(one_logit, train.x, train.y, steps=300,
                loss=lambda z, y: F.binary_cross_entropy_with_logits(z[:, 0], y.float()))
    path = str(tmp_path_factory.mktemp("single") / "single-logit.pt")
    torch.jit.save(torch.jit.trace(model, train.x[:2]), path)
    return path


def test_one_logit_torchscript_model_is_refused_naming_output_sigmoid(single_logit_file):
    entry = FleetModel(id="single-logit", path=single_logit_file, trust=True)
    with pytest.raises(ValueError, match=r"Model 'single-logit' returned shape \[1, 1\] for input \[1, 3, 32, 32\]; "
                                         r"expected \[1, 2\] logits .*needs `output: sigmoid` on its fleet entry"):
        resolve_classifier(entry, DatasetRef(name="shapes", options=SMALL), log=lambda *_: None)


def test_one_logit_torchscript_model_is_audited_with_output_sigmoid(single_logit_file, held_out):
    entry = FleetModel(id="single-logit", path=single_logit_file, trust=True, output="sigmoid")
    handle = resolve_classifier(entry, DatasetRef(name="shapes", options=SMALL), log=lambda *_: None)
    raw = torch.jit.load(single_logit_file)
    with torch.no_grad():
        p = torch.sigmoid(raw(held_out.x[:20])[:, 0])
        assert torch.allclose(handle.probs(held_out.x[:20]), torch.stack([1 - p, p], 1), atol=1e-6)
        assert (handle.predict(held_out.x) == held_out.y).float().mean() > 0.8
    q = flip_queries(handle, held_out, 6)
    cf = make_method("wachter", {"max_iter": 300}).explain(q, ModelBundle(handle))
    assert cf.success.all()
    assert torch.equal(cf.p_cf.argmax(1), q.target)


def test_sigmoid_head_is_exact_and_keeps_gradients():
    z = torch.tensor([-3.0, 0.0, 2.5], requires_grad=True)
    logits = sigmoid_to_logits(z[:, None])
    assert torch.allclose(torch.softmax(logits, 1)[:, 1], torch.sigmoid(z))
    logits[:, 1].sum().backward()
    assert torch.equal(z.grad, torch.ones(3))
    with pytest.raises(ValueError, match=r"output: sigmoid expects one logit per sample, \[B\] or \[B, 1\], but the "
                                         r"model returned shape \[3, 2\]"):
        sigmoid_to_logits(torch.zeros(3, 2))


# --- output heads --------------------------------------------------------------------------------------------------

class Head(nn.Module):
    """A linear classifier whose output is wrapped the way some teams' models return it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.kind = build_linear(), kind

    def forward(self, x: torch.Tensor):
        z = self.inner(x)
        if self.kind == "probabilities":
            return torch.softmax(z, 1)
        if self.kind == "log_probabilities":
            return torch.log_softmax(z, 1)
        if self.kind == "tuple":
            return x.flatten(1)[:, :4], z
        if self.kind == "dict":
            return {"features": x.flatten(1)[:, :4], "logits": z}
        return z


@pytest.mark.parametrize("kind, output", [
    ("probabilities", OutputSpec(kind="probabilities")),
    ("log_probabilities", OutputSpec(kind="log_probabilities")),
    ("tuple", OutputSpec(index=1)),
    ("tuple", OutputSpec(index=-1)),
    ("dict", OutputSpec(key="logits")),
])
def test_output_heads_give_the_models_probabilities(kind, output, train):
    model = Head(kind).eval()
    handle = handle_of(model, train, output=output)
    x = train.x[:16].requires_grad_(True)
    expected = torch.softmax(model.inner(x), 1)
    assert torch.allclose(torch.softmax(handle.logits(x), 1), expected, atol=1e-6)
    handle.logits(x)[:, 0].sum().backward()  # gradients reach the input through every head
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind, output, match", [
    ("tuple", None, r"returned a tuple of 2 entries \(\[1, 4\], \[1, 2\]\); set `output\.index` on its fleet entry"),
    ("dict", None, r"returned a dict with keys \{'features': '\[1, 4\]', 'logits': '\[1, 2\]'\}; set `output\.key`"),
    ("dict", OutputSpec(key="logit"), r"output\.key 'logit' is not one of the model's outputs \['features', "
                                      r"'logits'\]"),
    ("tuple", OutputSpec(index=2), r"output\.index 2 is out of range for the model's 2 outputs"),
    ("tuple", OutputSpec(key="logits"), r"output\.key 'logits' needs a dict output, but the model returned a "
                                        r"tuple of 2 entries"),
])
def test_output_selection_errors_name_the_field(kind, output, match, train):
    with pytest.raises(ValueError, match=match):
        handle_of(Head(kind).eval(), train, output=output)


def test_probabilities_without_output_warn_at_preflight(train, held_out, caplog):
    ids = torch.arange(16)
    undeclared = handle_of(Head("probabilities").eval(), train, "probs")
    with caplog.at_level(logging.WARNING, logger="engine.workflows.preflight"):
        check_classifier(undeclared, held_out, ids, "flip")
    assert "model 'probs': its outputs on 16 shapes queries all lie in [0, 1] and sum to 1 per row" in caplog.text
    assert "set `output: probabilities` on its fleet entry" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine.workflows.preflight"):
        for handle in (handle_of(Head("probabilities").eval(), train, output=OutputSpec(kind="logits")),  # said so
                       handle_of(Head("probabilities").eval(), train, output=OutputSpec(kind="probabilities")),
                       handle_of(Head("logits").eval(), train)):
            check_classifier(handle, held_out, ids, "flip")
    assert caplog.text == ""


# --- input preprocessing -------------------------------------------------------------------------------------------

class Net32(nn.Module):
    """A classifier of 1x32x32 images (its linear layer fixes the size), for 28x28 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def digits() -> tuple[ArrayDataset, ArrayDataset]:
    return load_dataset("digits", "train", size=28), load_dataset("digits", "test", size=28)


def test_size_feeds_28px_data_to_a_model_trained_at_32px(digits):
    train28, test28 = digits
    up = lambda x: F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)  # noqa: E731
    model = fit(Net32, up(train28.x), train28.y, steps=150)
    with pytest.raises(ValueError, match=r"Model 'net32' failed on a dummy input of shape \[1, 1, 28, 28\].*mat1 and "
                                         r"mat2 shapes cannot be multiplied.*set `input\.size` \(and `input\.crop`\)"):
        handle_of(model, train28, "net32")
    handle = handle_of(model, train28, "net32", input=InputSpec(size=32))
    with torch.no_grad():
        assert torch.allclose(handle.logits(test28.x), model(up(test28.x)), atol=1e-6)
        assert (handle.predict(test28.x) == test28.y).float().mean() > 0.8
    # Resize to 36 then a centre crop of 32: what a torchvision Resize + CenterCrop pipeline feeds the model.
    cropped = handle_of(model, train28, "net32", input=InputSpec(size=[36, 36], crop=32))
    with torch.no_grad():
        big = F.interpolate(test28.x[:8], size=(36, 36), mode="bilinear", align_corners=False, antialias=False)
        assert torch.allclose(cropped.logits(test28.x[:8]), model(big[..., 2:34, 2:34]), atol=1e-6)


class NHWC(nn.Module):
    """A model that takes [B, H, W, C] images (as Keras- or JAX-born models do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = SmallCNN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def test_channels_last_feeds_nhwc_models(train):
    model = NHWC().eval()
    with pytest.raises(ValueError, match=r"expected input\[1, 32, 3, 32\] to have 3 channels.*set "
                                         r"`input\.channels_last: true` on its fleet entry"):
        handle_of(model, train)
    handle = handle_of(model, train, input=InputSpec(channels_last=True))
    with torch.no_grad():
        assert torch.equal(handle.logits(train.x[:8]), model.inner(train.x[:8]))
    # A model of grey images reads the channel axis rightly: no input option can help, none is suggested.
    with pytest.raises(ValueError, match=r"expected input\[1, 3, 32, 32\] to have 1 channels") as refused:
        handle_of(nn.Conv2d(1, 2, 32).eval(), train)
    assert "channels_last" not in str(refused.value)


def test_dtype_float64_runs_the_model_in_double_and_returns_float32(train):
    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    with pytest.raises(ValueError, match=r"set `input\.dtype` to their precision on its fleet entry"):
        handle_of(model, train)
    handle = handle_of(model, train, input=InputSpec(dtype="float64"))
    x = train.x[:8].clone().requires_grad_(True)
    logits = handle.logits(x)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, model(x.double()).float(), atol=1e-6)
    logits[:, 1].sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_scale_255_feeds_models_trained_on_0_to_255_pixels(train):
    class Bytes(nn.Module):  # trained on 0-255 pixels with torchvision's ImageNet-style 0-255 statistics
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.inner = build_linear()

        def forward(self, x):
            return self.inner((x - 120.0) / 80.0)

    model = Bytes().eval()
    handle = handle_of(model, train, input=InputSpec(scale=255))
    with torch.no_grad():
        assert torch.allclose(handle.logits(train.x[:8]), model(train.x[:8] * 255), atol=1e-5)
    # scale first, then normalise in the model's units: the same function as the model's own normalisation.
    both = handle_of(model.inner, train, input=InputSpec(scale=255, mean=120.0, std=80.0))
    with torch.no_grad():
        assert torch.allclose(both.logits(train.x[:8]), model(train.x[:8] * 255), atol=1e-5)


def test_builtin_model_takes_the_options_too(tmp_path):
    dataset = DatasetRef(name="shapes", options={**SMALL, "n_train": 200})
    train_entry = {"arch": "mlp", "epochs": 1}
    quiet = lambda *_: None  # noqa: E731
    plain = resolve_classifier(FleetModel(id="mlp", train=train_entry), dataset, str(tmp_path), log=quiet)
    double = resolve_classifier(FleetModel(id="mlp64", train=train_entry, input={"dtype": "float64"},
                                           output="logits"), dataset, str(tmp_path), log=quiet)
    assert isinstance(double.module, ModelAdapter) and not isinstance(plain.module, ModelAdapter)
    x = load_dataset("shapes", "test", **SMALL).x[:16]
    with torch.no_grad():
        assert torch.allclose(double.logits(x), plain.logits(x), atol=1e-5)


# --- validation ----------------------------------------------------------------------------------------------------

def _spec(**entry) -> dict:
    return {"output": "memory://adapters", "dataset": {"name": "shapes", "options": SMALL},
            "fleet": [{"id": "m", "path": "m.pt", "factory": "tests.fixtures.linear:build", **entry}],
            "methods": [{"name": "wachter"}]}


@pytest.mark.parametrize("entry, match", [
    ({"input": {"std": [0.3, 0.0, 0.3]}}, r"fleet\[0\]\.input\.std: every std must be > 0"),
    ({"input": {"mean": []}}, r"fleet\[0\]\.input\.mean: expected one finite value or one per channel"),
    ({"input": {"size": [32, 32, 3]}}, r"fleet\[0\]\.input\.size: expected a positive int or \[H, W\]"),
    ({"input": {"crop": 0}}, r"fleet\[0\]\.input\.crop: expected a positive int or \[H, W\]"),
    ({"input": {"scale": 0}}, r"fleet\[0\]\.input\.scale: Input should be greater than 0"),
    ({"input": {"dtype": "int8"}}, r"fleet\[0\]\.input\.dtype: Input should be 'float32', 'float16', 'bfloat16'"),
    ({"output": "softmax"}, r"fleet\[0\]\.output\.kind: Input should be 'logits', 'probabilities'"),
    ({"output": {"index": 0, "key": "logits"}}, r"fleet\[0\]\.output: give `index` .* or `key` .*, not both"),
])
def test_spec_errors_name_the_field(entry, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(AuditSpec, _spec(**entry))


@pytest.mark.parametrize("shape, input, output, classes, match", [
    ((3, 32, 32), InputSpec(mean=[0.5, 0.5]), None, 2,
     r"model 'm': input\.mean has 2 values, but the data has 3 channels \[3, 32, 32\]; give one value or 3"),
    ((3, 32, 32), InputSpec(std=[0.2] * 4), None, 2, r"input\.std has 4 values, but the data has 3 channels"),
    ((30,), InputSpec(size=32), None, 2, r"input\.size needs image data \[C, H, W\], but the data's inputs are \[30\]"),
    ((30,), InputSpec(channels_last=True), None, 2, r"input\.channels_last needs image data \[C, H, W\]"),
    ((3, 32, 32), InputSpec(crop=40), None, 2, r"input\.crop \[40, 40\] is larger than the image it crops, "
                                               r"\[32, 32\] \(the data\)"),
    ((3, 32, 32), None, OutputSpec(kind="sigmoid"), 3, r"output: sigmoid is a binary head .* the data has 3 classes"),
])
def test_options_are_checked_against_the_data(shape, input, output, classes, match):
    with pytest.raises(ValueError, match=match):
        adapt_classifier(nn.Identity(), input, output, shape, classes, "m")


def test_per_feature_normalisation_of_tabular_data():
    """On [F] inputs the 'channel' is the feature: mean and std may give one value per feature."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    adapted = ModelAdapter(model, (3,), 2, mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 8.0])
    x = torch.rand(4, 3)
    with torch.no_grad():
        assert torch.allclose(adapted(x), model((x - torch.tensor([1.0, 2.0, 3.0])) / torch.tensor([2.0, 4.0, 8.0])))


def test_spec_hash_is_unchanged_without_the_new_fields():
    plain = parse_spec(AuditSpec, _spec())
    assert "input" not in plain.model_dump()["fleet"][0] and "output" not in plain.model_dump()["fleet"][0]
    assert AuditSpec.model_validate(plain.model_dump(mode="json")) == plain  # the host's copy round-trips
    assert parse_spec(AuditSpec, _spec(input=None, output=None)).spec_hash() == plain.spec_hash()
    adapted = parse_spec(AuditSpec, _spec(input={"mean": 0.5}, output="sigmoid"))
    assert adapted.spec_hash() != plain.spec_hash()
    assert adapted.fleet[0].output == OutputSpec(kind="sigmoid")  # the string shorthand
    assert AuditSpec.model_validate(adapted.model_dump(mode="json")) == adapted


# --- end to end through Ray ----------------------------------------------------------------------------------------

@pytest.mark.ray
def test_audit_of_a_normalised_and_a_one_logit_model_through_ray(tmp_path, local_ray):
    from engine.store.results import result_files
    from engine.workflows.audit import audit
    from tests.fixtures.zoo import SHAPES

    torch.manual_seed(0)
    torch.save(build_linear().state_dict(), tmp_path / "normed.pt")
    torch.save(build_linear(classes=1).state_dict(), tmp_path / "one.pt")
    spec = {
        "name": "adapters", "output": str(tmp_path / "out"), "dataset": {"name": "shapes", "options": dict(SHAPES)},
        "fleet": [{"id": "normed", "path": str(tmp_path / "normed.pt"), "factory": "tests.fixtures.linear:build",
                   "input": {"mean": MEAN, "std": STD}},
                  {"id": "one-logit", "path": str(tmp_path / "one.pt"), "factory": "tests.fixtures.linear:build",
                   "factory_kwargs": {"classes": 1}, "output": "sigmoid"}],
        "queries": {"count": 10, "seed": 0}, "targets": "flip",
        "methods": [{"name": "wachter", "params": {"max_iter": 100, "lam": 0.001}}],  # weak random models
        "runtime": {"batch_size": 5, "num_actors": 1, "num_cpus_per_actor": 1, "max_retries": 0},
        "metrics": {"fid": {"extractor": "none"}, "deletion_steps": 0, "bootstrap_samples": 10},
    }
    parsed = parse_spec(AuditSpec, spec)
    result = audit(parsed, log=lambda *_: None, progress=False)
    assert result.units_done == 4 and not result.units_failed
    rows = pl.read_parquet(result_files(spec["output"])).sort("model_id", "query_id")
    assert rows.height == 20
    valid = rows.filter(pl.col("success")).group_by("model_id").len()
    assert dict(valid.iter_rows()) == {"normed": 10, "one-logit": 10}
    # The hosts applied the same adapters as the driver: their probabilities are those of the adapted models.
    x = load_dataset("shapes", "test", **SHAPES).x
    for entry in parsed.fleet:
        handle = resolve_classifier(entry, parsed.dataset, log=lambda *_: None)
        mine = rows.filter(pl.col("model_id") == entry.id)
        ids = torch.tensor(mine["query_id"].to_list())
        expected = handle.probs(x[ids]).max(1).values
        assert torch.allclose(torch.tensor(mine["p_orig_pred"].to_list()), expected, atol=1e-5)
