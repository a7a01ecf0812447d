"""AIP: Eq. 6 steps on a toy model, validity, on-manifold vs FGSM, the marker audit (§4.6.1), batching, errors."""
from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.explain import bundle_for
from engine.methods import make_method
from engine.methods.aip import AIPConfig
from engine.models.handles import ClassifierHandle, GeneratorHandle, ModelBundle
from engine.types import STATUS_ALREADY, STATUS_BUDGET, STATUS_NAN, STATUS_OK, QueryBatch
from tests.methods.conftest import NaNNear

N_QUERIES = 100


def flipped(handle: ClassifierHandle, x: torch.Tensor, seed: int = 0) -> QueryBatch:
    """Queries aimed at the other class of the two-class shapes classifiers."""
    with torch.no_grad():
        pred = handle.logits(x).argmax(1)
    return QueryBatch(x=x, target=1 - pred, query_id=torch.arange(len(x)), seed=seed)


def vae_error(vae: GeneratorHandle, x: torch.Tensor) -> torch.Tensor:
    """‖x − VAE.decode(VAE.encode(x))‖² per image [B]: low on the data manifold the VAE learned."""
    with torch.no_grad():
        return (vae.decode(vae.encode(x)[0]) - x).flatten(1).pow(2).sum(1)


@pytest.fixture(scope="module")
def confounded_run(confounded_cnn, shapes_attribute_autoencoder, shapes_test):
    q = flipped(confounded_cnn, shapes_test.x[:N_QUERIES])
    bundle = ModelBundle(classifier=confounded_cnn, generator=shapes_attribute_autoencoder)
    return q, bundle, make_method("aip").explain(q, bundle)  # the paper's image defaults


def test_defaults_are_the_papers_image_settings() -> None:
    cfg = AIPConfig()
    assert (cfg.alpha, cfg.beta, cfg.n_max, cfg.mu, cfg.gamma) == (1.5, 0.9, 500, 2.0, 3.0)  # §4.2.2
    assert cfg.clamp_attributes is True


@pytest.mark.parametrize("params, match", [
    ({"alpha": -0.1}, "aip.alpha` to be >= 0"), ({"beta": 0.0}, r"aip.beta` to be in \(0, 1\]"),
    ({"beta": 1.5}, "beta"), ({"n_max": -1}, "aip.n_max` to be an integer >= 0"), ({"mu": -1.0}, "mu"),
    ({"gamma": "x"}, "to be a number"), ({"clamp_attributes": 1}, "to be a boolean"), ({"lr": 1}, "Unknown")])
