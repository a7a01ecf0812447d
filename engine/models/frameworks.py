"""Models from other frameworks as torch classifiers: ONNX graphs and scikit-learn-API estimators.

- ONNX (`format: onnx`): the graph is rebuilt from standard ONNX operators as a torch.fx module by `onnx2torch`,
  so it is differentiable and every gradient method runs on it. An ONNX file holds no executable Python.
  ONNX-ML operators (`ai.onnx.ml`: TreeEnsembleClassifier, ... as skl2onnx writes them) are refused: onnx2torch
  has no converter for them, and hummingbird's ONNX-ML frontend drops TreeEnsembleClassifier's `base_values`
  (a GradientBoostingClassifier's prior), giving probabilities off by up to 0.2 on German credit.
- scikit-learn, LightGBM and XGBoost (sklearn API) estimators (`format: sklearn`): read from a skops file, which
  is never unpickled: skops builds only the types it trusts, plus those it reports as untrusted when the user set
  `trust: true`. `hummingbird.ml.convert(estimator, "torch")` compiles the estimator to batched tensor ops;
  `TreeLogits` turns its probabilities into logits (adding back the XGBoost intercept hummingbird drops), and
  the result must match the estimator's predict_proba on random rows or the file is refused. Such a module is
  not differentiable: trees are piecewise constant and hummingbird's executor runs under `torch.no_grad`.

The packages are optional (`pip install 'cfaudit[frameworks]'`) and imported only by the loader that needs them.
"""
from __future__ import annotations

import importlib
import io
import json
import logging
import math
import os
import warnings
import zipfile
from typing import Any, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

PROB_FLOOR = 1e-12  # log(0) would give -inf logits; a probability this small is "never" for every method


def _require(module: str, package: str, fmt: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"format: {fmt} needs the `{package}` package, which is not installed; install "
                         f"cfaudit's `frameworks` extra (pip install 'cfaudit[frameworks]')") from None


def _who(model_id: Optional[str]) -> str:
    return f"model {model_id!r}: " if model_id else ""


