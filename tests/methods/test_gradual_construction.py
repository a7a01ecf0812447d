"""Gradual construction against the paper's claims and its algorithm's mechanics."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engine.data.base import ArrayDataset
from engine.methods import make_method
from engine.methods.gradual_construction import GradualConstruction, GradualConstructionConfig
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.types import STATUS_ALREADY, STATUS_BUDGET, STATUS_OK, QueryBatch
from tests.methods.conftest import Task, l0

DIGITS = {"sigma": 50}              # σ suited to a CPU; the paper's 1000 (MNIST) is the config note
CANCER = {"sigma": 50, "tau": 0.5}  # §4.4.2: τ = 0.5 on tabular data


def random_targets(q: QueryBatch, k: int, seed: int = 1) -> QueryBatch:
    """Each query aimed at a uniformly drawn class other than its label (harder than the runner-up)."""
    g = torch.Generator().manual_seed(seed)
    target = (q.label + 1 + torch.randint(0, k - 1, (len(q),), generator=g)) % k
    return QueryBatch(q.x, target, q.query_id, q.label, seed=q.seed)


@pytest.fixture(scope="module")
def digits_runs(digits: Task):
    q = random_targets(digits.queries(30), 10)
    gc = make_method("gradual_construction", DIGITS).explain(q, digits.bundle)
    wa = make_method("wachter").explain(q, digits.bundle)
    return q, gc, wa


@pytest.fixture(scope="module")
def cancer_runs(cancer: Task):
    q = cancer.queries(40)
    gc = make_method("gradual_construction", CANCER).explain(q, cancer.bundle)
    wa = make_method("wachter").explain(q, cancer.bundle)
    return q, gc, wa


def mean_logit_distance(task: Task, x_cf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖f′(x_cf) − μ_ct‖₂ per query, μ from the same seeded reference choice GC uses."""
    table = GradualConstruction()._mean_logits(task.handle, task.bundle, seed=0)
    with torch.no_grad():
        return (task.handle.logits(x_cf) - table[target]).norm(dim=1)


def test_defaults_are_the_papers() -> None:
    cfg = GradualConstructionConfig()
    assert (cfg.tau, cfg.lam, cfg.eta, cfg.beta, cfg.lr, cfg.n_reference, cfg.block_size) == (
        0.9, 0.3, 0.3, 2.0, 0.1, 100, 4)
    assert cfg.sigma == 500 and cfg.max_features is None and cfg.recompute_saliency is False


@pytest.mark.parametrize("params, match", [
    ({"lam": "x"}, "to be a number"), ({"unknown": 1}, "Unknown parameter"), ({"tau": 1.5}, r"tau` to be in \(0, 1\)"),
    ({"sigma": 0}, "sigma` to be an integer >= 1"), ({"max_features": -1}, "max_features"),
    ({"recompute_saliency": 1}, "to be a boolean")])
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_method("gradual_construction", params)


def test_reaches_the_target_on_digits_with_block_masks(digits_runs) -> None:
    q, gc, _ = digits_runs
    assert gc.success.float().mean() > 0.8
    ok = gc.success
    assert (gc.p_cf[ok].gather(1, q.target[ok, None]) >= 0.9).all()  # τ of images


def test_reaches_the_target_on_tabular(cancer_runs) -> None:
    q, gc, _ = cancer_runs
    assert gc.success.float().mean() > 0.8
    assert (gc.p_cf[gc.success].gather(1, q.target[gc.success, None]) >= 0.5).all()


@pytest.mark.parametrize("runs, factor", [("digits_runs", 0.5), ("cancer_runs", 0.25)])
def test_changes_far_fewer_features_than_wachter(runs: str, factor: float, request) -> None:
    # Tables 4-6 (minimality): L0 at 1e-3 (Eq. 9) on the queries both methods explain.
    q, gc, wa = request.getfixturevalue(runs)
    both = gc.success & wa.success
    assert both.float().mean() > 0.7
    assert l0(gc.x_cf, q.x)[both].float().mean() < factor * l0(wa.x_cf, q.x)[both].float().mean()


@pytest.mark.parametrize("runs, task", [("digits_runs", "digits"), ("cancer_runs", "cancer")])
def test_logits_end_closer_to_the_target_class_mean_than_wachters(runs: str, task: str, request) -> None:
    # Fig. 3: Eq. 7 keeps the counterfactual's logits in the training data's logit space.
    q, gc, wa = request.getfixturevalue(runs)
    t = request.getfixturevalue(task)
    both = gc.success & wa.success
    d_gc = mean_logit_distance(t, gc.x_cf, q.target)[both]
    d_wa = mean_logit_distance(t, wa.x_cf, q.target)[both]
    assert d_gc.mean() < 0.8 * d_wa.mean()
    assert (d_gc < d_wa).float().mean() > 0.7


