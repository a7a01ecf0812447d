"""Models from other frameworks: ONNX graphs (onnx2torch) and skops files of scikit-learn / LightGBM / XGBoost
classifiers (compiled by hummingbird), and the refusal of gradient methods on non-differentiable models."""
from __future__ import annotations

import pickle
import warnings

import pytest
import torch

pytest.importorskip("onnx2torch")
pytest.importorskip("hummingbird.ml")
sio = pytest.importorskip("skops.io")

from engine.data import load_dataset  # noqa: E402
from engine.models.architectures import CNNClassifier  # noqa: E402
from engine.runtime.fleet import resolve_classifier  # noqa: E402
from engine.models.loading import classifier_handle_from_module, load_module  # noqa: E402
from engine.spec import AuditSpec  # noqa: E402
from engine.workflows.preflight import check_fleet  # noqa: E402


@pytest.fixture(scope="module")
def credit():
    return load_dataset("german_credit", "train"), load_dataset("german_credit", "test")


@pytest.fixture(scope="module")
def gbc(credit):
    from sklearn.ensemble import GradientBoostingClassifier

    train, _ = credit
    return GradientBoostingClassifier(n_estimators=20, max_depth=3, random_state=0).fit(train.x.numpy(),
                                                                                       train.y.numpy())


def _probs(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(module(x).double(), dim=-1)


def _export_onnx(model: torch.nn.Module, x: torch.Tensor, path) -> None:
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated, not gone
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def test_onnx_cnn_matches_logits_and_input_gradients(tmp_path):
    torch.manual_seed(0)
    cnn = CNNClassifier(in_channels=1, image_size=16, num_classes=3, width=4, fc_hidden=(16,)).eval()
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    _export_onnx(cnn, x[:2], tmp_path / "cnn.onnx")
    for fmt in ("onnx", "auto"):  # auto: by the .onnx suffix; no `trust` needed
        loaded = load_module(tmp_path / "cnn.onnx", format=fmt)
        torch.testing.assert_close(loaded(x), cnn(x), atol=1e-5, rtol=1e-5)
    grads = []
    for model in (cnn, loaded):
        xg = x.clone().requires_grad_(True)
        model(xg)[:, 1].sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    assert grads[0].abs().sum() > 0
    handle = classifier_handle_from_module(loaded, "cnn", (1, 16, 16), ["a", "b", "c"])
    assert handle.differentiable


def test_onnx_unsupported_operators_are_named(tmp_path):
    from onnx import TensorProto, helper

    # A one-node tree (skl2onnx's TreeEnsembleClassifier) and an operator of an unknown domain.
    tree = helper.make_node(
        "TreeEnsembleClassifier", ["x"], ["label", "probs"], domain="ai.onnx.ml", nodes_treeids=[0],
        nodes_nodeids=[0], nodes_featureids=[0], nodes_values=[0.0], nodes_modes=["LEAF"], nodes_truenodeids=[0],
        nodes_falsenodeids=[0], class_treeids=[0], class_nodeids=[0], class_ids=[1], class_weights=[1.0],
        classlabels_int64s=[0, 1])
    odd = helper.make_node("Frobnicate", ["probs"], ["out"], domain="com.example")
    graph = helper.make_graph([tree, odd], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3),
                                                    helper.make_opsetid("com.example", 1)])
    path = tmp_path / "tree.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match=r"model 't': .*tree\.onnx: onnx2torch cannot convert the ONNX operator\(s\) "
                                         r"\['ai\.onnx\.ml\.TreeEnsembleClassifier \(opset 3\)', "
                                         r"'com\.example\.Frobnicate \(opset 1\)'\].*skops.*format: sklearn"):
        load_module(path, format="onnx", model_id="t")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf\xff" * 3)
    with pytest.raises(ValueError, match=r"junk\.onnx is not an ONNX model"):
        load_module(tmp_path / "junk.onnx", format="onnx")


def test_sklearn_gradient_boosting_from_skops_matches_predict_proba(tmp_path, credit, gbc):
    _, test = credit
    sio.dump(gbc, tmp_path / "gbc.skops")
    for fmt in ("sklearn", "auto"):  # auto: recognised as a skops archive
        module = load_module(tmp_path / "gbc.skops", format=fmt, trust=True)
        torch.testing.assert_close(_probs(module, test.x), torch.as_tensor(gbc.predict_proba(test.x.numpy())),
                                   atol=1e-5, rtol=0)
    handle = classifier_handle_from_module(module, "gbc", test.input_shape, test.class_names)
    assert not handle.differentiable
    torch.testing.assert_close(handle.predict(test.x), torch.as_tensor(gbc.predict(test.x.numpy())))


