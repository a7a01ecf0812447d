"""Generative counterfactual introspection (Liu et al., "Generative Counterfactual Introspection for
Explainable Deep Learning"): edit the query through a generator, min λ·loss_{C,c′}(I(A′)) + ‖I − I(A′)‖₁
(Eq. 2), with λ set per query by bisection for the smallest change that still reaches c′ (§3.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from engine.methods import losses
from engine.methods.base import Method, register
from engine.methods.bisection import LambdaBisection
from engine.methods.latent_search import encode, with_residual
from engine.methods.search import AdamState, Found, SearchState, all_finite, check_field, clamp_st, descend
from engine.models.handles import GeneratorHandle, ModelBundle
from engine.types import QueryBatch

NAME = "introspection"
MODES = ("auto", "attribute", "latent")
ABORT_RTOL = 1e-4  # a round stops for a query whose loss fell < 0.01% over a tenth of the steps (C&W's abort)


@dataclass(frozen=True)
class IntrospectionConfig:
    mode: str = "auto"              # "attribute": A′ of an editor G(I; A′) (§4.2); "latent": L′ of G(L′) (§4.1); auto
    lam_init: float = 1.0           # λ of the first round (Eq. 2); not given in the paper (see class doc)
    n_rounds: int = 8               # bisection rounds on λ (§3.2 "bisection search"; count not given, C&W use 9)
    steps: int = 100                # Adam steps on Eq. 2 per round (the paper: "gradient descent", no count)
    lr: float = 0.05                # Adam step size on A′ ∈ [0, 1] or on the latent
    lam_factor: float = 10.0        # λ ×/÷ this until both ends of the bracket are known (C&W's ×10)
    lam_min: float = 1e-3           # λ bounds; valid at lam_min or invalid at lam_max ends the search
    lam_max: float = 1e4
    prototypes: bool = True         # target == prediction: a prototype (c′ = c, §3.1) instead of status "already"
    prototype_gain: float = 1.0     # a prototype must raise z_c − max_{k≠c} z_k by this many nats (forbids A′ = A)
    frozen_attributes: tuple[str, ...] = ()  # attributes A′ keeps at A, e.g. young/old in §4.2
    attribute_range: tuple[float, float] = (0.0, 1.0)  # A′ is projected onto this box (the editor's training range)
    top_k: int = 5                  # top_attributes: the k most changed attributes (Fig. 6, 8: top five)
    residual: bool = False          # I′ = I + G(edit) − G(encode(I)): CDeepEx Eq. 2's residual (not in GCI)

    def __post_init__(self) -> None:
        check_field(self.mode in MODES, NAME, "mode", f"one of {list(MODES)}", self.mode)
        for name in ("lam_init", "lam_min", "lam_max", "lr"):
            check_field(getattr(self, name) > 0.0, NAME, name, "> 0", getattr(self, name))
        check_field(self.lam_min <= self.lam_init <= self.lam_max, NAME, "lam_init", "in [lam_min, lam_max]",
                    self.lam_init)
        check_field(self.lam_factor > 1.0, NAME, "lam_factor", "> 1", self.lam_factor)
        for name in ("n_rounds", "steps", "top_k"):
            value = getattr(self, name)
            check_field(isinstance(value, int) and value >= 1, NAME, name, "an integer >= 1", value)
        check_field(self.prototype_gain > 0.0, NAME, "prototype_gain", "> 0", self.prototype_gain)
        names = self.frozen_attributes
        check_field(not isinstance(names, str) and all(isinstance(n, str) for n in names), NAME,
                    "frozen_attributes", "a sequence of attribute names", names)
        rng = tuple(self.attribute_range)
        check_field(len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng) and rng[0] < rng[1], NAME,
                    "attribute_range", "a pair (lo, hi) with lo < hi", self.attribute_range)
        # Specs arrive as YAML lists; tuples keep the config hashable.
        object.__setattr__(self, "frozen_attributes", tuple(names))
        object.__setattr__(self, "attribute_range", (float(rng[0]), float(rng[1])))


# ---- Eq. 1-2 as pure functions ----------------------------------------------------------------------------

def reached(logits: torch.Tensor, target: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Eq. 1's constraint C(I(A′)) = c′ per query [n]: argmax is the target with a logit gap ≥ need (−inf for a
    criticism; a prototype's gain, §3.1), on finite logits."""
    return all_finite(logits) & (logits.argmax(1) == target) & (losses.target_gap(logits, target) >= need)