def test_mask_bookkeeping_on_images(digits: Task, digits_runs) -> None:
    q, gc, _ = digits_runs
    mask = gc.mask
    assert mask.shape == q.x.shape and mask.dtype == torch.bool
    blocks = mask.float().view(len(q), 1, 4, 4, 4, 4).mean((3, 5))  # [B, 1, 4, 4] fraction of each 4×4 block
    assert ((blocks == 0) | (blocks == 1)).all()  # masks are whole blocks (§4.3.2)
    assert torch.equal(blocks.flatten(1).sum(1).long(), gc.n_features)
    assert torch.equal(gc.x_cf[~mask], q.x[~mask])  # Eq. 1: features outside M are untouched
    ok = torch.tensor([s == STATUS_OK for s in gc.status])
    assert torch.equal(gc.n_iter[ok], gc.n_features[ok] * DIGITS["sigma"])  # σ iterations per masking step


def test_tabular_masks_single_features(cancer_runs) -> None:
    q, gc, _ = cancer_runs
    mask = gc.mask
    assert torch.equal(mask.sum(1), gc.n_features)
    assert (l0(gc.x_cf, q.x) <= gc.n_features).all()
    assert torch.equal(gc.x_cf[~mask], q.x[~mask])


def test_first_mask_is_the_most_salient_block_at_x(digits: Task) -> None:
    # Eq. 5 / Alg. 1 l.4 with the softmax itself (not its log): the ranking must agree.
    q = random_targets(digits.queries(8, offset=40), 10)
    out = make_method("gradual_construction", {"sigma": 5, "max_features": 1}).explain(q, digits.bundle)
    x = q.x.clone().requires_grad_(True)
    p = torch.softmax(digits.handle.logits(x), 1).gather(1, q.target[:, None]).sum()
    (grad,) = torch.autograd.grad(p, x)
    block_saliency = F.avg_pool2d(grad.abs().sum(1, keepdim=True), 4).flatten(1)
    chosen = F.avg_pool2d(out.mask.float(), 4).flatten(1).argmax(1)
    assert torch.equal(chosen, block_saliency.argmax(1))
    assert set(out.status) <= {STATUS_OK, STATUS_BUDGET} and (out.n_features <= 1).all()


def test_recompute_saliency_masks_distinct_blocks_and_succeeds(digits: Task) -> None:
    q = random_targets(digits.queries(12, offset=50), 10)
    out = make_method("gradual_construction", {**DIGITS, "recompute_saliency": True}).explain(q, digits.bundle)
    first = make_method("gradual_construction", {"sigma": 5, "max_features": 1}).explain(q, digits.bundle)
    blocks = F.avg_pool2d(out.mask.float(), 4).flatten(1)
    assert torch.equal(blocks.sum(1).long(), out.n_features)  # never re-picks a masked block
    assert out.success.float().mean() > 0.8
    # At step 1 X′ = X, so the recomputed ranking picks the same first block as Alg. 1.
    first_block = F.avg_pool2d(first.mask.float(), 4).flatten(1).argmax(1, keepdim=True)
    assert (blocks.gather(1, first_block) == 1).all()


def test_finished_queries_are_frozen_while_others_continue(cancer: Task) -> None:
    # A query that finishes within m masking steps ends identically whether the batch then runs on
    # for m more steps or stops: its values no longer change after it is done.
    q = cancer.queries(40, offset=5)
    short = make_method("gradual_construction", {**CANCER, "max_features": 2}).explain(q, cancer.bundle)
    long = make_method("gradual_construction", CANCER).explain(q, cancer.bundle)
    early = torch.tensor([s == STATUS_OK for s in short.status])
    assert early.any() and (long.n_features[~early] > 2).any()  # others did continue
    assert torch.equal(short.x_cf[early], long.x_cf[early]) and torch.equal(short.n_iter[early], long.n_iter[early])
    assert (short.n_features <= 2).all()
    assert all(s == STATUS_BUDGET for s, e in zip(short.status, early.tolist()) if not e)


def test_seed_changes_the_composite_initialisation(cancer: Task) -> None:
    q = cancer.queries(5)
    method = make_method("gradual_construction", {**CANCER, "sigma": 3, "max_features": 1})
    a = method.explain(q, cancer.bundle)
    b = method.explain(dataclasses.replace(q, seed=q.seed + 1), cancer.bundle)
    assert not torch.equal(a.x_cf, b.x_cf)


