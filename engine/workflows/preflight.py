"""Checks a job runs on the driver before any expensive or visible work: whose output it is, whether the
data is usable, whether every model and method fits the data. Each error names the culprit and what was
expected; nothing here writes anything."""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from engine.data.base import ArrayDataset
from engine.explain import bundle_for
from engine.methods import make_method
from engine.models.adapters import declared_output, input_hint, looks_like_probabilities
from engine.models.handles import ClassifierHandle, GeneratorHandle, ModelBundle
from engine.models.loading import error_line
from engine.store.commit import read_record
from engine.store.uri import exists, join
from engine.targets import resolve_targets

PROBE_QUERIES = 16  # queries each classifier sees in the dry run: enough to catch NaN, cheap for any model
log = logging.getLogger(__name__)


def check_claim(directory: str, marker: str, spec: Any, what: str) -> None:
    """Refuse early (before training) when `directory` holds another spec's `what`; the marker is written
    later by `stages.claim_directory`, once the job is known to be runnable."""
    uri = join(directory, marker)
    if spec.overwrite or not exists(uri):
        return
    previous = read_record(uri, "job record")
    if previous.get("spec_hash") != spec.spec_hash():
        raise ValueError(f"{directory!r} holds {what} of a different spec ({previous.get('name')!r}, hash "
                         f"{previous.get('spec_hash')}); choose another output or set `overwrite: true`")


def _rows(mask: torch.Tensor, limit: int = 5) -> list[int]:
    return mask.nonzero().flatten()[:limit].tolist()


def check_dataset(data: ArrayDataset, split: str) -> None:
    """Finite values and labels inside the class range, naming the first offending samples."""
    where = f"dataset {data.name!r} ({split} split)"
    if len(data) == 0:
        raise ValueError(f"{where}: holds no samples")
    finite = torch.isfinite(data.x.flatten(1)).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{where}: {int((~finite).sum())} sample(s) hold NaN or inf values, e.g. rows "
                         f"{_rows(~finite)}; expected finite {data.kind} values in {list(data.value_range)}")
    check_labels(data.y, data.class_names, where)


def check_labels(labels: torch.Tensor, classes: list[str], where: str) -> None:
    """Every label inside [0, len(classes)), naming the first offending rows."""
    bad = (labels < 0) | (labels >= len(classes))
    if bool(bad.any()):
        raise ValueError(f"{where}: {int(bad.sum())} label(s) outside [0, {len(classes)}) for classes "
                         f"{classes}, e.g. rows {_rows(bad)} with labels {labels[bad][:5].tolist()}")


def check_split(source: Any, split: str, query_ids: torch.Tensor, block_rows: int = 1024) -> None:
    """check_dataset for a split read on demand (engine.data.source): every label, and the values of the
    query rows read in blocks of `block_rows` (an in-memory split is checked whole, as before)."""
    if not source.streaming:
        check_dataset(source.data, split)
        return
    where = f"dataset {source.name!r} ({split} split)"
    if len(source) == 0:
        raise ValueError(f"{where}: holds no samples")
    check_labels(source.labels, source.info.class_names, where)
    bad_rows: list[int] = []
    for start in range(0, len(query_ids), block_rows):
        ids = query_ids[start:start + block_rows]
        finite = torch.isfinite(source.take(ids).x.flatten(1)).all(1)
        bad_rows += ids[~finite].tolist()
    if bad_rows:
        raise ValueError(f"{where}: {len(bad_rows)} queried sample(s) hold NaN or inf values, e.g. rows "
                         f"{bad_rows[:5]}; expected finite {source.info.kind} values in "
                         f"{list(source.info.value_range)}")


def check_classifier(handle: ClassifierHandle, data: ArrayDataset, query_ids: torch.Tensor,
                     targets: Any) -> None:
    """A dry run on a few real queries: the logits' shape, their finiteness, and that targets resolve."""
    ids = query_ids[:PROBE_QUERIES]
    x = data.x[ids].to(next(iter(handle.module.parameters()), torch.empty(0)).device)
    name = f"model {handle.model_id!r}"
    try:
        with torch.no_grad():
            logits = handle.logits(x)
    except Exception as err:
        raise ValueError(f"{name} failed on {len(ids)} {data.name} queries of shape {list(x.shape)}: "
                         f"{type(err).__name__}: {error_line(err)}"
                         f"{input_hint(error_line(err), data.input_shape)}") from None
    expected = [len(ids), data.num_classes]
    if not isinstance(logits, torch.Tensor) or list(logits.shape) != expected:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} returned logits of shape {shape} on {len(ids)} queries; expected {expected} "
                         f"for {data.name}'s {data.num_classes} classes {data.class_names}")
    finite = torch.isfinite(logits).all(1)
    if not bool(finite.all()):
        raise ValueError(f"{name} returned NaN or inf logits on query ids {ids[~finite][:5].tolist()}; "
                         "expected finite logits for every query")
    # A warning, not an error: softmax is monotone, so predictions (and whether a counterfactual flips them)
    # are the same either way, and logits may lie in the simplex by chance; declaring `output: logits` silences it.
    if declared_output(handle.module) is None and looks_like_probabilities(logits):
        log.warning("%s: its outputs on %d %s queries all lie in [0, 1] and sum to 1 per row: probabilities, "
                    "not logits? If so, set `output: probabilities` on its fleet entry (else probabilities and "
                    "confidence thresholds are measured on a softmax of probabilities); `output: logits` says "
                    "they are logits", name, len(ids), data.name)
    try:
        resolve_targets(logits, targets)
    except ValueError as err:
        raise ValueError(f"{err} ({name})") from None


def check_generator(generator: GeneratorHandle, input_shape: tuple[int, ...]) -> None:
    """The generator's samples must have the classifier's input shape."""
    joint = generator.joint() if generator.attribute_names else generator
    z = torch.zeros(1, joint.latent_dim, device=next(iter(generator.module.parameters()), torch.empty(0)).device)
    try:
        with torch.no_grad():
            x = joint.decode(z)
    except Exception as err:
        raise ValueError(f"generator {generator.model_id!r} failed to decode a latent of size {joint.latent_dim}: "
                         f"{type(err).__name__}: {error_line(err)}") from None
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"generator {generator.model_id!r} decodes to shape {list(x.shape[1:])}, but the "
                         f"classifiers take {list(input_shape)}")


def check_methods(entries: list[Any], bundle: ModelBundle) -> None:
    """Each method's own requirements (an encoder, attribute-informed latent, an explainer, ...)."""
    for i, entry in enumerate(entries):
        method = make_method(entry.name, entry.params)
        try:
            method.check_models(bundle_for(method, bundle))
        except ValueError as err:
            raise ValueError(f"methods[{i}] ({entry.name}) cannot run on model "
                             f"{bundle.classifier.model_id!r}: {err}") from None


def check_fleet(spec: Any, handles: list[ClassifierHandle], data: ArrayDataset, query_ids: torch.Tensor,
                generator: Optional[GeneratorHandle], oracle: Optional[ClassifierHandle],
                explainers: dict[str, Any]) -> None:
    """Every model against the data and every method, before Ray starts or a shard is written.
    `spec` has `targets` and `methods` (an audit) or `method` (a sweep)."""
    if generator is not None:
        check_generator(generator, data.input_shape)
    entries = list(spec.methods) if hasattr(spec, "methods") else [spec.method]
    for handle in handles:
        check_classifier(handle, data, query_ids, spec.targets)
        bundle = ModelBundle(classifier=handle, generator=generator, oracle=oracle, reference=data,
                             explainer=explainers.get(handle.model_id))
        check_methods(entries, bundle)
