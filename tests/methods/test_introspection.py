"""Generative counterfactual introspection (Liu et al.): λ bisection, the confounder audit, frozen attributes,
prototypes, latent mode, batching and errors. Models are the shared `shapes` fixtures (tests/fixtures/zoo.py).
"""
from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from torch import nn

from engine.methods import config_hash, losses, make_method
from engine.methods.bisection import LambdaBisection
from engine.methods.introspection import IntrospectionConfig, top_changed
from engine.models.handles import GeneratorHandle, ModelBundle
from engine.types import STATUS_ALREADY, STATUS_BUDGET, STATUS_OK, QueryBatch

FAST = {"n_rounds": 5, "steps": 40}  # the defaults (8 x 100) cost ~5x more on 2 CPU cores


def flips(classifier, data, n: int, offset: int = 0, *, same: bool = False, seed: int = 0) -> QueryBatch:
    """n test images from `offset`, each aimed at the other class (binary shapes) or at its prediction."""
    x = data.x[offset:offset + n]
    with torch.no_grad():
        pred = classifier.logits(x).argmax(1)
    return QueryBatch(x=x, target=pred if same else 1 - pred, query_id=torch.arange(offset, offset + n), seed=seed)


def l1(out, q: QueryBatch) -> torch.Tensor:
    return (out.x_cf - q.x).abs().flatten(1).sum(1)


@pytest.fixture(scope="module")
def attr_bundle(confounded_cnn, shapes_attribute_autoencoder) -> ModelBundle:
    return ModelBundle(classifier=confounded_cnn, generator=shapes_attribute_autoencoder)


@pytest.fixture(scope="module")
def criticisms(attr_bundle, shapes_test):
    """One default-budget-but-FAST run on 16 flip queries, shared by the read-only checks."""
    q = flips(attr_bundle.classifier, shapes_test, 16)
    return q, make_method("introspection", FAST).explain(q, attr_bundle)


def test_defaults() -> None:
    cfg = IntrospectionConfig()
    assert (cfg.mode, cfg.lam_init, cfg.n_rounds, cfg.steps, cfg.lr) == ("auto", 1.0, 8, 100, 0.05)
    assert (cfg.lam_factor, cfg.lam_min, cfg.lam_max) == (10.0, 1e-3, 1e4)
    assert (cfg.prototypes, cfg.prototype_gain, cfg.frozen_attributes, cfg.top_k) == (True, 1.0, (), 5)


@pytest.mark.parametrize("params, match", [
    ({"mode": "pixel"}, r"introspection.mode` to be one of \['auto', 'attribute', 'latent'\]"),
    ({"lam_init": 0.0}, "lam_init` to be > 0"), ({"lam_init": 1e6}, r"lam_init` to be in \[lam_min, lam_max\]"),
    ({"lam_factor": 1.0}, "lam_factor` to be > 1"), ({"n_rounds": 0}, "n_rounds` to be an integer >= 1"),
    ({"steps": 2.5}, "steps"), ({"prototype_gain": 0.0}, "prototype_gain"),
    ({"frozen_attributes": "marker"}, "frozen_attributes` to be a sequence of attribute names"),
    ({"attribute_range": (1.0, 0.0)}, "attribute_range"), ({"bogus": 1}, "Unknown parameter")])
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_method("introspection", params)


def test_config_is_frozen_hashable_and_pickles() -> None:
    method = make_method("introspection", {"frozen_attributes": ["marker"], "n_rounds": 3})
    assert method.config.frozen_attributes == ("marker",)  # a YAML list becomes a tuple
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.config.n_rounds = 4
    clone = pickle.loads(pickle.dumps(method))
    assert clone.config == method.config and hash(clone.config) == hash(method.config)
    assert config_hash("introspection", clone.config) == config_hash("introspection", method.config)


def test_lambda_bisection_brackets_in_log_space() -> None:
    bis = LambdaBisection.start(3, 1.0, factor=10.0, lam_min=1e-3, lam_max=1e4)
    everyone = torch.ones(3, dtype=torch.bool)
    bis.update(everyone, torch.tensor([True, False, True]))     # valid: go down; invalid: go up
    assert bis.lam.tolist() == pytest.approx([0.1, 10.0, 0.1])
    bis.update(everyone, torch.tensor([False, True, True]))     # now bracketed: geometric midpoints
    assert bis.lam.tolist() == pytest.approx([0.1 ** 0.5, 10 ** 0.5, 0.01])
    assert bis.hi.tolist() == pytest.approx([1.0, 10.0, 0.1]) and bis.lo.tolist() == pytest.approx([0.1, 1.0, 0.0])
    bis.update(torch.tensor([False, False, True]), torch.tensor([False, False, True]))  # only row 2 tried
    assert bis.lam[:2].tolist() == pytest.approx([0.1 ** 0.5, 10 ** 0.5]) and bis.lam[2] == pytest.approx(1e-3)
    bis.update(torch.tensor([False, False, True]), torch.tensor([False, False, True]))
    assert bis.settled.tolist() == [False, False, True]  # valid at lam_min: nothing left to learn


