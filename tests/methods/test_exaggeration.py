"""Progressive Exaggeration (`exaggeration`): the explain contract on a tiny explainer, and bias detection
(Table 3) on the confounded and fair CNNs of tests/fixtures/zoo.py with small explainers.

The cross-method table (test_common.py) leaves this method out: it needs an explainer trained per classifier
and is binary (f = P(positive class)); the same checks run here on `shapes`.
"""
from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

from engine.data import dataset_fingerprint
from engine.methods import config_hash, make_method
from engine.methods.exaggeration import saliency
from engine.models.explainer_training import ExplainerConfig, get_or_train_explainer
from engine.models.handles import ModelBundle
from engine.types import STATUS_ALREADY, STATUS_BUDGET, STATUS_NAN, STATUS_OK, QueryBatch
from tests.methods.conftest import NaNNear

# Contract checks need a working explainer, not a good one.
TINY = ExplainerConfig(steps=3, batch_size=8, width=4, d_steps=1)
# Bias detection (Table 3) at CI size (~7 s per explainer on a quiet 2-core machine): the adversarial term is
# left out (App. A.5's ablation: it buys realism, not compatibility), a high learning rate, λ_f = 3, λ_rec = 10 and
# the input shortcut (`skip`) let 120 steps learn the biased classifier's marker edits while keeping the marker
# of every query in the fair classifier's series (biased 0.41-0.58 over explainer seeds 0-2, fair 0 for each; at
# 80 steps and λ_f = 1 the biased rate fell to 0.20). Full-size figures: `python -m jobs.exaggeration_eval`.
SMALL = ExplainerConfig(steps=120, batch_size=16, width=8, d_steps=0, lambda_cgan=0.0, lr=3e-3, levels=1, skip=True,
                        lambda_f=3.0, lambda_rec=10.0)
N_SMALL_TRAIN = 600


def _explainer(handle, data, config, n=None):
    subset = data if n is None else dataclasses.replace(data, x=data.x[:n], y=data.y[:n],
                                                        attributes=data.attributes[:n])
    module, info = get_or_train_explainer(handle.module, subset, dataset_fingerprint(subset), config, seed=0)
    return module


@pytest.fixture(scope="module")
def bundle(confounded_cnn, shapes_train) -> ModelBundle:
    return ModelBundle(classifier=confounded_cnn, explainer=_explainer(confounded_cnn, shapes_train, TINY, 64))


def queries(handle, data, n: int, offset: int = 0, seed: int = 0) -> QueryBatch:
    x = data.x[offset:offset + n]
    with torch.no_grad():
        pred = handle.logits(x).argmax(1)
    return QueryBatch(x=x, target=1 - pred, query_id=torch.arange(offset, offset + n), label=data.y[offset:offset + n],
                      seed=seed)


def test_outputs_series_saliency_and_compatibility_figures(bundle, shapes_test) -> None:
    q = queries(bundle.classifier, shapes_test, 5)
    out = make_method("exaggeration").explain(q, bundle)
    b, s = len(q), bundle.explainer.num_bins
    assert out.path.shape == (b, s, *q.x.shape[1:]) and out.x_cf.shape == q.x.shape
    assert out.explanation.shape == q.x.shape
    assert out.explanation.min() >= 0 and torch.allclose(out.explanation.flatten(1).amax(1), torch.ones(b))
    assert out.desired.shape == out.achieved.shape == (b, s)
    torch.testing.assert_close(out.desired[0], (torch.arange(s) + 0.5) / s)
    with torch.no_grad():
        f = torch.softmax(bundle.classifier.logits(out.path.flatten(0, 1)), 1)[:, 1].view(b, s)
    torch.testing.assert_close(out.achieved, f)
    assert (out.n_iter == s).all() and out.n_iter.dtype == torch.int64
    # x_cf is the series' end on the target's side: the top bin for class 1, the bottom bin for class 0
    end = torch.where(q.target == 1, s - 1, 0)
    torch.testing.assert_close(out.x_cf, out.path[torch.arange(b), end])
    assert set(out.status) <= {STATUS_OK, STATUS_BUDGET}
    assert all((st == STATUS_OK) == bool(v) for st, v in zip(out.status, out.success))
    assert (out.p_cf.argmax(1)[out.success] == q.target[out.success]).all()
    assert all(("not classified as the target" in r) == (st == STATUS_BUDGET)
               for r, st in zip(out.reason, out.status))
    assert out.x_cf.min() >= 0 and out.x_cf.max() <= 1


def test_requested_deltas(bundle, shapes_test) -> None:
    q = queries(bundle.classifier, shapes_test, 4)
    out = make_method("exaggeration", {"deltas": [-1.0, 0.0, 0.25, 1.0]}).explain(q, bundle)
    with torch.no_grad():
        f0 = torch.softmax(bundle.classifier.logits(q.x), 1)[:, 1]
    want = (f0[:, None] + torch.tensor([-1.0, 0.0, 0.25, 1.0])).clamp(0, 1)
    torch.testing.assert_close(out.desired, want)
    assert out.path.shape[1] == 4 and out.bins[:, 0].eq(0).all() and out.bins[:, 3].eq(9).all()
    with pytest.raises(ValueError, match="exaggeration.deltas"):
        make_method("exaggeration", {"deltas": [2.0]})


