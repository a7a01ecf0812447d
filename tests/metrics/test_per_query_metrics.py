"""Each per-query metric against a hand-computed case."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from engine.metrics.coherence import coherence
from engine.metrics.compatibility import compatibility_rows, pooled_compatibility
from engine.metrics.deletion import curve_auc, deletion_curve, per_query_uniform
from engine.metrics.distances import input_distances
from engine.metrics.latent import latent_change, latent_closeness
from engine.metrics.per_query import MetricOptions, per_query_columns
from engine.models.handles import ClassifierHandle, GeneratorHandle, ModelBundle
from engine.types import CFBatch, QueryBatch


def test_l0_counts_changes_at_or_above_the_gc_threshold():
    x = torch.zeros(1, 5)
    x_cf = torch.tensor([[0.0, 0.0009, 0.001, 0.5, -2.0]])
    d = input_distances(x, x_cf)
    assert d["l0"].item() == 3  # 0.0009 is below GC Eq. 9's 0.001, 0.001 counts
    assert d["l1"].item() == pytest.approx(0.0009 + 0.001 + 0.5 + 2.0)
    assert d["l2"].item() == pytest.approx(math.sqrt(0.0009**2 + 0.001**2 + 0.25 + 4.0))


def test_lpr_with_a_known_latent():
    z0 = torch.zeros(2, 8)
    z_cf = z0.clone()
    z_cf[0, :2] = 1.0        # two coordinates moved
    z_cf[1, :4] = 0.04       # four tiny moves under the 0.05 tolerance
    z_cf[1, 4] = -0.3        # one real move
    out = latent_change(z0, z_cf, tolerance=0.05)
    assert out["lpr"].tolist() == [2 / 8, 1 / 8]
    assert out["z_l2"][0].item() == pytest.approx(math.sqrt(2))


def test_latent_closeness_compares_with_other_explanations_of_the_same_group():
    e_x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    e_cf = torch.tensor([[1.0, 0.0], [4.0, 0.0], [0.0, 11.0]])
    # query 1's explanation (4, 0) is 6 from its query but 3 from query 0's explanation (1, 0).
    assert latent_closeness(e_x, e_cf).tolist() == [True, False, True]
    # with query 0 in another group, nothing else is near query 1's explanation; query 0 has nothing to beat.
    alone = latent_closeness(e_x, e_cf, torch.tensor([0, 1, 1])).tolist()
    assert math.isnan(alone[0]) and alone[1:] == [True, True]


def test_latent_closeness_is_null_without_another_explanation():
    """Issue 22: a unit with no valid counterfactual raised IndexError (a min over no explanations)."""
    assert latent_closeness(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert math.isnan(latent_closeness(torch.zeros(1, 4), torch.ones(1, 4)).item())
    e_cf = torch.tensor([[1.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]])
    out = latent_closeness(torch.zeros(3, 2), e_cf, torch.tensor([0, 0, 1]))
    assert out.isnan().all()  # 0: its only rival is not finite; 1: its own encoding; 2: alone in its group


class _Linear(torch.nn.Module):
    """A fixed linear encoder [B, 1, 2, 2] -> [B, 2] (and back), enough for the latent metrics."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])

    def encode(self, x):
        return x.flatten(1) @ self.weight.T

    def decode(self, z):
        return (z @ self.weight).view(-1, 1, 2, 2)

    def forward(self, x):
        return x.flatten(1) @ torch.tensor([[1.0, -1.0]] * 4)


def test_per_query_columns_null_where_a_target_has_no_valid_counterfactual():
    handle = ClassifierHandle(_Linear(), "linear", (1, 2, 2), ["a", "b"])
    bundle = ModelBundle(classifier=handle, generator=GeneratorHandle(_Linear(), "linear", 2))
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [9.0, 9.0], [9.0, 8.0]]).repeat(1, 2)
    x = x.view(5, 1, 2, 2)
    x_cf = x + 0.5
    target = torch.tensor([0, 0, 1, 2, 2])
    probs = torch.full((5, 2), 0.5)

    def columns(success):
        batch = QueryBatch(x=x, target=target, query_id=torch.arange(5), seed=0)
        cf = CFBatch(x_cf=x_cf, success=torch.tensor(success), p_orig=probs, p_cf=probs, target=target,
                     n_iter=torch.zeros(5, dtype=torch.long), status=["budget"] * 5)
        return per_query_columns(batch, cf, bundle, MetricOptions(extractor=lambda v: v.flatten(1)))

    none = columns([False] * 5)  # raised IndexError before issue 22
    for name in ("latent_closest", "coherence", "fid_features"):
        assert none[name] == [None] * 5, name
    assert none["coherence_neighbours"].tolist() == [0] * 5 and None not in none["lpr"]
    # target 0: none valid; target 1: one valid, no rival; target 2: two valid, each nearer its own query.
    some = columns([False, False, True, True, True])
    assert some["latent_closest"] == [None, None, None, True, True]
    assert some["coherence"][:3] == [None, None, None] and some["coherence"][3] == pytest.approx(1.0)


