"""FGSM: the signed step itself, its L∞ size, the iterative variant's per-query stop, NaN in a later step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.methods import make_method
from engine.methods.fgsm import FGSMConfig
from engine.models.handles import ModelBundle
from engine.types import STATUS_BUDGET, STATUS_NAN, STATUS_OK, QueryBatch
from tests.methods.conftest import NaNNear, Task


def test_defaults() -> None:
    assert (FGSMConfig().epsilon, FGSMConfig().steps) == (0.1, 1)


@pytest.mark.parametrize("params, match", [
    ({"epsilon": 0.0}, "fgsm.epsilon` to be > 0"), ({"steps": 0}, "fgsm.steps` to be an integer >= 1"),
    ({"steps": 1.5}, "steps"), ({"epsilon": "big"}, "to be a number"), ({"eps": 0.1}, "Unknown parameter")])
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_method("fgsm", params)


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_one_step_is_the_clipped_signed_gradient_step(digits: Task, eps: float) -> None:
    q = digits.queries(10)
    out = make_method("fgsm", {"epsilon": eps}).explain(q, digits.bundle)
    x = q.x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(digits.handle.logits(x), q.target, reduction="sum"), x)
    torch.testing.assert_close(out.x_cf, (q.x - eps * grad.sign()).clamp(0, 1), rtol=0, atol=0)
    assert (out.x_cf - q.x).abs().amax() <= eps + 1e-6
    assert (out.n_iter == 1).all()
    with torch.no_grad():
        reached = digits.handle.logits(out.x_cf).argmax(1) == q.target
    assert torch.equal(out.success, reached)
    assert out.status == [STATUS_OK if s else STATUS_BUDGET for s in reached.tolist()]
    budget = [r for r, s in zip(out.reason, out.status) if s == STATUS_BUDGET]
    assert all("1 signed step(s) of epsilon" in r for r in budget)


def test_iterative_variant_stops_each_query_at_the_target(confounded_cnn, shapes_test) -> None:
    """One step cannot paint the marker the confounded CNN reads; small repeated steps can."""
    x = shapes_test.x[:60]
    with torch.no_grad():
        q = QueryBatch(x, 1 - confounded_cnn.logits(x).argmax(1), torch.arange(len(x)))
    bundle = ModelBundle(classifier=confounded_cnn)
    one = make_method("fgsm", {"epsilon": 0.05}).explain(q, bundle)
    many = make_method("fgsm", {"epsilon": 0.05, "steps": 20}).explain(q, bundle)
    assert many.success.float().mean() > 0.9 > one.success.float().mean()  # measured: 1.0 vs ~0.5
    assert (many.n_iter <= 20).all() and (many.n_iter[~one.success] > 1).all()
    # A query that reached the target after its first step stopped there.
    assert (many.n_iter[one.success] == 1).all() and torch.equal(many.x_cf[one.success], one.x_cf[one.success])
    linf = (many.x_cf - q.x).flatten(1).abs().amax(1)
    assert (linf <= 0.05 * many.n_iter + 1e-6).all()
    assert many.x_cf.min() >= 0 and many.x_cf.max() <= 1


def test_a_query_that_turns_nan_later_is_frozen_alone(digits: Task) -> None:
    q = digits.queries(5, offset=7)
    method = make_method("fgsm", {"epsilon": 0.01, "steps": 30})
    clean = method.explain(q, digits.bundle)
    assert clean.n_iter[1] >= 3
    # The classifier returns NaN at query 1's second iterate only: steps 1 and 2 are taken, then it stops.
    second = make_method("fgsm", {"epsilon": 0.01, "steps": 2}).explain(q.select(slice(1, 2)), digits.bundle)
    out = method.explain(q, digits.with_module(NaNNear(digits.handle.module, second.x_cf[0], 1e-4, True)))
    assert out.status[1] == STATUS_NAN and not out.success[1] and out.n_iter[1] == 2
    torch.testing.assert_close(out.x_cf[1], second.x_cf[0], rtol=0, atol=0)
    keep = [0, 2, 3, 4]
    assert [out.status[i] for i in keep] == [clean.status[i] for i in keep]
    assert torch.equal(out.x_cf[keep], clean.x_cf[keep]) and torch.equal(out.n_iter[keep], clean.n_iter[keep])