def test_already_query_success_follows_tau(cancer: Task) -> None:
    # "already" means argmax = target; success also needs GC's own criterion p_ct ≥ τ.
    q = cancer.queries(6)
    with torch.no_grad():
        pred = cancer.handle.logits(q.x).argmax(1)
    out = make_method("gradual_construction", {"tau": 0.99, "sigma": 3}).explain(
        QueryBatch(q.x, pred, q.query_id, seed=0), cancer.bundle)
    assert out.status == [STATUS_ALREADY] * len(q)
    assert torch.equal(out.success, out.p_orig.gather(1, pred[:, None]).squeeze(1) >= 0.99)


class TestReferenceStatistics:
    def test_table_is_seeded_cached_and_uses_predicted_classes(self, cancer: Task) -> None:
        gc = GradualConstruction(n_reference=10)
        table = gc._mean_logits(cancer.handle, cancer.bundle, seed=0)
        assert table.shape == (2, 2) and torch.isfinite(table).all()
        assert gc._mean_logits(cancer.handle, cancer.bundle, seed=0) is table  # cached per (model, reference, seed)
        assert torch.equal(GradualConstruction(n_reference=10)._mean_logits(cancer.handle, cancer.bundle, 0), table)
        assert not torch.equal(gc._mean_logits(cancer.handle, cancer.bundle, seed=1), table)
        with torch.no_grad():
            logits = cancer.handle.logits(cancer.bundle.reference.x)
        # Each class's mean logits favour that class: they come from samples predicted as it.
        assert torch.equal(table.argmax(1), torch.arange(2))
        full = GradualConstruction(n_reference=10**6)._mean_logits(cancer.handle, cancer.bundle, seed=0)
        for k in range(2):  # fewer than N predicted samples: all of them are used
            torch.testing.assert_close(full[k], logits[logits.argmax(1) == k].mean(0))

    def test_missing_target_class_is_a_clear_error(self, cancer: Task) -> None:
        ref = cancer.bundle.reference
        with torch.no_grad():
            keep = (cancer.handle.logits(ref.x).argmax(1) == 0).nonzero().squeeze(1)
        bundle = ModelBundle(cancer.handle, reference=ref.subset(keep))
        q = cancer.queries(4)
        q = QueryBatch(q.x, torch.ones(4, dtype=torch.int64), q.query_id)
        q = q.select(cancer.handle.logits(q.x).argmax(1) == 0)
        with pytest.raises(ValueError, match=r"no reference sample is predicted as target class\(es\) \[1\]"):
            make_method("gradual_construction", CANCER).explain(q, bundle)

    def test_no_reference_is_a_clear_error(self, cancer: Task) -> None:
        with pytest.raises(ValueError, match="needs reference training samples"):
            make_method("gradual_construction").explain(cancer.queries(2), ModelBundle(cancer.handle))

    def test_reference_of_the_wrong_shape(self, cancer: Task) -> None:
        ref = cancer.bundle.reference
        bad = ArrayDataset("bad", ref.x[:, :5], ref.y, ref.class_names, "tabular")
        with pytest.raises(ValueError, match="reference samples have shape"):
            make_method("gradual_construction", CANCER).explain(cancer.queries(2), ModelBundle(cancer.handle,
                                                                                                reference=bad))


def test_blocks_span_channels_and_are_cropped_at_borders() -> None:
    # 3 channels, 10×10 with 4×4 blocks: a 3×3 grid whose last row/column is 2 pixels wide.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                  torch.nn.Linear(4 * 8 * 8, 5)).eval()
        x = torch.rand(64, 3, 10, 10)
    handle = ClassifierHandle(net, "rand", (3, 10, 10), list("abcde"))
    with torch.no_grad():
        pred = net(x).argmax(1)
    bundle = ModelBundle(handle, reference=ArrayDataset("rand", x, pred, list("abcde"), "image"))
    target = (pred[:6] + 1) % 5
    target = torch.where((pred == target[:, None]).any(1), target, pred[:6])  # else Eq. 7 has no μ_ct
    q = QueryBatch(x[:6], target, torch.arange(6))
    out = make_method("gradual_construction", {"sigma": 3, "max_features": 9}).explain(q, bundle)
    mask = out.mask
    assert mask.shape == (6, 3, 10, 10) and torch.equal(mask[:, :1].expand_as(mask), mask)
    padded = F.pad(mask[:, 0].float(), (0, 2, 0, 2))[:, None]
    blocks = F.max_pool2d(padded, 4).flatten(1)
    covered = (F.avg_pool2d(padded, 4) * 16).flatten(1)
    sizes = torch.tensor([16, 16, 8, 16, 16, 8, 8, 8, 4.0])
    assert torch.equal(covered, blocks * sizes)  # whole blocks, the border ones cropped
    assert torch.equal(blocks.sum(1).long(), out.n_features) and (out.n_features > 0).sum() >= 3
    assert out.x_cf.min() >= 0 and out.x_cf.max() <= 1
