"""The shared machinery: masked Adam, descend's freezing, per-query seeds, pure loss terms."""
from __future__ import annotations

import pytest
import torch

from engine.methods import losses
from engine.methods.search import AdamState, SearchState, clamp_st, descend, masked_adam_step
from engine.seeding import per_query_normal, query_seed


def _state(b: int) -> SearchState:
    z = torch.zeros(b, dtype=torch.bool)
    return SearchState(x=torch.zeros(b, 3), target=torch.zeros(b, dtype=torch.int64), logits_orig=torch.zeros(b, 2),
                       active=~z, done=z.clone(), nan=z.clone(), already=z.clone(),
                       n_iter=torch.zeros(b, dtype=torch.int64))


def test_masked_adam_matches_torch_adam_when_all_active() -> None:
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 5, generator=g)
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.1)
    p, st = p0.clone(), AdamState.zeros_like(p0)
    for _ in range(20):
        grad = torch.randn(3, 5, generator=g)
        ref.grad = grad.clone()
        opt.step()
        p, st = masked_adam_step(p, grad, st, torch.ones(3, dtype=torch.bool), lr=0.1)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-4, atol=1e-5)


def test_masked_adam_row_equals_its_own_adam_that_skips_inactive_steps() -> None:
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(2, 4, generator=g)
    refs = [p0[i].clone().requires_grad_(True) for i in range(2)]
    opts = [torch.optim.Adam([r], lr=0.05) for r in refs]
    p, st = p0.clone(), AdamState.zeros_like(p0)
    for step in range(30):
        grad = torch.randn(2, 4, generator=g)
        active = torch.tensor([True, step % 3 == 0])
        grad[1] = grad[1] if active[1] else float("nan")  # a frozen row's NaN gradient must not leak
        for i in range(2):
            if active[i]:
                refs[i].grad = grad[i].clone()
                opts[i].step()
        p, st = masked_adam_step(p, grad, st, active, lr=0.05)
    for i in range(2):
        torch.testing.assert_close(p[i], refs[i].detach(), rtol=1e-4, atol=1e-5)
    assert st.t.tolist() == [30, 10]
    assert torch.isfinite(st.m).all() and torch.isfinite(st.v).all()


def test_frozen_row_keeps_values_and_moments_despite_momentum() -> None:
    p, st = torch.zeros(2, 3), AdamState.zeros_like(torch.zeros(2, 3))
    for _ in range(5):  # build up momentum on both rows
        p, st = masked_adam_step(p, torch.ones(2, 3), st, torch.ones(2, dtype=torch.bool), lr=0.1)
    frozen_p, frozen_m, frozen_v = p[0].clone(), st.m[0].clone(), st.v[0].clone()
    for _ in range(5):
        p, st = masked_adam_step(p, torch.zeros(2, 3), st, torch.tensor([False, True]), lr=0.1)
    assert torch.equal(p[0], frozen_p) and torch.equal(st.m[0], frozen_m) and torch.equal(st.v[0], frozen_v)
    assert not torch.equal(p[1], frozen_p)  # momentum still moves the active row under a zero gradient


def test_adam_state_reset_only_touches_given_rows() -> None:
    st = AdamState(torch.ones(3, 2), torch.ones(3, 2), torch.tensor([4, 5, 6]))
    st.reset(torch.tensor([True, False, True]))
    assert st.t.tolist() == [0, 5, 0] and st.m[:, 0].tolist() == [0.0, 1.0, 0.0]


