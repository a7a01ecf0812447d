"""The Wachter et al. baseline: per-query convergence, both losses, margin, budget, config errors."""
from __future__ import annotations

import pytest
import torch

from engine.methods import losses, make_method
from engine.methods.wachter import WachterConfig
from engine.types import STATUS_BUDGET, STATUS_OK
from tests.methods.conftest import Task


def test_defaults() -> None:
    cfg = WachterConfig()
    assert (cfg.lam, cfg.loss, cfg.margin, cfg.lr, cfg.max_iter) == (0.1, "ce", 0.0, 0.01, 1000)


@pytest.mark.parametrize("params, match", [
    ({"loss": "l2"}, r"wachter.loss` to be one of \['ce', 'hinge'\]"), ({"lam": "x"}, "to be a number"),
    ({"lam": -1.0}, "lam` to be >= 0"), ({"max_iter": -1}, "max_iter"), ({"lr": 0}, "lr` to be > 0"),
    ({"bogus": 1}, "Unknown parameter")])
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_method("wachter", params)


@pytest.mark.parametrize("loss", ["ce", "hinge"])
@pytest.mark.parametrize("task_name", ["digits", "cancer"])
def test_reaches_the_target_and_stops_at_the_boundary(loss: str, task_name: str, request) -> None:
    task: Task = request.getfixturevalue(task_name)
    q = task.queries(20, offset=60)
    out = make_method("wachter", {"loss": loss}).explain(q, task.bundle)
    assert out.success.float().mean() > 0.9
    ok = out.success
    assert (out.p_cf[ok].argmax(1) == q.target[ok]).all()
    # Frozen at the first iterate past the boundary: one step earlier it was not there yet.
    assert (out.n_iter[ok] >= 1).all()
    assert out.status == [STATUS_OK if s else STATUS_BUDGET for s in ok.tolist()]


def test_margin_demands_a_confident_counterfactual(cancer: Task) -> None:
    q = cancer.queries(20)
    plain = make_method("wachter").explain(q, cancer.bundle)
    sure = make_method("wachter", {"margin": 2.0}).explain(q, cancer.bundle)  # same loss: same path, later stop
    with torch.no_grad():
        gap = losses.target_gap(cancer.handle.logits(sure.x_cf), q.target)
    assert (gap[sure.success] >= 2.0).all() and sure.success.float().mean() > 0.9
    assert (sure.n_iter >= plain.n_iter).all() and (sure.n_iter > plain.n_iter).any()


def test_budget_status_and_frozen_finishers(digits: Task) -> None:
    q = digits.queries(12, offset=5)
    short = make_method("wachter", {"max_iter": 4}).explain(q, digits.bundle)
    long = make_method("wachter", {"max_iter": 400}).explain(q, digits.bundle)
    assert STATUS_BUDGET in short.status and (short.n_iter <= 4).all()
    done = short.success
    assert done.any()
    # Queries that finished early are unchanged by the others' 396 further steps.
    assert torch.equal(short.x_cf[done], long.x_cf[done]) and torch.equal(short.n_iter[done], long.n_iter[done])
