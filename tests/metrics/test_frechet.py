"""FrechetState and frechet_distance: exact statistics, merging, closed forms, errors; the domain extractor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from engine.metrics.frechet import FrechetState, frechet_distance, frechet_record

torch.set_num_threads(1)


def _gaussian(rng: np.random.Generator, n: int, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    return rng.multivariate_normal(mu, cov, size=n)


def _closed_form(mu1, s1, mu2, s2) -> float:
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_mean_cov_equals_numpy_on_float32_torch_input():
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0)) * 3 + 10
    mu, sigma = FrechetState.of(x).mean_cov()
    ref = x.double().numpy()
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)
    assert sigma.dtype == np.float64


def test_merge_of_four_shards_equals_one_pass():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 8)) + np.arange(8)
    one = FrechetState.of(x)
    parts = [FrechetState.of(x[i:j]) for i, j in ((0, 100), (100, 350), (350, 351), (351, 1000))]
    merged = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]))  # any grouping
    assert merged.n == one.n == 1000
    np.testing.assert_allclose(merged.total, one.total, rtol=1e-12)
    np.testing.assert_allclose(merged.outer, one.outer, rtol=1e-12)
    for m, o in zip(merged.mean_cov(), one.mean_cov()):
        np.testing.assert_allclose(m, o, rtol=1e-10, atol=1e-12)
    # merge returns a new state and leaves its operands alone; update in place accumulates the same way
    assert parts[0].n == 100
    acc = FrechetState.empty(8)
    for i in range(0, 1000, 300):
        acc.update(torch.from_numpy(x[i:i + 300]))
    np.testing.assert_allclose(acc.outer, one.outer, rtol=1e-12)


def test_round_trips_through_plain_values():
    s = FrechetState.of(np.random.default_rng(2).normal(size=(20, 3)))
    d = s.to_dict()
    assert set(d) == {"n", "dim", "total", "outer"} and len(d["outer"]) == 9
    assert all(isinstance(v, float) for v in d["outer"])
    back = FrechetState.from_dict(d)
    assert back.n == s.n and np.array_equal(back.outer, s.outer) and np.array_equal(back.total, s.total)
    again = FrechetState.from_arrays(*s.to_arrays())
    assert np.array_equal(again.outer, s.outer)


def test_identical_sets_have_zero_distance():
    x = np.random.default_rng(3).normal(size=(500, 16)) * 2 + 1
    a, b = FrechetState.of(x), FrechetState.of(x.copy())
    assert abs(frechet_distance(a, b)) < 1e-6 * np.trace(a.mean_cov()[1])


def test_matches_the_closed_form_on_the_sample_statistics():
    rng = np.random.default_rng(4)
    d = 6
    m = rng.normal(size=(d, d))
    x = _gaussian(rng, 400, np.zeros(d), m @ m.T + np.eye(d))
    y = _gaussian(rng, 300, np.full(d, 1.5), np.diag(rng.uniform(0.5, 3, size=d)))
    mu1, s1 = x.mean(0), np.cov(x, rowvar=False)
    mu2, s2 = y.mean(0), np.cov(y, rowvar=False)
    assert frechet_distance(FrechetState.of(x), FrechetState.of(y)) == pytest.approx(
        _closed_form(mu1, s1, mu2, s2), rel=1e-8)


def test_shifted_gaussians_approach_the_population_distance():
    # N(0, diag(s1)) vs N(delta, diag(s2)): d² = |delta|² + Σ (√s1 - √s2)²
    rng = np.random.default_rng(5)
    s1, s2, delta = np.array([1.0, 4.0, 0.25]), np.array([1.0, 1.0, 1.0]), np.array([2.0, -1.0, 0.5])
    x = rng.normal(size=(200_000, 3)) * np.sqrt(s1)
    y = rng.normal(size=(200_000, 3)) * np.sqrt(s2) + delta
    want = (delta ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()  # 5.25 + 1.25 = 6.5
    assert frechet_distance(FrechetState.of(x), FrechetState.of(y)) == pytest.approx(want, rel=0.01)
    # same covariance, shifted mean: exactly |delta|² in expectation
    z = rng.normal(size=(200_000, 3)) * np.sqrt(s1) + delta
    assert frechet_distance(FrechetState.of(x), FrechetState.of(z)) == pytest.approx(5.25, rel=0.01)


def test_errors_name_the_problem():
    two = FrechetState.of(np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 2.0]]))
    with pytest.raises(ValueError, match="at least 2 samples.*second has 1"):
        frechet_distance(two, FrechetState.of(np.ones((1, 3))))
    with pytest.raises(ValueError, match="at least 2 samples.*first has 0"):
        frechet_distance(FrechetState.empty(3), two)
    with pytest.raises(ValueError, match="different dims \\(3 and 4\\)"):
        frechet_distance(two, FrechetState.of(np.ones((5, 4))))
    with pytest.raises(ValueError, match="dims 3 and 4"):
        two.merge(FrechetState.empty(4))
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        FrechetState.empty(3).update(np.ones((2, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        FrechetState.empty(2).update(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        FrechetState.of(np.ones((1, 2))).mean_cov()


def test_record_carries_extractor_and_counts():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(10, 2)), rng.normal(size=(12, 2))
    r = frechet_record(FrechetState.of(a), FrechetState.of(b), "x")
    assert r["extractor"] == "x" and (r["n_a"], r["n_b"], r["dim"]) == (10, 12, 2)
    expected = _closed_form(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert r["fid"] == pytest.approx(expected, rel=1e-6) and expected > 0


# --- the domain extractor ------------------------------------------------------------------------------------

# Smaller than tests/fixtures/zoo.py's SHAPES (800 training images) to train in seconds; test_inception's
# fallback test uses the same options and training arguments, so one of the two takes it from the cache.
SHAPES = {"size": 32, "n_train": 800, "n_test": 400, "seed": 11}


def test_domain_fid_ranks_noise_above_a_second_sample():
    from engine.data import load_dataset
    from engine.metrics.features import DomainExtractor, domain_extractor

    logs: list[str] = []
    # cache_dir=None: the suite's $CFAUDIT_CACHE (tests/conftest.py), shared with test_inception's fallback
    ext = domain_extractor("shapes", SHAPES, log=logs.append, train_kwargs={"epochs": 2})
    assert isinstance(ext, DomainExtractor) and ext.dim == 64  # the CNN's last hidden width
    assert ext.name.startswith("domain:shapes:") and len(ext.name) == len("domain:shapes:") + 12
    assert "domain:shapes:" in logs[-1]  # after the training progress lines, when it trains
    test = load_dataset("shapes", "test", **SHAPES)
    a, b = test.x[:200], test.x[200:400]
    # shapes already carries pixel noise, and a classifier learns to ignore weak noise: make it strong
    noisy = (b + 0.5 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    fa, fb, fn = ext(a), ext(b), ext(noisy)
    assert fa.shape == (200, 64) and fa.dtype == torch.float32
    # batching never changes a sample's features (eval-mode BatchNorm)
    torch.testing.assert_close(ext(a[:7]), fa[:7])
    same = frechet_distance(FrechetState.of(fa), FrechetState.of(fb))
    shifted = frechet_distance(FrechetState.of(fa), FrechetState.of(fn))
    assert same < 0.2 * shifted, (same, shifted)  # seen: 0.05 vs 1.0
    # the second call comes from the content-addressed cache: same weights, same name
    again = domain_extractor("shapes", SHAPES, log=logs.append, train_kwargs={"epochs": 2})
    assert again.name == ext.name and "cache hit" in logs[-1]
    torch.testing.assert_close(again(a[:5]), fa[:5])
