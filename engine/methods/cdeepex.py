"""CDeepEx (Feghahati et al., "CDeepEx: Contrastive Deep Explanations"): "why y_true and not y_probe?" answered
by the closest latent point at which D finds both classes equally likely and every other class less likely
(Eq. 2), solved with an augmented Lagrangian (Eq. 3) and the penalty schedule of Eq. 4 (Alg. 1).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from engine.methods.base import Method, register
from engine.methods.latent_search import LatentFound, find_z0
from engine.methods.search import AdamState, SearchState, check_field, descend
from engine.models.handles import ModelBundle
from engine.types import QueryBatch

NAME = "cdeepex"


@dataclass(frozen=True)
class CDeepExConfig:
    epsilon: float = 0.1       # ε: llh(true) and llh(probe) must beat every other class by ε (Eq. 2; no value given)
    tol: float = 0.05          # feasible: |h(z, true, probe)| ≤ tol, ε-constraints violated by ≤ tol (tol < ε)
    c0: float = 1.0            # initial penalty c (§3.3.1, "initial value of c is 1")
    beta: float = 1.01         # β: c ← c·β when the equality residual did not shrink enough (Eq. 4)
    gamma: float = 0.24        # γ: "enough" means ‖h^k‖ ≤ γ‖h^{k−1}‖ (Eq. 4)
    lr: float = 0.05           # Adam step on z in each unconstrained minimisation of Eq. 3 (paper: plain GD)
    inner_steps: int = 20      # gradient steps per minimisation of L_c (Eq. 3); not reported, sized for CPU
    outer_iters: int = 50      # augmented-Lagrangian iterations k (multiplier and c updates); not reported
    invert_steps: int = 300    # Alg. 2 l.3–4 budget for a generator without an encoder
    invert_lr: float = 0.05    # η of Alg. 2 l.4 (Adam step on z)
    invert_kappa: float = 1.0  # κ on CE(D(G(z)), y_true) beside ‖G(z) − x‖₂² in inversion: "a bit" (§3.3)

    def __post_init__(self) -> None:
        for name in ("epsilon", "invert_kappa"):
            check_field(getattr(self, name) >= 0.0, NAME, name, ">= 0", getattr(self, name))
        for name in ("tol", "c0", "lr", "invert_lr"):
            check_field(getattr(self, name) > 0.0, NAME, name, "> 0", getattr(self, name))
        check_field(self.beta >= 1.0, NAME, "beta", ">= 1", self.beta)
        check_field(0.0 < self.gamma < 1.0, NAME, "gamma", "in (0, 1)", self.gamma)
        for name in ("inner_steps", "outer_iters", "invert_steps"):  # outer_iters 0: the inverted start itself
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 0, NAME, name, "an integer >= 0", value)


def constraints(llh: torch.Tensor, true: torch.Tensor, probe: torch.Tensor,
                epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The constraints of Eq. 2 for log-likelihoods llh [n, K].

    Returns h [n] = llh_true − llh_probe (must be 0); g_true, g_probe [n, K] = ε − (llh_true − llh_y′)
    and ε − (llh_probe − llh_y′) (must be ≤ 0, Bertsekas' form); others [n, K] bool marks the
    y′ ∉ {true, probe} the inequalities range over (entries outside it are 0 in g).
    """
    l_true = llh.gather(1, true[:, None])
    l_probe = llh.gather(1, probe[:, None])
    cls = torch.arange(llh.shape[1], device=llh.device)
    others = (cls != true[:, None]) & (cls != probe[:, None])
    g_true = torch.where(others, epsilon - (l_true - llh), torch.zeros_like(llh))
    g_probe = torch.where(others, epsilon - (l_probe - llh), torch.zeros_like(llh))
    return (l_true - l_probe).squeeze(1), g_true, g_probe, others


