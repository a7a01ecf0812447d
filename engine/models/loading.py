"""Loading of users' models, and the classifier handle check.

Accepted forms. A state dict and an ONNX file run no code from the file; TorchScript, torch.export and pickles
need `trust=True` (`trust: true` on the spec entry), checked from the file's zip listing before anything in it
is deserialised; a skops file needs it only when it holds types skops does not trust:
- a state dict (`torch.save(model.state_dict())`, or a checkpoint dict holding one under `state_dict` /
  `model_state_dict` / `model`) plus a factory `"package.module:callable"` that builds the module; read with
  `torch.load(weights_only=True)`. The factory imports and runs the user's own Python code: naming it in a
  spec trusts that code by construction.
- TorchScript (`torch.jit.save`), loaded with `torch.jit.load`: can execute code from the file (torch's docs
  say so).
- a torch.export program (`torch.export.save`, a `.pt2` archive; TorchScript's successor, which torch 2.14
  deprecates), loaded with `torch.export.load(...).module()`: it unpickles entries of the archive flagged
  `use_pickle` (weights, constants), so a crafted file runs code. Its graph was captured in the mode it was
  exported in, so `.eval()` is not called on it (torch does not support it).
- a full pickled module (`torch.save(model)`), loaded with `torch.load(weights_only=False)`: runs code.
- ONNX (`format: onnx`, or a `.onnx` path), converted by onnx2torch into a differentiable torch module. ONNX is
  a protobuf of operators and tensors, with no executable Python, so it loads without `trust`.
- a scikit-learn / LightGBM / XGBoost (sklearn API) classifier saved with `skops.io.dump` (`format: sklearn`,
  or a skops archive), compiled by hummingbird into a torch module that is not differentiable. skops builds
  only the types it trusts; the types it reports as untrusted are allowed, by name, only with `trust`. A
  pickle or joblib file of an estimator is refused, never unpickled.
ONNX and skops loading is in engine.models.frameworks (optional packages: the `frameworks` extra).
Paths are local paths or fsspec URIs (`s3://...`, `memory://...`).
"""
from __future__ import annotations

import hashlib
import importlib
import io
import logging
import os
import pickle
import warnings
import zipfile
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from engine.models.adapters import describe, input_hint
from engine.models.frameworks import is_skops, load_onnx, load_sklearn, onnx_base_dir
from engine.models.handles import ClassifierHandle

log = logging.getLogger(__name__)

FORMATS = ("auto", "torchscript", "export", "state_dict", "pickle", "onnx", "sklearn")
# Formats whose loading can execute code from the file, as named in messages.
CODE_FORMATS = {"torchscript": "a TorchScript archive", "export": "a torch.export (.pt2) archive",
                "pickle": "a pickle of Python objects (e.g. a whole module saved with torch.save(model))"}
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
PathLike = Union[str, os.PathLike]


def _read_bytes(path: PathLike) -> bytes:
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        import fsspec  # deferred: fsspec loads only for a remote URI

        try:
            with fsspec.open(text, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"Model file not found: {text}") from None
    local = text[len("file://"):] if text.startswith("file://") else text
    if not os.path.isfile(local):
        raise FileNotFoundError(f"Model file not found: {text}")
    with open(local, "rb") as f:
        return f.read()


def archive_kind(data: bytes) -> Optional[str]:
    """"torchscript" (a zip with `<root>/code/`), "export" (a pt2 zip with `<root>/archive_format`),
    "torch_save" (a zip with `<root>/data.pkl`), or None (not a zip: a legacy torch.save file or junk)."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return None
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
    if any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "export"
    if any(n.endswith("data.pkl") for n in names):
        return "torch_save"
    return None


def eval_mode(module: nn.Module) -> nn.Module:
    """module.eval(), except for torch.export modules, which refuse it (their mode is fixed at export)."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