def test_skops_file_with_untrusted_types_is_refused_without_trust(tmp_path, gbc):
    sio.dump(gbc, tmp_path / "gbc.skops")
    with pytest.raises(ValueError, match=r"model 'g': .*gbc\.skops holds types skops does not trust: "
                                         r"\['sklearn\.tree\._tree\.Tree'\].*`trust: true`"):
        load_module(tmp_path / "gbc.skops", format="sklearn", model_id="g")


def test_sklearn_format_never_unpickles(tmp_path, gbc):
    marker = tmp_path / "ran"

    class Payload:  # unpickling it would create `marker`
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"model\.pkl is not a skops file \(format: sklearn\)\. cfaudit never "
                                         r"unpickles"):
        load_module(path, format="sklearn", trust=True)
    assert not marker.exists()


@pytest.mark.parametrize("library", ["lightgbm", "xgboost"])
def test_boosting_library_end_to_end_through_a_fleet_entry(tmp_path, credit, library):
    """An LGBMClassifier / XGBClassifier saved with skops, named in a spec, resolved like any fleet model."""
    lib = pytest.importorskip(library)
    train, test = credit
    make = lib.LGBMClassifier if library == "lightgbm" else lib.XGBClassifier
    extra = {"verbose": -1} if library == "lightgbm" else {}
    model = make(n_estimators=20, max_depth=3, random_state=0, **extra).fit(train.x.numpy(), train.y.numpy())
    sio.dump(model, tmp_path / "boost.skops")
    spec = AuditSpec.model_validate({
        "output": str(tmp_path / "out"), "dataset": {"name": "german_credit"}, "methods": [{"name": "wachter"}],
        "fleet": [{"id": library, "path": str(tmp_path / "boost.skops"), "format": "sklearn", "trust": True}]})
    handle = resolve_classifier(spec.fleet[0], spec.dataset, log=lambda *_: None)
    assert not handle.differentiable and handle.class_names == test.class_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightGBM: "X does not have valid feature names"
        expected = torch.as_tensor(model.predict_proba(test.x.numpy()), dtype=torch.float64)
    torch.testing.assert_close(handle.probs(test.x).double(), expected, atol=1e-5, rtol=0)


def test_gradient_method_on_a_tree_model_is_refused_at_preflight(tmp_path, credit, gbc):
    _, test = credit
    sio.dump(gbc, tmp_path / "gbc.skops")
    spec = AuditSpec.model_validate({
        "output": str(tmp_path / "out"), "dataset": {"name": "german_credit"}, "methods": [{"name": "wachter"}],
        "fleet": [{"id": "gbc", "path": str(tmp_path / "gbc.skops"), "format": "sklearn", "trust": True}]})
    handle = resolve_classifier(spec.fleet[0], spec.dataset, log=lambda *_: None)
    with pytest.raises(ValueError, match=r"methods\[0\] \(wachter\) cannot run on model 'gbc': Method 'wachter' "
                                         r"follows the classifier's gradients, but model 'gbc' is not "
                                         r"differentiable.*growing_spheres"):
        check_fleet(spec, [handle], test, torch.arange(16), None, None, {})


def test_compiled_model_that_disagrees_with_predict_proba_is_refused(tmp_path, gbc, monkeypatch):
    from engine.models import frameworks

    # Stand-in for a compiler bug (as hummingbird 0.4.12 drops XGBoost's intercept): shift class 1's logit.
    monkeypatch.setattr(frameworks, "xgboost_margin", lambda estimator, k: torch.tensor([0.0, 1.0]))
    sio.dump(gbc, tmp_path / "gbc.skops")
    with pytest.raises(ValueError, match=r"gbc\.skops \(sklearn\.ensemble\._gb\.GradientBoostingClassifier\): the "
                                         r"torch module compiled by hummingbird disagrees with the estimator's "
                                         r"predict_proba \(max gap 0\.\d+ > 0\.0001"):
        load_module(tmp_path / "gbc.skops", format="sklearn", trust=True)


def test_missing_optional_package_is_named(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx2torch", None)  # import fails as if not installed
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ValueError, match=r"format: onnx needs the `onnx2torch` package.*cfaudit\[frameworks\]"):
        load_module(tmp_path / "m.onnx")
