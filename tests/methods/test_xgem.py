"""xGEM, the unconstrained latent baseline of CDeepEx §4.1.2: reaching the target, per-query stopping, λ.

The contract checks it shares with CDeepEx (batching, determinism, NaN, Δ, errors, pickling) and the
third-class comparison live in test_cdeepex.py, with the 10-class fixture imported here.
"""
from __future__ import annotations

import pytest
import torch

from engine.methods import make_method
from engine.methods.xgem import XGEMConfig
from engine.types import STATUS_BUDGET, STATUS_OK
from tests.methods.test_cdeepex import Latent10, digits10  # noqa: F401  (fixture)


def test_defaults() -> None:
    cfg = XGEMConfig()
    assert (cfg.lam, cfg.lr, cfg.max_iter) == (0.1, 0.05, 1000)
    assert (cfg.invert_steps, cfg.invert_lr, cfg.invert_kappa) == (300, 0.05, 1.0)  # as cdeepex's Alg. 2


@pytest.mark.parametrize("params, match", [
    ({"lam": -0.1}, r"xgem.lam` to be >= 0"), ({"lr": 0}, "lr` to be > 0"),
    ({"max_iter": 1.5}, "max_iter` to be an integer >= 0"), ({"invert_kappa": "a"}, "to be a number"),
    ({"epsilon": 0.1}, "Unknown parameter")])
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_method("xgem", params)


@pytest.fixture(scope="module")
def runs(digits10: Latent10):  # noqa: F811
    q = digits10.queries(24, offset=100)
    short = make_method("xgem", {"max_iter": 6}).explain(q, digits10.bundle)
    full = make_method("xgem").explain(q, digits10.bundle)
    return q, short, full


def test_reaches_the_target_with_a_latent_change(runs, digits10: Latent10) -> None:  # noqa: F811
    q, _, out = runs
    assert out.success.float().mean() > 0.9
    ok = out.success
    assert (out.p_cf[ok].argmax(1) == q.target[ok]).all()
    assert out.status == [STATUS_OK if s else STATUS_BUDGET for s in ok.tolist()]
    assert (out.n_iter[ok] >= 1).all()
    gen = digits10.bundle.generator
    with torch.no_grad():
        g0, g = gen.decode(out.z0), gen.decode(out.z_cf)
        torch.testing.assert_close(out.z0, gen.encode(q.x)[0])
    torch.testing.assert_close(out.explanation, g0 - g, rtol=0, atol=1e-6)  # CDeepEx Alg. 1 l.4, comparable maps
    torch.testing.assert_close(out.x_cf, (g + q.x - g0).clamp(0, 1), rtol=0, atol=1e-5)
    assert (out.z_cf[ok] - out.z0[ok]).norm(dim=1).min() > 0


def test_stops_each_query_at_the_boundary(runs) -> None:
    q, short, full = runs
    assert STATUS_BUDGET in short.status and (short.n_iter <= 6).all()
    done = short.success
    assert done.any()
    # A query that reached its target is frozen: the others' further steps leave it as it was.
    assert torch.equal(short.x_cf[done], full.x_cf[done]) and torch.equal(short.n_iter[done], full.n_iter[done])
    assert torch.equal(short.z_cf[done], full.z_cf[done])


def test_lambda_keeps_z_close_to_z0(runs, digits10: Latent10) -> None:  # noqa: F811
    q, _, _ = runs
    loose = make_method("xgem", {"lam": 0.0, "max_iter": 300}).explain(q, digits10.bundle)
    tight = make_method("xgem", {"lam": 1.0, "max_iter": 300}).explain(q, digits10.bundle)
    both = loose.success & tight.success
    assert both.sum() >= len(q) // 2
    dist = lambda out: (out.z_cf - out.z0)[both].norm(dim=1).mean()  # noqa: E731
    assert dist(tight) < 0.9 * dist(loose)