def test_coherence_takes_the_largest_ratio_over_neighbours_within_eps():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [50.0, 50.0]])
    x_cf = torch.tensor([[0.0, 1.0], [1.0, 4.0], [0.0, 2.0], [60.0, 50.0]])
    robustness, count = coherence(x, x_cf, norm="l2", eps=2.5)
    # query 0: neighbours 1 (dist 1, cf dist sqrt(1+9)) and 2 (dist 2, cf dist 1) -> max(sqrt(10)/1, 1/2)
    assert robustness[0].item() == pytest.approx(math.sqrt(10))
    assert count.tolist() == [2, 2, 2, 0]
    # query 1: neighbours 0 (ratio sqrt(10)) and 2 (dist sqrt(5), cf dist sqrt(1+4)) -> sqrt(10)
    assert robustness[1].item() == pytest.approx(math.sqrt(10))
    assert math.isnan(robustness[3].item())  # no neighbour within eps
    # GC Eq. 11's l0 neighbourhood counts differing features: queries 0 and 1 differ in one feature.
    _, count_l0 = coherence(x, x_cf, norm="l0", eps=1)
    assert count_l0.tolist() == [2, 1, 1, 0]
    # invalid counterfactuals and other targets are not neighbours
    _, count_valid = coherence(x, x_cf, norm="l2", eps=2.5, valid=torch.tensor([True, False, True, True]))
    assert count_valid.tolist() == [1, 0, 1, 0]
    _, count_group = coherence(x, x_cf, group=torch.tensor([0, 0, 1, 1]), norm="l2", eps=2.5)
    assert count_group.tolist() == [1, 1, 0, 0]


def test_compatibility_rows_match_scipy():
    desired = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]])
    achieved = torch.tensor([[0.0, 0.3, 0.2, 0.9, 0.9], [0.5, 0.4, 0.3, 0.2, 0.1]])
    out = compatibility_rows(desired, achieved)
    for i in range(2):
        assert out["spearman"][i].item() == pytest.approx(spearmanr(desired[i], achieved[i]).statistic)
    assert out["spearman"][1].item() == pytest.approx(-1.0)
    assert out["mae"][1].item() == pytest.approx(float((desired[1] - achieved[1]).abs().mean()))
    pooled = pooled_compatibility(desired.numpy(), achieved.numpy())
    assert pooled["spearman"] == pytest.approx(spearmanr(desired.ravel(), achieved.ravel()).statistic)


class _Bright(torch.nn.Module):
    """Class 1 when the mean of the top-left 2x2 pixels exceeds 0.9, else class 0."""

    def forward(self, x):
        score = x[:, :, :2, :2].mean(dim=(1, 2, 3))
        return torch.stack([0.9 - score, score - 0.9], dim=1) * 100


def test_deletion_curve_falls_when_the_relevant_pixels_go_first():
    handle = ClassifierHandle(module=_Bright(), model_id="bright", class_names=["dark", "bright"],
                              input_shape=(1, 4, 4))
    x = torch.zeros(2, 1, 4, 4)
    x[:, :, :2, :2] = 1.0
    label = torch.ones(2, dtype=torch.long)
    good = torch.zeros_like(x)
    good[:, :, :2, :2] = 1.0          # saliency on the pixels the classifier uses
    bad = 1.0 - good                   # saliency everywhere else
    qid = torch.arange(2)
    fast = deletion_curve(handle, x, good, label, qid, seed=0, steps=4)
    slow = deletion_curve(handle, x, bad, label, qid, seed=0, steps=4)
    assert fast[:, 0].tolist() == [1.0, 1.0] and fast[:, 1].tolist() == [0.0, 0.0]  # 4/16 deleted = the block
    assert slow[:, :4].eq(1.0).all()   # the block survives until the last step
    assert (curve_auc(fast) < curve_auc(slow)).all()
    assert curve_auc(torch.ones(1, 5)).item() == pytest.approx(1.0)


def test_per_query_noise_does_not_depend_on_the_batch():
    both = per_query_uniform(0, torch.tensor([3, 7]), (4,), "deletion")
    alone = per_query_uniform(0, torch.tensor([7]), (4,), "deletion")
    assert torch.equal(both[1], alone[0]) and both.min() >= 0 and both.max() <= 1
    assert np.isfinite(both.numpy()).all()


def test_a_metric_beyond_float32_is_null_not_inf():
    """Coherence is computed in float64 and stored as float32: a ratio past float32's range is null."""
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    x_cf = torch.tensor([[3e38, 0.0, 0.0, 0.0], [-3e38, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    assert coherence(x, x_cf, eps=2.0)[0].min() > np.finfo(np.float32).max
    target, probs = torch.zeros(2, dtype=torch.long), torch.full((2, 2), 0.5)
    cf = CFBatch(x_cf=x_cf, success=torch.ones(2, dtype=torch.bool), p_orig=probs, p_cf=probs, target=target,
                 n_iter=torch.zeros(2, dtype=torch.long), status=["ok"] * 2)
    bundle = ModelBundle(classifier=ClassifierHandle(_Linear(), "linear", (1, 2, 2), ["a", "b"]))
    out = per_query_columns(QueryBatch(x=x, target=target, query_id=torch.arange(2)), cf, bundle,
                            MetricOptions(coherence_eps=2.0, deletion_steps=0))
    assert out["coherence"] == [None, None] and out["coherence_neighbours"].tolist() == [1, 1]