def test_batch_equals_single_calls_and_runs_are_deterministic(bundle, shapes_test) -> None:
    q = queries(bundle.classifier, shapes_test, 5, offset=7)
    method = make_method("exaggeration")
    batched = method.explain(q, bundle)
    again = make_method("exaggeration").explain(q, bundle)
    assert torch.equal(batched.x_cf, again.x_cf) and batched.status == again.status
    for i in range(len(q)):
        single = method.explain(q.select(slice(i, i + 1)), bundle)
        assert single.status == batched.status[i:i + 1]
        torch.testing.assert_close(single.path[0], batched.path[i], rtol=0, atol=1e-4)
        torch.testing.assert_close(single.achieved[0], batched.achieved[i], rtol=0, atol=1e-4)
    chunked = make_method("exaggeration", {"chunk": 2}).explain(q, bundle)
    torch.testing.assert_close(chunked.path, batched.path, rtol=0, atol=1e-5)


def test_already_nan_empty_and_validation(bundle, shapes_test) -> None:
    q = queries(bundle.classifier, shapes_test, 4, offset=20)
    target = q.target.clone()
    target[::2] = 1 - target[::2]  # the prediction itself
    out = make_method("exaggeration").explain(QueryBatch(q.x, target, q.query_id, seed=0), bundle)
    assert out.status[0] == out.status[2] == STATUS_ALREADY and torch.equal(out.x_cf[::2], q.x[::2])
    assert (out.n_iter[::2] == 0).all() and out.path.shape[1] == 10  # an already query still gets its series
    poisoned = NaNNear(bundle.classifier.module, q.x[1], 1e-3, include_center=True)
    handle = dataclasses.replace(bundle.classifier, module=poisoned)
    out = make_method("exaggeration").explain(q, dataclasses.replace(bundle, classifier=handle))
    clean = make_method("exaggeration").explain(q, bundle)
    assert out.status[1] == STATUS_NAN and not out.success[1] and torch.equal(out.x_cf[1], q.x[1])
    assert [out.status[i] for i in (0, 2, 3)] == [clean.status[i] for i in (0, 2, 3)]
    torch.testing.assert_close(out.x_cf[[0, 2, 3]], clean.x_cf[[0, 2, 3]])
    empty = make_method("exaggeration").explain(q.select(slice(0, 0)), bundle)
    assert len(empty) == 0 and empty.path.shape == (0, 10, *q.x.shape[1:])
    with pytest.raises(ValueError, match="expected targets in"):
        make_method("exaggeration").explain(QueryBatch(q.x[:2], torch.tensor([0, 2]), q.query_id[:2]), bundle)
    with pytest.raises(ValueError, match="needs an explainer trained for model 'cnn-confounded'"):
        make_method("exaggeration").explain(q, ModelBundle(classifier=bundle.classifier))


def test_config_is_frozen_and_the_method_pickles(bundle, shapes_test) -> None:
    method = make_method("exaggeration", {"deltas": [0.1, -0.1]})
    assert method.config.deltas == (0.1, -0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.config.chunk = 3
    clone = pickle.loads(pickle.dumps(method))
    assert config_hash("exaggeration", clone.config) == config_hash("exaggeration", method.config)
    q = queries(bundle.classifier, shapes_test, 2)
    assert torch.equal(clone.explain(q, bundle).x_cf, method.explain(q, bundle).x_cf)


def test_saliency_is_normalised_per_query() -> None:
    low = torch.zeros(2, 1, 2, 2)
    high = torch.tensor([[[[0.0, 0.5], [0.25, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    sal = saliency(low, high)
    torch.testing.assert_close(sal[0], torch.tensor([[[0.0, 1.0], [0.5, 0.0]]]))
    assert torch.equal(sal[1], torch.zeros(1, 2, 2))  # nothing changed: an all-zero map, not NaN


def test_confounding_is_higher_for_the_biased_classifier(confounded_cnn, fair_cnn, shapes_train, shapes_test,
                                                         shapes_oracle) -> None:
    """Table 3: end points of the biased classifier's series change the confounder (`marker`) more often."""
    marker = shapes_train.attribute_names.index("marker")
    rates = {}
    for name, handle in (("biased", confounded_cnn), ("fair", fair_cnn)):
        bundle = ModelBundle(classifier=handle, explainer=_explainer(handle, shapes_train, SMALL, N_SMALL_TRAIN))
        q = queries(handle, shapes_test, 64)
        out = make_method("exaggeration").explain(q, bundle)
        with torch.no_grad():
            before = shapes_oracle.logits(q.x)[:, marker] > 0
            after = shapes_oracle.logits(out.x_cf)[:, marker] > 0
        rates[name] = (before != after).float().mean().item()
    print(f"confounding rate (marker changed at the series' end): {rates}")
    assert rates["biased"] > rates["fair"] + 0.2, rates