def test_config_errors(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_method("aip", params)


def test_config_is_frozen_and_the_method_pickles() -> None:
    method = make_method("aip", {"n_max": 50})
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.config.alpha = 0.8
    clone = pickle.loads(pickle.dumps(method))
    assert clone.config == method.config == AIPConfig(n_max=50)


# --- Eq. 6 on a toy model whose gradients autograd gives us directly ---------------------------------------

class ToyAttributeAE(nn.Module):
    """x [B, 4] -> (z [B, 2], a [B, 2]); decode is linear then sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = nn.Parameter(torch.randn(4, 4, generator=g), requires_grad=False)
        self.dec = nn.Parameter(torch.randn(4, 4, generator=g), requires_grad=False)

    def encode(self, x):
        h = x @ self.enc
        return h[:, :2], torch.sigmoid(h[:, 2:])

    def decode(self, z, a):
        return torch.sigmoid(torch.cat([z, a], 1) @ self.dec)


def toy_bundle() -> ModelBundle:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        clf = nn.Linear(4, 3).requires_grad_(False)
    gen = GeneratorHandle(ToyAttributeAE(), "toy-ae", latent_dim=2, attribute_names=["p", "q"])
    return ModelBundle(classifier=ClassifierHandle(clf, "toy", (4,), ["a", "b", "c"]), generator=gen)


def toy_queries(bundle: ModelBundle, n: int, seed: int) -> QueryBatch:
    """Each query aims at a class that neither x nor its reconstruction G(z0, a0) is classified as."""
    x = torch.rand(n, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        free = torch.ones(n, 3)
        for view in (x, bundle.generator.decode(*bundle.generator.encode(x))):
            free[torch.arange(n), bundle.classifier.logits(view).argmax(1)] = 0.0
    return QueryBatch(x, free.argmax(1), torch.arange(n))


def reference_aip(bundle: ModelBundle, x: torch.Tensor, target: torch.Tensor, cfg: AIPConfig):
    """Alg. 1 for one query, written out: plain gradient steps, μβⁿ on z, γβⁿ on a, a clipped to [0, 1]."""
    z0, a0 = bundle.generator.encode(x[None])
    z, a = z0.clone(), a0.clone()
    for n in range(cfg.n_max):
        z.requires_grad_(True), a.requires_grad_(True)
        logits = bundle.classifier.logits(bundle.generator.decode(z, a))
        if logits.argmax(1).item() == target:
            break
        loss = F.cross_entropy(logits, target[None]) + cfg.alpha * ((z - z0).norm() + (a - a0).norm())
        gz, ga = torch.autograd.grad(loss, (z, a))
        z = (z - cfg.mu * cfg.beta ** n * gz).detach()
        a = (a - cfg.gamma * cfg.beta ** n * ga).detach()
        a = a.clamp(0, 1) if cfg.clamp_attributes else a
    return z.detach()[0], a.detach()[0]


@pytest.mark.parametrize("clamp", [True, False])
def test_steps_follow_eq6_with_decayed_step_sizes(clamp: bool) -> None:
    bundle = toy_bundle()
    q = toy_queries(bundle, 5, seed=2)
    cfg = AIPConfig(alpha=0.3, beta=0.7, n_max=6, mu=0.4, gamma=0.9, clamp_attributes=clamp)
    out = make_method("aip", dataclasses.asdict(cfg)).explain(q, bundle)
    assert out.n_iter.max() >= 3  # the decay matters
    for i in range(5):
        z, a = reference_aip(bundle, q.x[i], q.target[i], cfg)
        torch.testing.assert_close(out.z_cf[i], z, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.a_cf[i], a, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(out.x_cf, bundle.generator.decode(out.z_cf, out.a_cf))
    torch.testing.assert_close(out.attribute_delta, out.a_cf - out.a0)
    assert out.attribute_names == ["p", "q"]


def test_budget_status_names_n_max() -> None:
    bundle = toy_bundle()
    q = toy_queries(bundle, 3, seed=3)
    out = make_method("aip", {"n_max": 4, "mu": 1e-4, "gamma": 1e-4}).explain(q, bundle)
    budget = [i for i, s in enumerate(out.status) if s == STATUS_BUDGET]
    assert len(budget) == 3 and all(out.n_iter[i] == 4 and not out.success[i] for i in budget)
    assert all("n_max=4" in out.reason[i] for i in budget)


# --- the shared fixtures: the confounded CNN on shapes --------------------------------------------------------

def test_reaches_the_target_with_the_papers_defaults(confounded_run) -> None:
    q, bundle, out = confounded_run
    assert out.success.float().mean() > 0.7  # FR, Eq. 7 (measured: 1.0)
    assert out.status == [STATUS_OK if s else STATUS_BUDGET for s in out.success.tolist()]
    with torch.no_grad():
        decoded = bundle.generator.decode(out.z_cf, out.a_cf)
        assert (bundle.classifier.logits(decoded).argmax(1)[out.success] == q.target[out.success]).all()
    torch.testing.assert_close(out.x_cf, decoded)
    assert ((out.a_cf >= 0) & (out.a_cf <= 1)).all()
    assert (out.n_iter[out.success] >= 1).all() and out.n_iter.max() < 500  # it stops at validity


def test_counterfactuals_stay_on_the_manifold_where_fgsm_does_not(confounded_run, shapes_vae) -> None:
    """§4.4.2 / Fig. 7: AIP's samples are in-distribution, FGSM's are not, at no loss of validity."""
    q, bundle, aip = confounded_run
    fgsm = make_method("fgsm").explain(q, bundle)
    assert aip.success.float().mean() >= fgsm.success.float().mean()  # measured: 1.00 vs 0.55
    err_aip, err_fgsm = vae_error(shapes_vae, aip.x_cf), vae_error(shapes_vae, fgsm.x_cf)
    assert err_aip.mean() < 0.95 * err_fgsm.mean()  # measured: 59 vs 66
    assert err_aip[aip.success].mean() < 0.9 * err_fgsm[fgsm.success].mean()  # measured: 59 vs 71


def test_the_marker_is_the_attribute_aip_changes_most(confounded_run, shapes_oracle) -> None:
    """§4.6.1 (Fig. 9): the scale of a_cf − a0 names the attribute the decision hinges on."""
    q, _, out = confounded_run
    delta = out.attribute_delta
    names = out.attribute_names
    assert delta.shape == (len(q), len(names)) and out.a0.shape == out.a_cf.shape == delta.shape
    ranking = [names[i] for i in delta.abs().mean(0).argsort(descending=True).tolist()]
    assert ranking[0] == "marker"
    # The decoded counterfactuals really show the flipped marker to an independent attribute classifier.
    m = names.index("marker")
    with torch.no_grad():
        before, after = shapes_oracle.logits(q.x)[:, m] > 0, shapes_oracle.logits(out.x_cf)[:, m] > 0
    assert (before != after)[out.success].float().mean() > 0.9


def test_a_fair_classifier_does_not_point_at_the_marker(fair_cnn, shapes_attribute_autoencoder, shapes_test):
    q = flipped(fair_cnn, shapes_test.x[:40])
    out = make_method("aip").explain(q, ModelBundle(classifier=fair_cnn, generator=shapes_attribute_autoencoder))
    scale = out.attribute_delta.abs().mean(0)
    marker = out.attribute_names.index("marker")
    assert scale.argmax() != marker and scale[marker] < 0.5 * scale.max()


def test_residual_edits_the_query_instead_of_replacing_it(half_cnn, shapes_attribute_autoencoder, shapes_test):
    """`residual`: x_cf = x + G(z, a) − G(z0, a0) (CDeepEx Eq. 2), so no step gives back x itself."""
    gen, x = shapes_attribute_autoencoder, shapes_test.x[:12]
    q = flipped(half_cnn, x)
    bundle = ModelBundle(classifier=half_cnn, generator=gen)
    still = make_method("aip", {"n_max": 0, "residual": True}).explain(q, bundle)
    torch.testing.assert_close(still.x_cf, x)  # G(z0, a0) alone is read as a class of its own; x is not
    plain = make_method("aip", {"n_max": 0}).explain(q, bundle)
    assert (plain.x_cf - x).abs().amax() > 0.1
    out = make_method("aip", {"n_max": 100, "residual": True}).explain(q, bundle)
    with torch.no_grad():
        edit = gen.decode(out.z_cf, out.a_cf) - gen.decode(out.z0, out.a0)
    torch.testing.assert_close(out.x_cf, (x + edit).clamp(0, 1), rtol=0, atol=1e-5)
    assert out.success.any() and (half_cnn.predict(out.x_cf)[out.success] == q.target[out.success]).all()
    for i in (0, 5, 11):  # per-query residuals: a batch of N equals N single calls
        single = make_method("aip", {"n_max": 100, "residual": True}).explain(q.select(slice(i, i + 1)), bundle)
        assert single.status == out.status[i:i + 1]
        torch.testing.assert_close(single.x_cf[0], out.x_cf[i], rtol=0, atol=1e-4)


def test_batch_of_n_equals_n_single_calls_and_runs_repeat(confounded_cnn, shapes_attribute_autoencoder,
                                                          shapes_test) -> None:
    bundle = ModelBundle(classifier=confounded_cnn, generator=shapes_attribute_autoencoder)
    q = flipped(confounded_cnn, shapes_test.x[200:206], seed=5)
    target = q.target.clone()
    target[1] = 1 - target[1]  # already the prediction
    q = QueryBatch(q.x, target, q.query_id, seed=q.seed)
    statuses: set[str] = set()
    for budget in (2, 10):  # small steps and two budgets: queries that finish and queries that run out
        method = make_method("aip", {"n_max": budget, "mu": 0.005, "gamma": 0.005})
        batched = method.explain(q, bundle)
        assert batched.status[1] == STATUS_ALREADY and torch.equal(batched.x_cf[1], q.x[1])
        assert torch.equal(batched.a_cf[1], batched.a0[1]) and batched.n_iter[1] == 0
        statuses |= set(batched.status)
        for i in range(len(q)):
            single = method.explain(q.select(slice(i, i + 1)), bundle)
            assert single.status == batched.status[i:i + 1] and single.n_iter[0] == batched.n_iter[i]
            for key in ("x_cf", "z_cf", "a_cf", "z0", "a0"):
                torch.testing.assert_close(getattr(single, key)[0], getattr(batched, key)[i], rtol=0, atol=1e-4)
    assert {STATUS_OK, STATUS_BUDGET} <= statuses
    again = make_method("aip", {"n_max": 10, "mu": 0.005, "gamma": 0.005}).explain(q, bundle)
    for key in ("x_cf", "z_cf", "a_cf", "p_cf", "n_iter", "success"):
        assert torch.equal(getattr(again, key), getattr(batched, key))
    assert again.status == batched.status


def test_a_nan_query_is_isolated(confounded_cnn, shapes_attribute_autoencoder, shapes_test) -> None:
    q = flipped(confounded_cnn, shapes_test.x[:6])
    # The classifier returns NaN near query 2's reconstruction: it turns NaN at its first step.
    with torch.no_grad():
        rec = shapes_attribute_autoencoder.decode(*shapes_attribute_autoencoder.encode(q.x[2:3]))[0]
    poisoned = NaNNear(confounded_cnn.module, rec, radius=1.0, include_center=True)
    handle = dataclasses.replace(confounded_cnn, module=poisoned)
    method = make_method("aip")
    out = method.explain(q, ModelBundle(classifier=handle, generator=shapes_attribute_autoencoder))
    others = torch.tensor([0, 1, 3, 4, 5])
    clean = method.explain(q.select(others), ModelBundle(classifier=confounded_cnn,
                                                          generator=shapes_attribute_autoencoder))
    assert out.status[2] == STATUS_NAN and not out.success[2] and out.n_iter[2] == 0
    assert torch.isfinite(out.x_cf[2]).all() and torch.isfinite(out.z_cf[2]).all()
    assert [out.status[i] for i in others.tolist()] == clean.status and STATUS_NAN not in clean.status
    torch.testing.assert_close(out.x_cf[others], clean.x_cf, rtol=0, atol=1e-4)
    torch.testing.assert_close(out.a_cf[others], clean.a_cf, rtol=0, atol=1e-4)


def test_needs_an_attribute_informed_encoder(confounded_cnn, shapes_vae, shapes_attribute_autoencoder,
                                             shapes_test) -> None:
    q = flipped(confounded_cnn, shapes_test.x[:2])
    method = make_method("aip")
    with pytest.raises(ValueError, match="needs a generator"):
        method.explain(q, ModelBundle(classifier=confounded_cnn))
    no_encoder = GeneratorHandle(nn.Module(), "decoder-only", latent_dim=4, attribute_names=["marker"])
    with pytest.raises(ValueError, match="needs a generator with an encoder"):
        method.explain(q, ModelBundle(classifier=confounded_cnn, generator=no_encoder))
    with pytest.raises(ValueError, match="attribute-informed generator .* 'vae' has no attribute_names"):
        method.explain(q, ModelBundle(classifier=confounded_cnn, generator=shapes_vae))
    wrong = dataclasses.replace(shapes_attribute_autoencoder, attribute_names=["marker"])
    with pytest.raises(ValueError, match=r"encode attributes of shape \[B, 1\]"):
        method.explain(q, ModelBundle(classifier=confounded_cnn, generator=wrong))
    # The runtime keeps the attributes apart for AIP (other latent methods see z ⊕ a as one vector).
    bundle = ModelBundle(classifier=confounded_cnn, generator=shapes_attribute_autoencoder)
    assert bundle_for(method, bundle).generator is shapes_attribute_autoencoder
