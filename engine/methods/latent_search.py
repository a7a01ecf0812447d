"""Shared pieces of the searches through a generator G.

CDeepEx and xGEM represent each query by a latent z0 of G (CDeepEx Alg. 2, `find_z0`), move z with
`engine.methods.search.descend` (which runs on z [B, latent_dim] exactly as on inputs) and map it back to input
space as I_{z,z0} = G(z) + Δ with the residual Δ = x − G(z0) (CDeepEx Eq. 2; the printed Alg. 2 l.5 has the
sign flipped, which would not give back x at z = z0), clamped into the classifier's value range
(straight-through in the gradient, like the input-space searches); `LatentFound` finishes them.
AIP and introspection share `encode` (G_enc with its checks) and, for their optional `residual`,
`with_residual`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from engine.methods.search import (AdamState, SearchState, all_finite, clamp_st, descend, reasons, rows_view,
                                   statuses)
from engine.models.handles import ClassifierHandle, GeneratorHandle
from engine.seeding import per_query_normal
from engine.types import CFBatch, QueryBatch

# Salt of the GAN inversion's N(0, 1) start: CDeepEx and xGEM share it, so both start from the same draw.
Z0_SALT = "latent_search.z0"


def with_residual(x: torch.Tensor, g: torch.Tensor, g0: torch.Tensor) -> torch.Tensor:
    """x + (G(z) − G(z0)) = G(z) + Δ with Δ = x − G(z0) (CDeepEx Eq. 2): gives back x exactly at z = z0."""
    return x + (g - g0)


def encode(method: str, generator: GeneratorHandle, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G_enc(x) = (z0 [B, k], a0 [B, A]) float32, a0 [B, 0] for a generator without attributes (AIP Alg. 1 l.3).

    An attribute-informed generator must encode a0 of shape [B, len(attribute_names)]; otherwise a ValueError.
    """
    with torch.no_grad():
        z0, a0 = generator.encode(x)
    names = list(generator.attribute_names)
    if not names:
        return z0.float().flatten(1), torch.zeros((len(x), 0), device=x.device)
    if a0 is None or a0.dim() != 2 or a0.shape[1] != len(names):
        got = None if a0 is None else list(a0.shape)
        raise ValueError(f"{method}: expected generator {generator.model_id!r} to encode attributes of shape "
                         f"[B, {len(names)}] ({names}), got {got}")
    return z0.float().flatten(1), a0.float()


