"""Attribute-Informed Perturbation (Yang et al., "Generative Counterfactuals via Attribute-Informed
Perturbation"): gradient steps on an attribute-informed latent z ⊕ a until the decoded image is
classified as the target (Alg. 1, Eq. 3, 6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.methods import losses
from engine.methods.base import Method, register
from engine.methods.latent_search import encode, with_residual
from engine.methods.search import (Found, SearchState, active_gradient, all_finite, check_field, clamp_st, rows_view,
                                   settle)
from engine.models.handles import ModelBundle
from engine.types import QueryBatch

NAME = "aip"
ATTRIBUTE_RANGE = (0.0, 1.0)  # attributes are binary annotations, "represented as one-hot vectors" (§3.2)


@dataclass(frozen=True)
class AIPConfig:
    alpha: float = 1.5     # α, weight of ‖z − z0‖₂ + ‖a − a0‖₂ (Eq. 3); images §4.2.2 (text §4.2.1: 0.8)
    beta: float = 0.9      # β, both step sizes are multiplied by β after every step (Alg. 1 l.6); text: 0.95
    n_max: int = 500       # n_max, per-query budget of steps (Alg. 1 l.4); text: 300
    mu: float = 2.0        # μ, initial step size on z (Eq. 6); text: 1
    gamma: float = 3.0     # γ, initial step size on a (Eq. 6); text: 2
    clamp_attributes: bool = True  # project a onto [0, 1]^t after every step (not in the paper; see AIP doc)
    residual: bool = False  # x_cf = x + G(z, a) − G(z0, a0): CDeepEx Eq. 2's residual (not in AIP; see AIP doc)

    def __post_init__(self) -> None:
        for name in ("alpha", "mu", "gamma"):
            check_field(getattr(self, name) >= 0.0, NAME, name, ">= 0", getattr(self, name))
        check_field(0.0 < self.beta <= 1.0, NAME, "beta", "in (0, 1]", self.beta)
        check_field(isinstance(self.n_max, int) and self.n_max >= 0, NAME, "n_max", "an integer >= 0", self.n_max)


@register
class AIP(Method):
    """Plain gradient descent on (z, a), starting at G_enc(x0) = z0 ⊕ a0, batched over queries.

    Step n (Eq. 6): z ← z − μβⁿ ∇_z L_c, a ← a − γβⁿ ∇_a L_c with
    L_c = CE(F(G_dec(z, a)), y*) + α(‖z − z0‖₂ + ‖a − a0‖₂) (Eq. 3; the multi-class CE generalises the
    paper's binary one). Eq. 6 is a plain gradient step with decayed step sizes, not Adam; n counts the
    query's own steps. Before every step a query whose decoded image F classifies as y* stops
    (validity, Alg. 1 l.4 / FR's criterion, Eq. 7) and is frozen while the others continue. Alg. 1 l.4
    prints "≠ y* or n ≤ n_max", which would never stop; read as "and n < n_max". A query that is not
    valid after n_max steps gets status "budget" (Alg. 1 l.12 "no valid counterfactual").

    Attributes: Eq. 5 searches a over R^t, but the decoder is trained only on attribute vectors drawn
    from P(a) (Eq. 4), binary annotations (§3.2); beyond [0, 1] it extrapolates and the decoded image
    leaves the data manifold that AIP is meant to stay on. `clamp_attributes` (default) therefore
    projects a onto [0, 1]^t after each step (projected gradient descent); False follows Eq. 5 literally.

    The decoded image is clamped into the classifier's value_range (straight-through; a no-op for a
    sigmoid decoder). x_cf = G_dec(z, a); a query already classified as the target, or non-finite from
    the start, keeps x_cf = x0 and z_cf, a_cf = z0, a0. CFBatch.attribute_delta = a_cf − a0 [B, t] with
    its attribute_names: the per-attribute perturbation scale that §4.6.1 (Fig. 9) reads to find
    the attributes behind a decision.

    `residual` (not in AIP, which decodes the whole image): x_cf = x + (G_dec(z, a) − G_dec(z0, a0)), the
    residual Δ = x − G(z0, a0) that CDeepEx (Eq. 2) keeps for generators that do not reconstruct x. With a
    decoder that blurs what the classifier reads (a small object's outline), G_dec(z0, a0) alone can already
    be classified differently from x, and the search then explains the generator's error, not the query.
    """

    name = NAME
    Config = AIPConfig
    requires = ("classifier", "encoder")
    uses_attributes = True  # the runtime hands AIP the z ⊕ a generator as it is, not its joint() view

    def check_models(self, models: ModelBundle) -> None:
        super().check_models(models)
        if not models.generator.attribute_names:
            raise ValueError(f"Method {NAME!r} needs an attribute-informed generator (latent z ⊕ a, AIP §3.2); "
                             f"generator {models.generator.model_id!r} has no attribute_names")

    def _search(self, batch: QueryBatch, models: ModelBundle, state: SearchState) -> Found:
        cfg, handle, gen = self.config, models.classifier, models.generator
        x, target = state.x, state.target
        z0, a0 = encode(NAME, gen, x)  # Alg. 1 l.3
        state.freeze(torch.arange(len(x), device=x.device), ~all_finite(torch.cat([z0, a0], 1)), nan=True)
        started = state.active.clone()
        k = z0.shape[1]

        g0 = None
        if cfg.residual:
            with torch.no_grad():
                g0 = gen.decode(z0, a0).float()

        def decode(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            x_new = gen.decode(w[:, :k], w[:, k:]).float()
            if tuple(x_new.shape[1:]) != tuple(x.shape[1:]):
                raise ValueError(f"{NAME}: generator {gen.model_id!r} decodes to shape {list(x_new.shape[1:])}, "
                                 f"classifier {handle.model_id!r} expects {list(x.shape[1:])}")
            if g0 is not None:
                x_new = with_residual(x[rows], x_new, g0[rows])
            return clamp_st(x_new, *state.bounds)

        def objective(w: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = handle.logits(decode(w, rows)).float()
            loss = losses.cross_entropy_to_target(logits, target[rows]) + cfg.alpha * (
                losses.l2_distance(w[:, :k], z0[rows]) + losses.l2_distance(w[:, k:], a0[rows]))
            return loss, logits.detach().argmax(1) == target[rows]

        # One parameter row per query, w = z ⊕ a, with a per-column initial step size (μ on z, γ on a).
        w0 = torch.cat([z0, a0], 1)
        lr = torch.cat([torch.full((k,), cfg.mu), torch.full((a0.shape[1],), cfg.gamma)]).to(w0)
        bounds = torch.tensor([[-torch.inf] * k + [ATTRIBUTE_RANGE[0]] * a0.shape[1],
                               [torch.inf] * k + [ATTRIBUTE_RANGE[1]] * a0.shape[1]]).to(w0)
        if not cfg.clamp_attributes:
            bounds[0, k:], bounds[1, k:] = -torch.inf, torch.inf
        w = _descend_gd(w0, objective, state, lr, cfg.beta, bounds, steps=cfg.n_max)

        x_cf = x.clone()
        if bool(started.any()):
            with torch.no_grad():
                x_cf[started] = decode(w[started], started.nonzero().squeeze(1))
        w = torch.where(rows_view(started, w), w, w0)
        z_cf, a_cf = w[:, :k].contiguous(), w[:, k:].contiguous()
        return Found(x_cf, f"decoded G(z, a) not classified as the target after n_max={cfg.n_max} steps",
                     outputs={"attribute_delta": a_cf - a0, "attribute_names": list(gen.attribute_names),
                              "z0": z0, "z_cf": z_cf, "a0": a0, "a_cf": a_cf})


def _descend_gd(param: torch.Tensor, objective: Callable[[torch.Tensor, torch.Tensor],
                                                         tuple[torch.Tensor, torch.Tensor]],
                state: SearchState, lr: torch.Tensor, decay: float, bounds: torch.Tensor, *,
                steps: int) -> torch.Tensor:
    """Up to `steps` masked plain gradient steps (Eq. 6) on the active rows of `param` [B, d].

    A row's step size is lr [d] · decay^n with n its own step count (state.n_iter); after each step
    the row is projected onto bounds [2, d]. Like search.descend: the objective is evaluated on the
    active rows only, a row that stops or turns non-finite (loss, gradient or update) is frozen at its
    last finite value, and `state` (active, done, nan, n_iter) is updated.
    """
    param = param.detach().clone()
    for _ in range(steps):
        step = active_gradient(param, objective, state)
        if step is None:
            break
        size = lr * decay ** state.n_iter[step.rows].to(step.p.dtype)[:, None]  # [n, d]
        new = torch.minimum(torch.maximum(step.p - size * step.grad, bounds[0]), bounds[1])
        bad_step = step.go & ~all_finite(new)
        go = step.go & ~bad_step
        # `where`, so a NaN in a frozen row never leaks
        settle(param, state, step, torch.where(go[:, None], new, step.p), go, bad_step)
    return param