def test_descend_freezes_stopped_and_nonfinite_rows_and_counts_steps() -> None:
    # Row 0 stops once its value passes 0.5; row 1 turns NaN at its 4th evaluation; row 2 runs to the end.
    calls = {"n": 0}

    def objective(p: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["n"] += 1
        loss = ((p - 10.0) ** 2).sum(1)
        if calls["n"] >= 4:
            loss = torch.where(rows == 1, torch.full_like(loss, float("nan")), loss)
        return loss, (rows == 0) & (p[:, 0] > 0.5)

    state = _state(3)
    param = torch.zeros(3, 3)
    adam = AdamState.zeros_like(param)
    out = descend(param, objective, state, adam, steps=20, lr=0.1, bounds=(0.0, 100.0))
    assert state.done.tolist() == [True, False, False]
    assert state.nan.tolist() == [False, True, False]
    assert state.active.tolist() == [False, False, True]  # the budget ends descend, not the query
    assert state.n_iter.tolist() == [6, 3, 20]
    torch.testing.assert_close(out[0], torch.full((3,), 0.6), rtol=0, atol=2e-3)  # frozen at the first iterate > 0.5
    torch.testing.assert_close(out[1], torch.full((3,), 0.3), rtol=0, atol=2e-3)  # last finite values
    assert torch.isfinite(out).all() and not param.ne(0).any()  # the input param is not modified in place


def test_query_seed_is_stable_and_distinguishes_inputs() -> None:
    assert query_seed(0, 1) == query_seed(0, 1)
    assert len({query_seed(0, 1), query_seed(1, 0), query_seed(0, 2), query_seed(0, 1, "x")}) == 4
    assert 0 <= query_seed(2**40, -5, "s") < 2**63


def test_per_query_normal_rows_do_not_depend_on_the_batch() -> None:
    both = per_query_normal(3, torch.tensor([7, 9]), (2, 2), "c")
    alone = per_query_normal(3, torch.tensor([9]), (2, 2), "c")
    assert torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])
    assert per_query_normal(3, torch.tensor([], dtype=torch.int64), (2,), "c").shape == (0, 2)


def test_clamp_st_clamps_forward_and_passes_gradient() -> None:
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0], requires_grad=True)
    y = clamp_st(x, 0.0, 1.0)
    y.sum().backward()
    assert y.tolist() == [0.0, 0.0, 0.5, 1.0, 1.0] and x.grad.tolist() == [1.0] * 5


def test_total_variation_by_hand() -> None:
    x = torch.tensor([[[0.0, 1.0, 3.0], [2.0, 2.0, 0.0], [1.0, 0.0, 0.0]]])[:, None]  # [1, 1, 3, 3]
    # ((x[i,j+1]-x[i,j])² + (x[i+1,j]-x[i,j])²) over i, j < 2
    expected = (1 + 4) + (4 + 1) + (0 + 1) + (4 + 4)
    assert losses.total_variation(x, 2.0).item() == pytest.approx(expected)
    assert losses.total_variation(x, 1.0).item() == pytest.approx(sum(v ** 0.5 for v in (5, 5, 1, 8)))
    z = torch.zeros(1, 1, 3, 3, requires_grad=True)
    losses.total_variation(z, 1.0).backward()
    assert torch.isfinite(z.grad).all()


def test_per_query_losses() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    target = torch.tensor([0, 2])
    assert losses.target_gap(logits, target).tolist() == [1.0, -2.0]
    assert losses.hinge_to_target(logits, target, 0.5).tolist() == [0.0, 2.5]
    assert losses.logit_matching(logits, torch.zeros(2, 3)).tolist() == pytest.approx([5 ** 0.5, 10 ** 0.5])
    a, b = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert losses.l1_distance(a, b).tolist() == [4.0, 4.0] and losses.l2_distance(a, b).tolist() == [2.0, 2.0]


def test_statuses_rank_nan_already_ok_budget_and_reasons_fill_budget_rows() -> None:
    from engine.methods.search import reasons, statuses

    t, f = True, False
    status = statuses(torch.tensor([t, t, f, f, f]), torch.tensor([t, f, t, f, f]), torch.tensor([t, t, t, t, f]))
    assert status == ["nan", "nan", "already", "ok", "budget"]
    assert reasons(status, "spent")[3:] == ["", "spent"]
    assert reasons(status, [f"row {i}" for i in range(5)])[4] == "row 4"  # one text per query
    assert "non-finite" in reasons(status, "spent")[0] and "already" in reasons(status, "spent")[2]