def violation(h: torch.Tensor, g_true: torch.Tensor, g_probe: torch.Tensor) -> torch.Tensor:
    """max(|h|, max_y′ g₊) [n]: how far from feasible (Eq. 2) each query is, in log-likelihood units."""
    worst = torch.cat([g_true, g_probe], 1).clamp_min(0.0).amax(1) if g_true.shape[1] else torch.zeros_like(h)
    return torch.maximum(h.abs(), worst)


def augmented_lagrangian(z: torch.Tensor, z0: torch.Tensor, h: torch.Tensor, g_true: torch.Tensor,
                         g_probe: torch.Tensor, others: torch.Tensor, lam: torch.Tensor, mu: torch.Tensor,
                         mu_probe: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """L_c(z, λ, μ) of Eq. 3 per query [n]; λ, c [n]; μ, μ̃ [n, K] (used where `others`).

    The inequality terms are (1/2c) Σ_y′ (max(0, μ_y′ + c·g_y′)² − μ_y′²) with g ≤ 0 the constraint
    (Bertsekas [3]); the printed Eq. 3 writes h(z, ·, y′) in place of g, which drops ε and the sign.
    """
    c2 = c[:, None]
    ineq = (torch.where(others, (mu + c2 * g_true).clamp_min(0.0) ** 2 - mu ** 2, torch.zeros_like(mu))
            + torch.where(others, (mu_probe + c2 * g_probe).clamp_min(0.0) ** 2 - mu_probe ** 2, torch.zeros_like(mu)))
    return (z - z0).pow(2).sum(1) + lam * h + 0.5 * c * h * h + ineq.sum(1) / (2.0 * c)


@dataclass
class Multipliers:
    """Per-query augmented-Lagrangian state: λ [B], μ, μ̃ [B, K], penalty c [B], |h^{k−1}| [B] (Eq. 3–4)."""

    lam: torch.Tensor
    mu: torch.Tensor
    mu_probe: torch.Tensor
    c: torch.Tensor
    h_prev: torch.Tensor

    def take(self, rows: torch.Tensor) -> "Multipliers":
        return Multipliers(*(getattr(self, f.name)[rows] for f in fields(self)))

    def put(self, rows: torch.Tensor, new: "Multipliers") -> None:
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(new, f.name)


def multiplier_step(m: Multipliers, h: torch.Tensor, g_true: torch.Tensor, g_probe: torch.Tensor, *,
                    beta: float, gamma: float) -> Multipliers:
    """One outer iteration's update at z^k (pure).

    λ ← λ + c·h, μ ← max(0, μ + c·g), μ̃ ← max(0, μ̃ + c·g̃) (first-order updates, Bertsekas [3]);
    then c ← c·β^{1(|h^k| > γ|h^{k−1}|)} (Eq. 4).
    """
    c = m.c
    grow = h.abs() > gamma * m.h_prev
    return Multipliers(lam=m.lam + c * h, mu=(m.mu + c[:, None] * g_true).clamp_min(0.0),
                       mu_probe=(m.mu_probe + c[:, None] * g_probe).clamp_min(0.0),
                       c=torch.where(grow, c * beta, c), h_prev=h.abs())


@register
class CDeepEx(Method):
    """Alg. 1 batched over queries: z0 (Alg. 2), then Eq. 2 by the augmented Lagrangian of Eq. 3.

    y_true is D's label of x (§3.1); the probe is the query's target (the runtime's `second` by default,
    §4.1.1). Each outer iteration k runs `inner_steps` masked Adam steps on L_c, then a query whose iterate
    is feasible within `tol` leaves the loop and the others take `multiplier_step` (Eq. 4's c with h the
    equality constraint, h^{−1} at z0). One Adam runs through all k, warm-started like z: a fresh one per
    k first steps every coordinate by about lr and knocks h off the boundary again (8×8 digits, 50 k: 80%
    of the queries feasible instead of 100%). x_cf = G(z_e) + Δ (Eq. 2); explanation = G(z0) − G(z_e) (Alg. 1 l.4).

    success (the paper's criterion, not "argmax = target"): |llh_true − llh_probe| ≤ tol, both beat every other
    class by ≥ ε − tol, and D's two most likely classes are {true, probe}; the point sits on the boundary,
    so argmax f(x_cf) may be either. CFBatch also holds llh_gap h [B], margin [B] = min over y′ of
    min(llh_true, llh_probe) − llh_y′ (+inf with two classes), violation [B], penalty c [B] and residual Δ.
    """

    name = NAME
    Config = CDeepExConfig
    requires = ("classifier", "generator")

    def _search(self, batch: QueryBatch, models: ModelBundle, state: SearchState) -> LatentFound:
        cfg, handle = self.config, models.classifier
        latent = find_z0(NAME, batch, state, models.generator, handle, steps=cfg.invert_steps, lr=cfg.invert_lr,
                         kappa=cfg.invert_kappa)
        true, probe = state.logits_orig.argmax(1), state.target
        b, k = state.logits_orig.shape
        zeros = torch.zeros((b, k), device=state.x.device)
        h0 = state.logits_orig.gather(1, true[:, None]) - state.logits_orig.gather(1, probe[:, None])
        mult = Multipliers(lam=torch.zeros_like(h0[:, 0]), mu=zeros, mu_probe=zeros.clone(),
                           c=torch.full_like(h0[:, 0], cfg.c0), h_prev=h0[:, 0].abs())  # h^{−1} at z0 (Eq. 4)

        def lagrangian(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            llh = torch.log_softmax(handle.logits(latent.counterfactual(z, rows)).float(), -1)
            h, g_true, g_probe, others = constraints(llh, true[rows], probe[rows], cfg.epsilon)
            m = mult.take(rows)
            loss = augmented_lagrangian(z, latent.z0[rows], h, g_true, g_probe, others, m.lam, m.mu, m.mu_probe, m.c)
            return loss, torch.zeros_like(loss, dtype=torch.bool)

        z = latent.z0.clone()
        adam = AdamState.zeros_like(z)
        for _ in range(cfg.outer_iters):
            if not bool(state.active.any()):
                break
            z = descend(z, lagrangian, state, adam, steps=cfg.inner_steps, lr=cfg.lr)
            rows = state.active.nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            with torch.no_grad():
                llh = torch.log_softmax(handle.logits(latent.counterfactual(z[rows], rows)).float(), -1)
            finite = torch.isfinite(llh).all(1)
            h, g_true, g_probe, _ = constraints(llh, true[rows], probe[rows], cfg.epsilon)
            feasible = finite & (violation(h, g_true, g_probe) <= cfg.tol)
            state.freeze(rows, ~finite, nan=True)
            state.freeze(rows, feasible, done=True)
            go = finite & ~feasible
            mult.put(rows[go], multiplier_step(mult.take(rows[go]), h[go], g_true[go], g_probe[go],
                                               beta=cfg.beta, gamma=cfg.gamma))

        tol, eps = cfg.tol, cfg.epsilon

        def criterion(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
            llh = torch.log_softmax(logits, -1)
            h, g_true, g_probe, others = constraints(llh, true, target, eps)
            gap = torch.minimum(llh.gather(1, true[:, None]), llh.gather(1, target[:, None])) - llh
            margin = torch.where(others, gap, torch.full_like(gap, float("inf"))).amin(1)
            top2 = llh.topk(min(2, llh.shape[1]), dim=1).indices
            pair = ((top2 == true[:, None]) | (top2 == target[:, None])).all(1)
            v = violation(h, g_true, g_probe)
            return (v <= tol) & pair, {"llh_gap": h, "margin": margin, "violation": v, "penalty": mult.c}

        return LatentFound(latent, z, f"constraints of Eq. 2 not met within tol={tol} after {cfg.outer_iters} "
                                      f"augmented-Lagrangian iterations of {cfg.inner_steps} steps", success=criterion)