def resolve_factory(factory: Union[str, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    """`"package.module:attr"` (attr may be dotted, e.g. `Class.from_config`) or a callable."""
    if callable(factory):
        return factory
    if not isinstance(factory, str) or ":" not in factory:
        raise ValueError(f"Expected `factory` to be 'package.module:callable' but got {factory!r}")
    mod_name, attr = factory.split(":", 1)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as err:
        raise ValueError(f"Cannot import module {mod_name!r} of factory {factory!r}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Module {mod_name!r} has no attribute {attr!r} (factory {factory!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"Factory {factory!r} is not callable")
    return obj


def _resolve_trust(trust: Optional[bool], allow_pickle: Optional[bool]) -> bool:
    """`trust`, or its deprecated alias `allow_pickle`; both given and different is an error."""
    if trust is not None and allow_pickle is not None and bool(trust) != bool(allow_pickle):
        raise ValueError(f"`trust` ({trust}) and its deprecated alias `allow_pickle` ({allow_pickle}) disagree; "
                         f"give only `trust`")
    return bool(trust if trust is not None else allow_pickle)


def _check_trust(path: PathLike, model_id: Optional[str], kind: str, requested: bool, trust: bool) -> None:
    """Refuse a form that can execute code from the file unless trusted; warn when trusted."""
    if trust:
        log.warning("Loading %s as %s with trust: code from the file may run", os.fspath(path), CODE_FORMATS[kind])
        return
    who = f"model {model_id!r}: " if model_id else ""
    how = f"is to be loaded as {CODE_FORMATS[kind]} (format: {kind})" if requested else \
        f"is {CODE_FORMATS[kind]}"
    raise ValueError(
        f"{who}{os.fspath(path)} {how}, and loading it can execute code from the file. Set `trust: true` on "
        f"this model entry if you trust the file, or re-save it as a state dict (torch.save(model.state_dict(), "
        f"path)) with a factory.")


def _not_a_model(path: PathLike, err: Exception) -> ValueError:
    return ValueError(f"{os.fspath(path)} is not a TorchScript, torch.export or torch.save file "
                      f"({type(err).__name__} while reading it); an ONNX file needs `format: onnx`, a "
                      f"scikit-learn, LightGBM or XGBoost model saved with skops `format: sklearn`")


def _extract_state_dict(obj: Any, path: PathLike) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _CHECKPOINT_KEYS:
            if isinstance(obj.get(key), dict):
                return _extract_state_dict(obj[key], path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"{os.fspath(path)} does not hold a state dict (name -> tensor) but a "
                     f"{type(obj).__name__}; expected torch.save(model.state_dict(), path)")


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: PathLike, factory: Any) -> nn.Module:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(f"{k}: file {tuple(state[k].shape)} vs module {tuple(own[k].shape)}"
                         for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(f"State dict in {os.fspath(path)} does not fit the module built by {factory!r}: "
                         f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}, "
                         f"shape mismatches {wrong_shape[:10]}")
    module.load_state_dict(state)
    return module


def load_module(path: PathLike, *, format: str = "auto", factory: Union[str, Callable, None] = None,
                factory_kwargs: Optional[dict] = None, trust: Optional[bool] = None,
                allow_pickle: Optional[bool] = None, model_id: Optional[str] = None) -> nn.Module:
    """Load a user's model from `path` (see the module docstring for the forms); returned in eval mode on CPU.

    format: "auto" (a `.onnx` path is ONNX, a skops archive is "sklearn"; else by content: TorchScript or
    torch.export archive, else a weights-only torch.save file, which must hold a state dict and needs `factory`,
    else a pickled module), or one of "torchscript", "export", "state_dict", "pickle", "onnx", "sklearn" to
    insist on a form.
    trust: allow the forms that can execute code from the file (TorchScript, torch.export, pickle) and the types
    skops does not trust in a skops file; without it they are refused before anything is deserialised.
    `allow_pickle` is its deprecated alias.
    factory: imported and called, so it is code the spec's author trusts by construction.
    model_id: named in error messages.
    """
    if format not in FORMATS:
        raise ValueError(f"Expected `format` to be one of {list(FORMATS)} but got {format!r}")
    trust = _resolve_trust(trust, allow_pickle)
    data = _read_bytes(path)
    if format == "onnx" or (format == "auto" and os.fspath(path).lower().endswith(".onnx")):
        return load_onnx(data, os.fspath(path), model_id, onnx_base_dir(path))
    if format == "sklearn" or (format == "auto" and is_skops(data)):
        return load_sklearn(data, os.fspath(path), trust, model_id)
    kind = archive_kind(data)
    code_kind = format if format in CODE_FORMATS else (kind if format == "auto" and kind in CODE_FORMATS else None)
    if code_kind is not None:
        _check_trust(path, model_id, code_kind, format != "auto", trust)
    if code_kind == "torchscript":
        try:
            with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; users' files still load
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        except Exception as err:  # noqa: BLE001 - torch raises several types for bad archives
            raise ValueError(f"{os.fspath(path)} is not a loadable TorchScript archive: {err}") from None
    if code_kind == "export":
        try:
            return torch.export.load(io.BytesIO(data)).module()
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{os.fspath(path)} is not a loadable torch.export (.pt2) archive: {err}") from None
    if code_kind == "pickle":
        return _load_pickled(data, path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # A torch.save zip, or a pickle stream (PROTO opcode 0x80: legacy torch.save), that the weights-only
        # unpickler rejects holds globals it does not allow: pickled objects such as a full module.
        if kind == "torch_save" or data[:1] == b"\x80":
            if format == "state_dict":
                raise ValueError(f"{os.fspath(path)} is not a weights-only state dict (format: state_dict): "
                                 f"it is {CODE_FORMATS['pickle']}") from None
            _check_trust(path, model_id, "pickle", False, trust)
            return _load_pickled(data, path)
        raise _not_a_model(path, err) from None
    except Exception as err:  # noqa: BLE001 - torch raises KeyError, RuntimeError, ... for foreign files
        raise _not_a_model(path, err) from None
    if isinstance(obj, nn.Module):  # only reachable through torch's weights_only safelists
        return eval_mode(obj)
    state = _extract_state_dict(obj, path)
    if factory is None:
        raise ValueError(f"{os.fspath(path)} holds a state dict; give a `factory: 'package.module:callable'` "
                         f"(and `factory_kwargs`) that builds the module it belongs to")
    build = resolve_factory(factory)
    try:
        module = build(**(factory_kwargs or {}))
    except TypeError as err:
        raise ValueError(f"Factory {factory!r} rejected factory_kwargs {factory_kwargs}: {err}") from None
    if not isinstance(module, nn.Module):
        raise ValueError(f"Factory {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return _load_into(module, state, path, factory).eval()


def _load_pickled(data: bytes, path: PathLike) -> nn.Module:
    """Unpickle a trusted file (weights_only=False runs code from it)."""
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{os.fspath(path)} unpickled to a {type(obj).__name__}, not a torch.nn.Module")
    return eval_mode(obj)


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def error_line(err: Exception) -> str:
    """The message of `err` without a TorchScript interpreter's serialized traceback (its last line says why)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines and "Traceback of TorchScript" in str(err) else str(err)


def classifier_handle_from_module(module: nn.Module, model_id: str, input_shape: Sequence[int],
                                  class_names: Sequence[str],
                                  value_range: tuple[float, float] = (0.0, 1.0)) -> ClassifierHandle:
    """A ClassifierHandle after one dummy forward proves `module` maps [1, *input_shape] to logits [1, K]."""
    shape = tuple(int(s) for s in input_shape)
    names = [str(c) for c in class_names]
    if not names:
        raise ValueError(f"Model {model_id!r}: expected at least one class name but got {list(class_names)}")
    eval_mode(module)
    lo, hi = float(value_range[0]), float(value_range[1])
    dummy = torch.full((1, *shape), (lo + hi) / 2, device=_module_device(module))
    try:
        with torch.no_grad():
            out = module(dummy)
    except Exception as err:  # noqa: BLE001 - any failure means the shape contract is not met
        raise ValueError(f"Model {model_id!r} failed on a dummy input of shape {[1, *shape]} (the data's "
                         f"input shape): {type(err).__name__}: {error_line(err)}"
                         f"{input_hint(error_line(err), shape)}") from None
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"Model {model_id!r} must return a logits tensor [B, K] but returned {describe(out)}")
    if out.dim() != 2 or out.shape[0] != 1 or out.shape[1] != len(names):
        one_logit = out.dim() == 1 or (out.dim() == 2 and out.shape[1] == 1)
        hint = ("; a binary model with one logit needs `output: sigmoid` on its fleet entry" if one_logit and
                len(names) == 2 else "")
        raise ValueError(f"Model {model_id!r} returned shape {list(out.shape)} for input {[1, *shape]}; expected "
                         f"[1, {len(names)}] logits for class_names {names}{hint}")
    if not torch.isfinite(out).all():
        raise ValueError(f"Model {model_id!r} returned non-finite logits on a dummy input")
    # A module, or any module inside it (e.g. under an input/output adapter), may declare itself
    # non-differentiable (frameworks.TreeLogits); gradient methods are then refused (Method.check_models).
    differentiable = all(getattr(m, "differentiable", True) for m in module.modules())
    return ClassifierHandle(module=module, model_id=model_id, input_shape=shape, class_names=names,
                            value_range=(lo, hi), differentiable=differentiable)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, bytes): the model's identity,
    whether it came from a user's file or the zoo's cache."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{list(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]