def test_top_changed_lists_moved_entries_largest_first() -> None:
    delta = torch.tensor([[0.1, -0.5, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
    assert top_changed(delta, ["a", "b", "c", "d"], 2) == [["b", "d"], []]
    assert top_changed(delta, ["a", "b", "c", "d"], 5) == [["b", "d", "a"], []]


@pytest.mark.parametrize("lam", [1.0, 100.0], ids=["small-lambda", "large-lambda"])
def test_bisection_beats_a_fixed_lambda(lam: float, attr_bundle, shapes_test) -> None:
    """§3.2's claim: bisection on λ gives a smaller ‖I − I(A′)‖₁ at equal or better validity.

    A small fixed λ often never reaches c′; a large one reaches it with a larger change. The bisection's
    first round is the fixed-λ run, so per query it can only improve on it.
    """
    q = flips(attr_bundle.classifier, shapes_test, 12, offset=32)
    fixed = make_method("introspection", {**FAST, "n_rounds": 1, "lam_init": lam}).explain(q, attr_bundle)
    searched = make_method("introspection", {**FAST, "lam_init": lam}).explain(q, attr_bundle)
    assert searched.success.float().mean() >= fixed.success.float().mean()
    assert searched.success.float().mean() >= 0.9
    both = fixed.success & searched.success
    assert both.sum() >= 8
    d_fixed, d_searched = l1(fixed, q)[both], l1(searched, q)[both]
    assert (d_searched <= d_fixed + 1e-3).all()
    assert d_searched.mean() < d_fixed.mean()
    if lam == 1.0:   # too small: fixed λ misses some queries
        assert searched.success.float().mean() > fixed.success.float().mean()
    else:            # too large: fixed λ overshoots
        assert d_searched.mean() < d_fixed.mean() - 5.0
    assert fixed.lam[fixed.success].eq(lam).all()
    assert (searched.lam[searched.success] != lam).any()


def test_the_audit_finds_the_confounder(criticisms, shapes_attribute_autoencoder) -> None:
    """The confounded CNN reads the `marker`; flipping its decision edits the marker above all else (§4.2, Fig. 6)."""
    q, out = criticisms
    names = shapes_attribute_autoencoder.attribute_names
    marker = names.index("marker")
    assert out.success.float().mean() >= 0.9
    tops = [t for t, ok in zip(out.top_attributes, out.success.tolist()) if ok]
    assert sum("marker" in t for t in tops) >= 0.9 * len(tops)
    assert sum(t[:1] == ["marker"] for t in tops) >= 0.75 * len(tops)
    mean_change = out.attribute_delta[out.success].abs().mean(0)
    assert mean_change.argmax().item() == marker
    assert mean_change[marker] > 1.5 * mean_change[torch.arange(len(names)) != marker].max()


def test_output_is_the_edit_of_the_query(criticisms, attr_bundle) -> None:
    q, out = criticisms
    gen = attr_bundle.generator
    with torch.no_grad():
        z, a = gen.encode(q.x)
        torch.testing.assert_close(out.a0, a)
        torch.testing.assert_close(out.x_cf, gen.decode(z, out.a_cf), rtol=0, atol=1e-5)  # x_cf = I(A′*)
    torch.testing.assert_close(out.attribute_delta, out.a_cf - out.a0)
    assert out.a_cf.min() >= 0.0 and out.a_cf.max() <= 1.0 and out.z0 is None
    assert out.status == [STATUS_OK if s else STATUS_BUDGET for s in out.success.tolist()]
    lam = out.lam
    assert torch.isfinite(lam).all() and (lam >= 1e-3).all() and (lam <= 1e4).all()
    assert not out.prototype.any()
    assert (out.n_iter > 0).all() and (out.n_iter <= FAST["n_rounds"] * FAST["steps"]).all()


def test_residual_output_is_the_query_plus_the_edit(half_cnn, shapes_attribute_autoencoder, shapes_test) -> None:
    bundle = ModelBundle(classifier=half_cnn, generator=shapes_attribute_autoencoder)
    q = flips(half_cnn, shapes_test, 12)
    out = make_method("introspection", {**FAST, "residual": True}).explain(q, bundle)
    with torch.no_grad():
        z, a = shapes_attribute_autoencoder.encode(q.x)
        edit = shapes_attribute_autoencoder.decode(z, out.a_cf) - shapes_attribute_autoencoder.decode(z, a)
    torch.testing.assert_close(out.x_cf, (q.x + edit).clamp(0, 1), rtol=0, atol=1e-5)
    assert out.success.any() and (half_cnn.predict(out.x_cf)[out.success] == q.target[out.success]).all()


def test_frozen_attributes_never_change(attr_bundle, shapes_test, shapes_attribute_autoencoder) -> None:
    names = shapes_attribute_autoencoder.attribute_names
    q = flips(attr_bundle.classifier, shapes_test, 8, offset=16)
    # Freezing the confounder leaves the confounded CNN nothing to flip on: the audit's control run.
    out = make_method("introspection", {**FAST, "frozen_attributes": ("marker",)}).explain(q, attr_bundle)
    m = names.index("marker")
    assert torch.equal(out.a_cf[:, m], out.a0[:, m]) and (out.attribute_delta[:, m] == 0).all()
    assert not any("marker" in t for t in out.top_attributes)
    marker_frozen = float(out.success.float().mean())
    frozen = [names.index("striped"), names.index("left")]
    out = make_method("introspection", {**FAST, "frozen_attributes": ("striped", "left")}).explain(q, attr_bundle)
    assert torch.equal(out.a_cf[:, frozen], out.a0[:, frozen])
    assert out.success.float().mean() >= 0.9
    # Against the same queries with two irrelevant attributes frozen: freezing the confounder takes most flips
    # away (0.0-0.25 of 8 seen on different CPUs; a fixed cap at 0.2 failed on one), the others take none.
    assert marker_frozen <= float(out.success.float().mean()) - 0.5


def test_unknown_frozen_attribute_names_the_valid_ones(attr_bundle, shapes_test) -> None:
    q = flips(attr_bundle.classifier, shapes_test, 2)
    method = make_method("introspection", {"frozen_attributes": ("young", "marker")})
    with pytest.raises(ValueError, match=r"unknown frozen_attributes \['young'\].*'large', 'red'.*'marker', 'left'"):
        method.explain(q, attr_bundle)


def test_prototypes_raise_the_original_class_confidence(attr_bundle, shapes_test) -> None:
    """c′ = c (§3.1): valid only with a logit-gap gain over both the query and the trivial edit A′ = A."""
    q = flips(attr_bundle.classifier, shapes_test, 12, offset=48, same=True)
    out = make_method("introspection", FAST).explain(q, attr_bundle)
    handle, gen = attr_bundle.classifier, attr_bundle.generator
    assert STATUS_ALREADY not in out.status and out.prototype.all()
    assert 0.25 <= out.success.float().mean()
    ok = out.success
    with torch.no_grad():
        z, a = gen.encode(q.x)
        gap_x = losses.target_gap(handle.logits(q.x), q.target)
        gap_rec = losses.target_gap(handle.logits(gen.decode(z, a)), q.target)
        gap_cf = losses.target_gap(handle.logits(out.x_cf), q.target)
    gain = IntrospectionConfig().prototype_gain
    assert (gap_cf[ok] >= gap_x[ok] + gain - 1e-4).all() and (gap_cf[ok] >= gap_rec[ok] + gain - 1e-4).all()
    assert out.status == [STATUS_OK if s else STATUS_BUDGET for s in ok.tolist()]
    assert (out.a_cf[ok] - out.a0[ok]).abs().amax(1).min() > 1e-3   # never the trivial A′ = A
    # Without the flag these are ordinary "already" queries, returned unchanged.
    plain = make_method("introspection", {**FAST, "prototypes": False}).explain(q.select(slice(0, 3)), attr_bundle)
    assert plain.status == [STATUS_ALREADY] * 3 and torch.equal(plain.x_cf, q.x[:3]) and (plain.n_iter == 0).all()


def test_latent_mode_with_an_unconditional_vae(confounded_cnn, shapes_vae, shapes_test) -> None:
    bundle = ModelBundle(classifier=confounded_cnn, generator=shapes_vae)
    q = flips(confounded_cnn, shapes_test, 8)
    out = make_method("introspection", FAST).explain(q, bundle)  # auto: no attribute names -> latent
    assert out.a0 is None and out.z0.shape == out.z_cf.shape == (8, shapes_vae.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(out.z0, shapes_vae.encode(q.x)[0])
        torch.testing.assert_close(out.x_cf, shapes_vae.decode(out.z_cf), rtol=0, atol=1e-5)
    assert out.success.float().mean() >= 0.75
    assert all(all(n.startswith("z") for n in t) for t in out.top_attributes)  # latent units, not attributes
    moved = (out.z_cf != out.z0).any(1).tolist()  # a query may flip on G(E(x)) alone, with z unchanged
    assert [bool(t) for t in out.top_attributes] == moved  # named exactly when its latent moved
    torch.testing.assert_close(out.attribute_delta, out.z_cf - out.z0)
    with pytest.raises(ValueError, match="needs an attribute-conditioned generator"):
        make_method("introspection", {"mode": "attribute"}).explain(q, bundle)
    with pytest.raises(ValueError, match="need attribute mode"):
        make_method("introspection", {"frozen_attributes": ("marker",)}).explain(q, bundle)


def test_missing_generator_or_encoder(confounded_cnn, shapes_test) -> None:
    q = flips(confounded_cnn, shapes_test, 2)
    method = make_method("introspection", FAST)
    with pytest.raises(ValueError, match="needs a generator"):
        method.explain(q, ModelBundle(classifier=confounded_cnn))

    class DecodeOnly(nn.Module):
        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return torch.zeros((len(z), 3, 32, 32))

    no_encoder = GeneratorHandle(DecodeOnly(), "decode-only", latent_dim=4)
    with pytest.raises(ValueError, match="needs a generator with an encoder"):
        method.explain(q, ModelBundle(classifier=confounded_cnn, generator=no_encoder))


def test_batch_of_n_equals_n_single_calls_and_runs_repeat(criticisms, attr_bundle) -> None:
    """Repeats are bit-identical; single calls make every same decision and agree to 5e-3 in value.

    The convolutions round differently at batch size 1 and 16 (~1e-7); Adam on the L1 term, whose gradient
    is a sign, carries that into drifts of A′ up to ~3e-3 over 200 steps on a few queries.
    """
    q, batched = criticisms
    method = make_method("introspection", FAST)
    again = method.explain(q, attr_bundle)
    assert again.status == batched.status and torch.equal(again.x_cf, batched.x_cf)
    assert torch.equal(again.a_cf, batched.a_cf) and torch.equal(again.lam, batched.lam)
    assert again.top_attributes == batched.top_attributes
    for i in (0, 1, 11):
        single = method.explain(q.select(slice(i, i + 1)), attr_bundle)
        assert single.status == batched.status[i:i + 1] and single.n_iter.item() == batched.n_iter[i].item()
        torch.testing.assert_close(single.x_cf[0], batched.x_cf[i], rtol=0, atol=5e-3)
        torch.testing.assert_close(single.a_cf[0], batched.a_cf[i], rtol=0, atol=5e-3)
        assert single.lam[0].item() == pytest.approx(batched.lam[i].item())
        assert single.top_attributes[0] == batched.top_attributes[i]


def test_a_nan_query_is_isolated(attr_bundle, shapes_test) -> None:
    """A classifier that returns NaN for one query's edits: that query is "nan", the others are untouched."""
    q = flips(attr_bundle.classifier, shapes_test, 4, offset=64)
    inner = attr_bundle.classifier

    class NaNForQuery(nn.Module):  # NaN logits for any image closer to query 1 than to every other query
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = inner.module(x)
            d = torch.cdist(x.flatten(1), q.x.flatten(1))
            return torch.where((d.argmin(1) == 1)[:, None], torch.full_like(out, float("nan")), out)

    poisoned = ModelBundle(classifier=dataclasses.replace(inner, module=NaNForQuery()),
                           generator=attr_bundle.generator)
    out = make_method("introspection", FAST).explain(q, poisoned)
    clean = make_method("introspection", FAST).explain(q.select(torch.tensor([0, 2, 3])), attr_bundle)
    assert out.status[1] == "nan" and not out.success[1] and torch.equal(out.x_cf[1], q.x[1])
    assert [out.status[i] for i in (0, 2, 3)] == clean.status and "nan" not in clean.status
    torch.testing.assert_close(out.x_cf[[0, 2, 3]], clean.x_cf, rtol=0, atol=1e-4)


def test_empty_batch(attr_bundle, shapes_test) -> None:
    q = flips(attr_bundle.classifier, shapes_test, 2).select(slice(0, 0))
    out = make_method("introspection", FAST).explain(q, attr_bundle)
    assert len(out) == 0 and out.status == [] and out.top_attributes == []