def edit_loss(logits: torch.Tensor, x_edit: torch.Tensor, x: torch.Tensor, target: torch.Tensor, lam: torch.Tensor,
              need: torch.Tensor, prototype: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2 per query: λ·loss_{C,c′}(I(A′)) + ‖I − I(A′)‖₁, and the L1 term alone; [n] each.

    loss_{C,c′} is the CE to c′ for a criticism and, for a prototype (§3.1's confidence-maximising loss),
    the hinge max(0, need − g(I(A′))) on the logit gap g.
    """
    dist = losses.l1_distance(x_edit, x)
    push = torch.where(prototype, (need - losses.target_gap(logits, target)).clamp_min(0.0),
                       losses.cross_entropy_to_target(logits, target))
    return lam * push + dist, dist


# ---- the procedure's state -------------------------------------------------------------------------------

@dataclass
class Editor:
    """I(·): the query's edit through the generator (§3.1), for the batch rows `rows` of a parameter p [n, P].

    Attribute mode: p = A′, I(A′) = G(z0, A′) with frozen attributes kept at A. Latent mode: p = L′,
    I(L′) = G(L′) (G(L′, A) for an attribute generator). With a residual g0 = G(encode(I)): I + G(·) − g0.
    Clamped into the classifier's value range (straight-through).
    """

    generator: GeneratorHandle
    x: torch.Tensor                   # [B, *input_shape] the queries I
    z0: torch.Tensor                  # [B, L]
    a0: torch.Tensor                  # [B, A] (A = 0 for an unconditional generator)
    attribute_mode: bool
    frozen: Optional[torch.Tensor]    # [A] bool, attribute mode only
    g0: Optional[torch.Tensor]        # [B, *input_shape] with a residual, else None
    bounds: tuple[float, float]

    def __call__(self, p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        gen = self.generator
        if self.attribute_mode:
            out = gen.decode(self.z0[rows], torch.where(self.frozen, self.a0[rows], p))
        else:
            out = gen.decode(p, self.a0[rows] if gen.attribute_names else None)
        out = out.float() if self.g0 is None else with_residual(self.x[rows], out.float(), self.g0[rows])
        return clamp_st(out, *self.bounds)


@dataclass
class Best:
    """Per query, the valid iterate of smallest L1 over all rounds (Eq. 1's minimal change) and its λ."""

    param: torch.Tensor  # [B, P]
    l1: torch.Tensor     # [B], +inf: none valid yet
    lam: torch.Tensor    # [B], NaN: none valid yet

    @classmethod
    def none(cls, start: torch.Tensor) -> "Best":
        n, device = len(start), start.device
        return cls(start.clone(), torch.full((n,), float("inf"), device=device),
                   torch.full((n,), float("nan"), device=device))

    def record(self, rows: torch.Tensor, p: torch.Tensor, dist: torch.Tensor, ok: torch.Tensor,
               lam: torch.Tensor) -> None:
        """Keep the iterates p [n, P] of the rows `rows` that are valid (`ok`) and closer than the best so far."""
        better = ok & (dist < self.l1[rows])
        hit = rows[better]
        self.param[hit] = p[better]
        self.l1[hit] = dist[better]
        self.lam[hit] = lam[hit]


@dataclass
class Round:
    """One round of Eq. 2 at a fixed λ [B]: which queries reached c′, and the abort test on a stalled loss.

    C&W's abort: every `every` evaluations a query's loss must have fallen by ABORT_RTOL since the last check.
    """

    lam: torch.Tensor         # [B] float32
    valid: torch.Tensor       # [B] bool: some iterate of this round reached c′
    seen: torch.Tensor        # [B] int64 evaluations in this round
    checkpoint: torch.Tensor  # [B] loss at the last check
    every: int

    @classmethod
    def start(cls, lam: torch.Tensor, steps: int) -> "Round":
        n, device = len(lam), lam.device
        return cls(lam.float(), torch.zeros(n, dtype=torch.bool, device=device),
                   torch.zeros(n, dtype=torch.int64, device=device), torch.full((n,), float("inf"), device=device),
                   max(1, steps // 10))

    def stalled(self, rows: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """[n] bool: the rows whose loss stalled since the last check; counts this evaluation."""
        k = self.seen[rows]
        check = (k > 0) & (k % self.every == 0)
        stalled = check & ~(loss < self.checkpoint[rows] * (1.0 - ABORT_RTOL))
        self.checkpoint[rows] = torch.where(check | (k == 0), loss, self.checkpoint[rows])
        self.seen[rows] += 1
        return stalled


# ---- the method ------------------------------------------------------------------------------------------

@register
class Introspection(Method):
    """Liu et al.'s minimal-change counterfactual (Eq. 1) through its relaxation (Eq. 2), batched over queries.

    Attribute mode: (z, A) = encode(I), I(A′) = decode(z, A′) with z fixed; A′ starts at A and lives in
    `attribute_range`; frozen attributes stay at A. Latent mode: L₀ = encode(I), I(L′) = decode(L′)
    (decode(L′, A) for an attribute generator). I(·) is clamped into the classifier's value_range.
    `residual` (not in the paper) adds CDeepEx Eq. 2's residual: I(·) = I + decode(·) − decode(encode(I)), so
    a generator that does not reconstruct I edits the query instead of replacing it (see AIP's `residual`).

    Loss per query: λ·CE(C(I(A′)), c′) + ‖I − I(A′)‖₁ against the query I itself, so A′ = A still pays the
    generator's reconstruction error. Prototypes (c′ = c, §3.1) replace the CE, which is flat for a confident
    classifier, by the paper's "alternating loss ... which maximize class confidence": the hinge
    λ·max(0, g_ref + prototype_gain − g(I(A′))) on the logit gap g = z_c − max_{k≠c} z_k, with g_ref the larger
    gap of I and of the reconstruction I(A). A prototype is valid only with that gain, so A′ = A never is.

    λ search (§3.2: "repeatedly solve this optimization problem ... updating λ using bisection search"):
    every query keeps its own bracket (`LambdaBisection`); the batch runs each round together. A round
    restarts Eq. 2 from A (or L₀) with a fresh Adam for `steps` steps; a query leaves the round early once
    its loss stalls. A round is valid for a query if any iterate reached c′ (argmax; plus the gain for a
    prototype). The answer is the valid iterate with the smallest L1 over all rounds; without one, the last
    iterate of the last round (largest λ tried), status "budget".

    Defaults: the paper gives no λ, step size, iteration or round count. λ₀ = 1 with ×10 moves in
    [1e-3, 1e4] covers the CE-vs-L1 balances of images with a few thousand pixels (criticisms on `shapes`
    settle between 1e-3 and 10); 8 rounds (C&W's binary search uses 9) bracket λ within a factor 10 and then halve
    log λ, e.g. to within 15% after 4 bisections; 100 Adam steps at lr 0.05 cross A′ ∈ [0, 1] five times.

    Output: x_cf = I(A′*); a0/a_cf (attribute mode) or z0/z_cf (latent mode); attribute_delta [B, A]
    (A′* − A, or L′* − L₀ in latent mode) with its attribute_names (latent coordinates are "z<i>", the
    paper's "latent representations as our attributes"), top_attributes (per query, the top_k names by |Δ|,
    changed entries only), lam [B] (λ of the round that gave x_cf; NaN if no search ran), prototype [B] bool.
    """

    name = NAME
    Config = IntrospectionConfig
    requires = ("classifier", "generator", "encoder")
    uses_attributes = True  # the runtime keeps a z ⊕ a generator's attributes apart (attribute mode)

    def check_models(self, models: ModelBundle) -> None:
        super().check_models(models)
        self._resolve(models.generator)  # the config errors that need the generator, before the batch's

    def _search(self, batch: QueryBatch, models: ModelBundle, state: SearchState) -> Found:
        cfg, handle, gen = self.config, models.classifier, models.generator
        attribute_mode, frozen = self._resolve(gen)
        x, target = state.x, state.target
        n, device = len(x), x.device

        # Criticisms (c′ ≠ c) and prototypes (c′ = c, §3.1; begin() marked these "already").
        proto = state.already & cfg.prototypes
        state.already &= ~proto
        state.active |= proto

        # The editor I(·) and the search's start, A (or L₀).
        z0, a0 = encode(NAME, gen, x)
        state.freeze(torch.arange(n, device=device), state.active & ~(all_finite(z0) & all_finite(a0)), nan=True)
        started = state.active.clone()
        g0 = None
        if cfg.residual:  # G at the query's own code: I(A′) = I + G(z, A′) − G(z, A), I at A′ = A
            with torch.no_grad():
                g0 = gen.decode(z0, a0 if gen.attribute_names else None).float()
        edit = Editor(gen, x, z0, a0, attribute_mode, frozen.to(device) if attribute_mode else None, g0, state.bounds)
        if attribute_mode:
            start, bounds = a0.clamp(*cfg.attribute_range), cfg.attribute_range
        else:
            start, bounds = z0.clone(), None

        # A prototype's goal: the gain over the query and over the trivial edit A′ = A; criticisms need no gap.
        need = torch.full((n,), float("-inf"), device=device)
        if bool((proto & started).any()):
            rows = (proto & started).nonzero().squeeze(1)
            with torch.no_grad():
                g_rec = losses.target_gap(handle.logits(edit(start[rows], rows)).float(), target[rows])
            g_x = losses.target_gap(state.logits_orig[rows], target[rows])
            need[rows] = torch.maximum(g_x, g_rec) + cfg.prototype_gain

        bis = LambdaBisection.start(n, cfg.lam_init, factor=cfg.lam_factor, lam_min=cfg.lam_min,
                                    lam_max=cfg.lam_max, device=device)
        best = Best.none(start)
        last, last_lam = start.clone(), torch.full((n,), float("nan"), device=device)  # the last round run
        now = Round.start(bis.lam, cfg.steps)

        def evaluate(p: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Eq. 2 on the rows; records the valid iterates. Returns (loss [n], logits [n, K])."""
            x_edit = edit(p, rows)
            logits = handle.logits(x_edit).float()
            loss, dist = edit_loss(logits, x_edit, x[rows], target[rows], now.lam[rows], need[rows], proto[rows])
            with torch.no_grad():
                ok = reached(logits.detach(), target[rows], need[rows]) & torch.isfinite(dist)
                now.valid[rows] |= ok
                best.record(rows, p.detach(), dist.detach(), ok, now.lam)
            return loss, logits

        def objective(p: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, _ = evaluate(p, rows)
            return loss, now.stalled(rows, loss.detach())

        # §3.2: solve Eq. 2 at each query's λ, then move λ by bisection; repeat.
        searching = started.clone()
        for _ in range(cfg.n_rounds):
            searching &= ~state.nan & ~bis.settled
            if not bool(searching.any()):
                break
            state.active = searching.clone()
            now = Round.start(bis.lam, cfg.steps)
            param = descend(start, objective, state, AdamState.zeros_like(start), steps=cfg.steps, lr=cfg.lr,
                            bounds=bounds)
            # descend evaluates each iterate before stepping it, so the final one is scored here.
            rows = (searching & ~state.nan).nonzero().squeeze(1)
            if rows.numel():
                with torch.no_grad():
                    _, logits = evaluate(param[rows], rows)
                state.freeze(rows, ~all_finite(logits), nan=True)
            last[searching] = param[searching]
            last_lam[searching] = now.lam[searching]
            bis.update(searching & ~state.nan, now.valid)
        state.active.zero_()

        # The answer: the smallest valid edit, else the last iterate (largest λ tried).
        found = torch.isfinite(best.l1)
        final = torch.where(found.view(-1, 1), best.param, last)
        with torch.no_grad():
            x_cf = edit(final, torch.arange(n, device=device)) if n else x.clone()
        bad = started & ~all_finite(x_cf)
        state.nan |= bad
        keep = started & ~bad
        x_cf = torch.where(keep.view(-1, *([1] * (x.dim() - 1))), x_cf, x).detach()
        base = a0 if attribute_mode else z0
        if attribute_mode:
            final = torch.where(edit.frozen, a0, final)
        final = torch.where(keep.view(-1, 1), final, base).detach()
        delta = torch.where(keep.view(-1, 1), final - base, torch.zeros_like(final))
        names = list(gen.attribute_names) if attribute_mode else [f"z{i}" for i in range(final.shape[1])]
        latents = {"a0": a0, "a_cf": final} if attribute_mode else {"z0": z0, "z_cf": final}
        return Found(
            x_cf, f"no edit reached the target (a prototype: a logit-gap gain of {cfg.prototype_gain:g}) in "
                  f"{cfg.n_rounds} rounds of {cfg.steps} Adam steps with lambda <= {cfg.lam_max:g}",
            criterion=lambda logits, t: losses.target_gap(logits, t) >= need,
            outputs={"attribute_delta": delta, "attribute_names": names, "prototype": proto.clone(),
                     "top_attributes": top_changed(delta, names, cfg.top_k),
                     "lam": torch.where(found, best.lam, last_lam), **latents})

    def _resolve(self, gen: GeneratorHandle) -> tuple[bool, Optional[torch.Tensor]]:
        """(attribute mode?, frozen mask [A] bool); config errors that need the generator."""
        cfg, names = self.config, list(gen.attribute_names)
        attribute_mode = cfg.mode == "attribute" or (cfg.mode == "auto" and bool(names))
        if attribute_mode and not names:
            raise ValueError(f"{NAME}: mode 'attribute' needs an attribute-conditioned generator, but generator "
                             f"{gen.model_id!r} has no attribute_names; use mode 'latent'")
        if cfg.frozen_attributes and not attribute_mode:
            raise ValueError(f"{NAME}: frozen_attributes {list(cfg.frozen_attributes)} need attribute mode, "
                             f"but the search runs in latent mode on generator {gen.model_id!r}")
        unknown = [a for a in cfg.frozen_attributes if a not in names]
        if unknown:
            raise ValueError(f"{NAME}: unknown frozen_attributes {unknown}; generator {gen.model_id!r} has "
                             f"attributes {names}")
        if not attribute_mode:
            return False, None
        return True, torch.tensor([a in cfg.frozen_attributes for a in names], dtype=torch.bool)


def top_changed(delta: torch.Tensor, names: list[str], k: int) -> list[list[str]]:
    """Per query, the names of the (at most) k entries with the largest |Δ| > 0, largest first (Fig. 6, 8)."""
    size = delta.abs()
    order = torch.sort(size, dim=1, descending=True, stable=True).indices[:, :k].tolist()
    changed = (size > 0).tolist()
    return [[names[j] for j in row if moved[j]] for row, moved in zip(order, changed)]