def is_skops(data: bytes) -> bool:
    """A skops archive: a zip whose root holds `schema.json`."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return "schema.json" in zf.namelist()


class TreeLogits(nn.Module):
    """x [B, *input_shape] -> logits [B, K] = log(max(p, 1e-12)) + margin over a hummingbird-compiled estimator,
    whose forward gives (labels [B], probabilities [B, K]) without autograd. margin [K]: an intercept the
    compiler left out (see xgboost_margin); zeros otherwise."""

    differentiable = False  # read by classifier_handle_from_module (ClassifierHandle.differentiable)

    def __init__(self, compiled: nn.Module, estimator: str, margin: torch.Tensor) -> None:
        super().__init__()
        self.compiled, self.estimator = compiled, estimator
        self.register_buffer("margin", margin.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.compiled(x.flatten(1))
        probs = out[-1] if isinstance(out, (tuple, list)) else out
        return torch.log(probs.float().clamp_min(PROB_FLOOR)) + self.margin


def xgboost_margin(estimator: Any, num_classes: int) -> torch.Tensor:
    """The intercept hummingbird 0.4.12 drops from an XGBClassifier, as a logit shift [K].

    XGBoost >= 2 estimates `base_score` from the training labels; hummingbird's classifier converter assumes
    0.5 (margin 0). Binary logistic: base_score is a probability, so class 1's logit moves by logit(base_score);
    multi-class: base_score holds one margin per class. Other estimators and objectives: zeros (the fidelity
    check in load_sklearn still compares the result with predict_proba)."""
    zeros = torch.zeros(num_classes, dtype=torch.float64)
    if type(estimator).__module__.split(".")[0] != "xgboost":
        return zeros
    config = json.loads(estimator.get_booster().save_config())["learner"]
    values = [float(v) for v in str(config["learner_model_param"]["base_score"]).strip("[]").split(",")]
    objective = config["objective"]["name"]
    if objective == "binary:logistic" and num_classes == 2 and len(values) == 1 and 0 < values[0] < 1:
        return torch.tensor([0.0, math.log(values[0] / (1 - values[0]))], dtype=torch.float64)
    if objective.startswith("multi:") and len(values) == num_classes:
        return torch.tensor(values, dtype=torch.float64)
    return zeros


def check_fidelity(module: nn.Module, estimator: Any, where: str, tol: float = 1e-4, n: int = 64) -> None:
    """Refuse a compiled module whose probabilities differ from the estimator's predict_proba by more than `tol`
    on `n` seeded uniform [0, 1] rows (the range of cfaudit's tabular encodings)."""
    width = getattr(estimator, "n_features_in_", None)
    if width is None:
        return
    x = torch.rand(n, int(width), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = torch.softmax(module(x).double(), dim=-1)
    with warnings.catch_warnings():  # e.g. LightGBM: "X does not have valid feature names"
        warnings.simplefilter("ignore")
        theirs = torch.as_tensor(estimator.predict_proba(x.numpy()), dtype=torch.float64)
    gap = float((ours - theirs).abs().max()) if ours.shape == theirs.shape else float("inf")
    if not gap <= tol:
        raise ValueError(f"{where}: the torch module compiled by hummingbird disagrees with the estimator's "
                         f"predict_proba (max gap {gap:.3g} > {tol:g} on {n} random rows); refusing to audit a "
                         f"model other than the one saved")


def load_sklearn(data: bytes, path: str, trust: bool, model_id: Optional[str] = None) -> nn.Module:
    """A skops file of a scikit-learn-API classifier, compiled by hummingbird, as a TreeLogits module."""
    who = _who(model_id)
    if not is_skops(data):
        raise ValueError(
            f"{who}{path} is not a skops file (format: sklearn). cfaudit never unpickles a pickle or joblib file; "
            f"save the estimator with skops.io.dump(model, path) (pip install skops)")
    sio = _require("skops.io", "skops", "sklearn")
    try:
        untrusted = sorted(sio.get_untrusted_types(data=data))
    except Exception as err:  # noqa: BLE001 - skops raises several types for a damaged archive
        raise ValueError(f"{who}{path} is not a readable skops file: {type(err).__name__}: {err}") from None
    if untrusted and not trust:
        raise ValueError(
            f"{who}{path} holds types skops does not trust: {untrusted}. Loading builds them from the file; set "
            f"`trust: true` on this model entry if you trust the file (only these types are then allowed)")
    if untrusted:
        log.warning("Loading %s with trust: allowing the types %s", path, untrusted)
    try:
        estimator = sio.loads(data, trusted=untrusted or None)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{who}{path} is not a loadable skops file: {type(err).__name__}: {err}") from None
    name = f"{type(estimator).__module__}.{type(estimator).__name__}"
    if not hasattr(estimator, "predict_proba") or getattr(estimator, "classes_", None) is None:
        raise ValueError(f"{who}{path} holds a {name} with no predict_proba or classes_; expected a fitted "
                         f"classifier")
    hummingbird = _require("hummingbird.ml", "hummingbird-ml", "sklearn")
    try:
        compiled = hummingbird.convert(estimator, "torch")
    except Exception as err:  # noqa: BLE001 - MissingConverter, RuntimeError, ... for unsupported estimators
        raise ValueError(f"{who}hummingbird cannot compile the {name} in {path} to torch: "
                         f"{type(err).__name__}: {err}") from None
    module = TreeLogits(compiled.model, name, xgboost_margin(estimator, len(estimator.classes_))).eval()
    check_fidelity(module, estimator, f"{who}{path} ({name})")
    return module


def _op_name(domain: str, op_type: str) -> str:
    return f"{domain}.{op_type}" if domain not in ("", "ai.onnx") else op_type


def unsupported_ops(model: Any) -> list[str]:
    """The graph's operators onnx2torch has no converter for at the model's opset, e.g. ['ai.onnx.ml.Scaler']."""
    from onnx2torch.node_converters.registry import get_converter  # deferred: the optional extra `frameworks`

    opsets = {o.domain: o.version for o in model.opset_import}
    missing = set()
    for node in model.graph.node:
        version = opsets.get(node.domain)  # as onnx2torch.convert looks it up
        try:
            if version is None:
                raise NotImplementedError
            get_converter(operation_type=node.op_type, version=version, domain=node.domain)
        except NotImplementedError:
            missing.add(f"{_op_name(node.domain, node.op_type)} (opset {version})")
    return sorted(missing)


def load_onnx(data: bytes, path: str, model_id: Optional[str] = None, base_dir: Optional[str] = None) -> nn.Module:
    """An ONNX model as a torch.fx module (onnx2torch). base_dir: where a local file's external data lies."""
    who = _who(model_id)
    onnx = _require("onnx", "onnx", "onnx")
    _require("onnx2torch", "onnx2torch", "onnx")
    from onnx2torch import convert  # deferred: the optional extra `frameworks`

    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ValueError(f"{who}{path} is not an ONNX model ({type(err).__name__} while parsing it)") from None
    if not len(model.graph.node):
        raise ValueError(f"{who}{path} is not an ONNX model (its graph has no nodes)")
    if base_dir is not None:
        from onnx.external_data_helper import load_external_data_for_model  # deferred: the optional extra `frameworks`

        load_external_data_for_model(model, base_dir)
    missing = unsupported_ops(model)
    if missing:
        tree = any(m.startswith("ai.onnx.ml.") for m in missing)
        hint = (" ONNX-ML models (e.g. skl2onnx's TreeEnsembleClassifier) cannot be compiled faithfully: save the "
                "estimator with skops.io.dump and use format: sklearn." if tree else "")
        raise ValueError(f"{who}{path}: onnx2torch cannot convert the ONNX operator(s) {missing}.{hint}")
    inputs = {i.name for i in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in inputs]
    if len(graph_inputs) != 1:
        raise ValueError(f"{who}{path}: expected an ONNX graph with one input (x [B, *input_shape]) but it has "
                         f"{graph_inputs}")
    try:
        module = convert(model)
    except Exception as err:  # noqa: BLE001 - converters raise NotImplementedError for unsupported attributes
        raise ValueError(f"{who}{path}: onnx2torch cannot convert the graph: {type(err).__name__}: {err}") from None
    return module.eval()


def onnx_base_dir(path: str) -> Optional[str]:
    """The folder of a local ONNX file (external tensor data lies beside it); None for a remote URI."""
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        return None
    local = text[len("file://"):] if text.startswith("file://") else text
    return os.path.dirname(os.path.abspath(local))