@dataclass
class Latent:
    """The queries' latent representation; every tensor has a leading query dim B.

    z0: [B, k] (Alg. 2 / encoder); g0: [B, *input_shape] = G(z0); a0: [B, A] fixed attributes of an
    attribute-informed generator (decoded with z, never optimised), else None.
    """

    generator: GeneratorHandle
    x: torch.Tensor
    z0: torch.Tensor
    g0: torch.Tensor
    a0: Optional[torch.Tensor]
    bounds: tuple[float, float]

    @property
    def residual(self) -> torch.Tensor:
        """Δ = x − G(z0) [B, *input_shape] (Eq. 2)."""
        return self.x - self.g0

    def decode(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """G(z) [n, *input_shape] for the batch rows `rows` [n]."""
        return self.generator.decode(z, None if self.a0 is None else self.a0[rows]).float()

    def counterfactual(self, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """I_{z,z0} = G(z) + Δ for the rows `rows`, clamped into the value range (straight-through)."""
        return clamp_st(with_residual(self.x[rows], self.decode(z, rows), self.g0[rows]), *self.bounds)


def find_z0(method: str, batch: QueryBatch, state: SearchState, generator: GeneratorHandle,
            handle: ClassifierHandle, *, steps: int, lr: float, kappa: float) -> Latent:
    """z0 for every query (CDeepEx Alg. 2) and G(z0); rows whose z0 or G(z0) is non-finite become `nan`.

    With an encoder, z0 = encode(x) (§3.3, VAE). Otherwise z0 starts at N(0, 1) seeded from
    (batch.seed, query_id) and takes `steps` masked Adam steps on ‖G(z) − x‖₂² (Eq. 1) plus κ·CE(D(G(z)),
    y_true), the "bit of misclassification cost" §3.3 adds for GANs so that G(z0) keeps D's label.
    Queries already frozen as `nan` are not inverted. Inversion steps are not counted in state.n_iter.
    """
    x, device = state.x, state.x.device
    k = int(generator.latent_dim)
    _check_output_shape(method, generator, handle, device)
    a0 = None
    with torch.no_grad():
        if generator.has_encoder:
            z0, a0 = encode(method, generator, x) if len(x) else (torch.zeros((0, k), device=device), None)
            a0 = a0 if generator.attribute_names else None
        elif generator.attribute_names:
            raise ValueError(f"{method}: generator {generator.model_id!r} is attribute-informed but has no encoder; "
                             "its attributes a0 cannot be inferred")
        else:
            z0 = per_query_normal(batch.seed, batch.query_id, (k,), Z0_SALT).to(device)
    if z0.shape[1] != k:
        raise ValueError(f"{method}: generator {generator.model_id!r} encodes to {z0.shape[1]} latent dims, "
                         f"its latent_dim says {k}")
    latent = Latent(generator, x, z0, x, a0, state.bounds)
    if not generator.has_encoder and steps > 0:
        latent.z0 = _invert(latent, state, handle, steps=steps, lr=lr, kappa=kappa)
    everything = torch.arange(len(x), device=device)
    with torch.no_grad():
        latent.g0 = latent.decode(latent.z0, everything) if len(x) else x.clone()
    bad = ~all_finite(latent.z0) | ~all_finite(latent.g0)
    state.freeze(everything, bad, nan=True)
    # A non-finite row must not poison the others through `x + G(z) − g0`; its values are never used.
    latent.g0 = torch.where(rows_view(bad, latent.g0), x, latent.g0)
    return latent


def _check_output_shape(method: str, generator: GeneratorHandle, handle: ClassifierHandle,
                        device: torch.device) -> None:
    """Decode one latent up front, so a generator for other data fails with a ValueError, not inside a conv."""
    z = torch.zeros((1, int(generator.latent_dim)), device=device)
    a = torch.zeros((1, len(generator.attribute_names)), device=device) if generator.attribute_names else None
    with torch.no_grad():
        shape = tuple(generator.decode(z, a).shape[1:])
    if shape != tuple(handle.input_shape):
        raise ValueError(f"{method}: generator {generator.model_id!r} decodes to {list(shape)}, but the classifier "
                         f"{handle.model_id!r} takes {list(handle.input_shape)}")


def _invert(latent: Latent, state: SearchState, handle: ClassifierHandle, *, steps: int, lr: float,
            kappa: float) -> torch.Tensor:
    """Alg. 2 l.2–4 on the rows not yet `nan`; marks rows whose inversion went non-finite as `nan`."""
    x = latent.x
    y_true = state.logits_orig.argmax(1)
    inv = dataclasses.replace(state, active=~state.nan, done=torch.zeros_like(state.done),
                              nan=state.nan.clone(), n_iter=torch.zeros_like(state.n_iter))

    def objective(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = latent.decode(z, rows)
        loss = (g - x[rows]).flatten(1).pow(2).sum(1)
        if kappa > 0:
            loss = loss + kappa * F.cross_entropy(handle.logits(g).float(), y_true[rows], reduction="none")
        return loss, torch.zeros_like(loss, dtype=torch.bool)

    z0 = descend(latent.z0, objective, inv, AdamState.zeros_like(latent.z0), steps=steps, lr=lr)
    state.freeze(torch.arange(len(x), device=x.device), inv.nan & ~state.nan, nan=True)
    return z0


# success(logits_cf [B, K], target [B]) -> ([B] bool, {CFBatch field: [B] diagnostics}).
Success = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def argmax_reached(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Success as "argmax D(x_cf) = target", with no diagnostics."""
    return logits.argmax(1) == target, {}


@dataclass
class LatentFound:
    """What a latent search hands to `finish_latent`: the final latents z [B, k] and how to judge them.

    success is the method's whole validity criterion (CDeepEx's does not ask for argmax = target) and its
    per-query diagnostics, typed CFBatch fields by name.
    """

    latent: Latent
    z: torch.Tensor
    budget_reason: str
    success: Success = argmax_reached

    def finish(self, state: SearchState, handle: ClassifierHandle) -> CFBatch:
        return finish_latent(state, self, handle)


def finish_latent(state: SearchState, found: LatentFound, handle: ClassifierHandle) -> CFBatch:
    """Decode the final latents and assemble the CFBatch (the latent twin of `search.finish`).

    Rows that never moved (already, nan at the start) get x_cf = x exactly. explanation = G(z0) − G(z_cf)
    (CDeepEx Alg. 1 l.4); z0, z_cf and residual = Δ. status: "nan" > "already" > "ok" > "budget".
    """
    x, latent, z = state.x, found.latent, found.z
    everything = torch.arange(len(x), device=x.device)
    moved = ~torch.eq(z, latent.z0).all(1) & all_finite(z) & all_finite(latent.z0)
    with torch.no_grad():
        g = latent.decode(z, everything) if len(x) else x.clone()
        x_cf = torch.where(rows_view(moved, x), latent.counterfactual(z, everything) if len(x) else x, x)
        logits = handle.logits(x_cf).float() if len(x) else state.logits_orig.clone()
    nan = state.nan | ~all_finite(logits) | ~all_finite(x_cf)
    criterion, diagnostics = found.success(logits, state.target)
    ok = ~nan & criterion
    status = statuses(nan, state.already, ok)
    return CFBatch(
        x_cf=x_cf, success=ok, p_orig=state.p_orig, p_cf=torch.softmax(logits, dim=-1), target=state.target,
        n_iter=state.n_iter, status=status, reason=reasons(status, found.budget_reason), z0=latent.z0,
        z_cf=z.detach().clone(), explanation=torch.where(rows_view(moved, x), latent.g0 - g, torch.zeros_like(x)),
        residual=latent.residual, **diagnostics)
