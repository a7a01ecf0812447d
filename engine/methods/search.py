"""Shared batched machinery of the searches: `begin` and `finish`, the first and last steps of every method's
`explain` (the template in engine.methods.base), and the masked optimisation loop (`descend`).

Per-query state is a set of tensors with a leading query dim B (`SearchState`). A query leaves the
optimisation by clearing its bit in `SearchState.active`; from then on no step reads or writes its
row: `descend` gathers the active rows, steps them with a masked functional Adam and scatters them
back, so a finished query keeps its values and Adam moments while the others continue. A query
whose loss, gradient or update is non-finite is frozen at its last finite values with status "nan".

Per-query losses are summed before the gradient, so each query gets exactly the gradient it would
get alone: the classifier must treat rows independently (eval mode, no batch statistics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Union

import torch

from engine.data.schema import SchemaCodec
from engine.models.handles import ClassifierHandle, ModelBundle
from engine.types import STATUS_ALREADY, STATUS_BUDGET, STATUS_NAN, STATUS_OK, CFBatch, QueryBatch

ADAM_BETAS = (0.9, 0.999)  # Kingma & Ba defaults, as used by both papers' Adam
ADAM_EPS = 1e-8

# objective(param_rows [n, ...], rows [n] int64 indices into the batch) -> (loss [n], stop [n] bool).
# `stop` is evaluated at the given param, before the update: a stopped row is frozen as it is.
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# criterion(logits_cf [B, K], target [B]) -> [B] bool: what a method asks of x_cf beyond argmax = target.
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def clamp_st(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(x, lo, hi) in the forward pass, identity in the backward pass (straight-through).

    torch.clamp has zero gradient at and beyond the bounds, which would leave a value that starts
    (or is projected) there stuck forever.
    """
    return x + (x.clamp(lo, hi) - x).detach()


def rows_view(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [B] mask viewed as [B, 1, ..., 1] to broadcast against `like` [B, ...]."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B] bool: every value of the row is finite."""
    return torch.isfinite(x.flatten(1)).all(1) if x.dim() > 1 else torch.isfinite(x)


@dataclass
class AdamState:
    """Adam moments per entry and the step count per query (t counts this query's own steps)."""

    m: torch.Tensor  # [B, ...]
    v: torch.Tensor  # [B, ...]
    t: torch.Tensor  # [B] int64

    @classmethod
    def zeros_like(cls, param: torch.Tensor) -> "AdamState":
        return cls(torch.zeros_like(param), torch.zeros_like(param),
                   torch.zeros(param.shape[0], dtype=torch.int64, device=param.device))

    def reset(self, rows: torch.Tensor) -> None:
        """Start a fresh optimiser for the rows in the [B] bool mask."""
        self.m[rows] = 0.0
        self.v[rows] = 0.0
        self.t[rows] = 0

    def take(self, index: torch.Tensor) -> "AdamState":
        return AdamState(self.m[index], self.v[index], self.t[index])

    def put(self, index: torch.Tensor, rows: "AdamState") -> None:
        self.m[index] = rows.m
        self.v[index] = rows.v
        self.t[index] = rows.t


def masked_adam_step(param: torch.Tensor, grad: torch.Tensor, state: AdamState, active: torch.Tensor,
                     lr: float, betas: tuple[float, float] = ADAM_BETAS,
                     eps: float = ADAM_EPS) -> tuple[torch.Tensor, AdamState]:
    """One Adam step on the rows where `active` [B] is True; other rows (values, moments, t) are kept.

    Pure: returns the new param and state. Inactive rows are selected with `torch.where`, never
    multiplied by 0, so a NaN gradient in a frozen row cannot leak into its values.
    """
    b1, b2 = betas
    a = rows_view(active, param)
    t = state.t + active.long()
    m = torch.where(a, b1 * state.m + (1 - b1) * grad, state.m)
    v = torch.where(a, b2 * state.v + (1 - b2) * grad * grad, state.v)
    tf = rows_view(t.clamp_min(1).to(param.dtype), param)
    m_hat = m / (1 - torch.pow(b1, tf))
    v_hat = v / (1 - torch.pow(b2, tf))
    new = torch.where(a, param - lr * m_hat / (v_hat.sqrt() + eps), param)
    return new, AdamState(m, v, t)


@dataclass
class SearchState:
    """Per-query bookkeeping of one `explain` call; every tensor is [B] on the models' device."""

    x: torch.Tensor          # [B, *input_shape] the queries
    target: torch.Tensor     # [B] int64
    logits_orig: torch.Tensor  # [B, K]
    active: torch.Tensor     # still optimising
    done: torch.Tensor       # stopped by the method's own criterion
    nan: torch.Tensor        # frozen because something became non-finite
    already: torch.Tensor    # classified as the target before any change
    n_iter: torch.Tensor     # int64 optimiser steps taken
    codec: Optional[SchemaCodec] = None  # tabular schema: project onto valid records (engine.data.schema)
    bounds: tuple[float, float] = (0.0, 1.0)  # the classifier's value_range (lo, hi) as floats

    def project(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [n, D] (the rows `rows` of the batch, default all) as valid records; identity without a schema."""
        if self.codec is None:
            return x
        return self.codec.project(x, self.x if rows is None else self.x[rows])

    def movable(self) -> Optional[torch.Tensor]:
        """[D] bool: columns a search may change (None: all); immutable features are excluded."""
        return None if self.codec is None else ~self.codec.immutable_columns

    @property
    def p_orig(self) -> torch.Tensor:
        return torch.softmax(self.logits_orig, dim=-1)

    def freeze(self, rows: torch.Tensor, mask: torch.Tensor, *, nan: bool = False, done: bool = False) -> None:
        """Leave the loop for `rows` (indices) where `mask` holds, marking them nan or done."""
        hit = rows[mask]
        self.active[hit] = False
        if nan:
            self.nan[hit] = True
        if done:
            self.done[hit] = True


def begin(method: str, batch: QueryBatch, models: ModelBundle) -> SearchState:
    """Validate the batch, move it to `models.device`, classify the originals and set up the masks."""
    handle = models.classifier
    device = torch.device(models.device)
    shape = tuple(handle.input_shape)
    if tuple(batch.x.shape[1:]) != shape:
        raise ValueError(f"{method}: expected queries of shape [B, {', '.join(map(str, shape))}] for model "
                         f"{handle.model_id!r}, got {list(batch.x.shape)}")
    k = handle.num_classes
    target = batch.target.to(device=device, dtype=torch.int64)
    if len(target) and (int(target.min()) < 0 or int(target.max()) >= k):
        raise ValueError(f"{method}: expected targets in [0, {k}) for model {handle.model_id!r}, "
                         f"got values in [{int(target.min())}, {int(target.max())}]")
    # clone: an inference-mode tensor from the caller could not enter autograd.
    x = batch.x.to(device=device, dtype=torch.float32).clone()
    with torch.no_grad():
        logits = handle.logits(x).float() if len(x) else torch.zeros((0, k), device=device)
    finite = all_finite(logits)
    already = finite & (logits.argmax(1) == target)
    codec = None
    if models.schema is not None:
        codec = models.schema.codec(device)
        codec.check_width(int(math.prod(shape)), f"{method}: model {handle.model_id!r}")
    return SearchState(
        x=x, target=target, logits_orig=logits,
        active=finite & ~already, done=torch.zeros_like(finite), nan=~finite, already=already,
        n_iter=torch.zeros(len(x), dtype=torch.int64, device=device), codec=codec,
        bounds=(float(handle.value_range[0]), float(handle.value_range[1])))


@dataclass
class ActiveStep:
    """One gradient evaluation on the active rows: rows [n], param rows p and grad [n, ...], masks [n]."""

    rows: torch.Tensor
    p: torch.Tensor
    grad: torch.Tensor
    go: torch.Tensor        # finite, not stopped, finite gradient: these rows may step
    finite: torch.Tensor    # finite loss
    stop: torch.Tensor      # the objective's own stopping test held
    bad_grad: torch.Tensor  # finite loss but a non-finite gradient


def active_gradient(param: torch.Tensor, objective: Objective, state: SearchState) -> Optional[ActiveStep]:
    """Evaluate `objective` on the active rows only and take its gradient; None when no row is active.

    Rows that stop or whose loss is non-finite contribute a zero loss, so they get no gradient.
    """
    rows = state.active.nonzero().squeeze(1)
    if rows.numel() == 0:
        return None
    p = param[rows].requires_grad_(True)
    with torch.enable_grad():
        loss, stop = objective(p, rows)
        finite = torch.isfinite(loss)
        go = finite & ~stop
        if bool(go.any()):
            (grad,) = torch.autograd.grad(torch.where(go, loss, torch.zeros_like(loss)).sum(), p)
        else:
            grad = torch.zeros_like(p)
    bad_grad = go & ~all_finite(grad)
    return ActiveStep(rows, p.detach(), grad, go & ~bad_grad, finite, stop, bad_grad)


def settle(param: torch.Tensor, state: SearchState, step: ActiveStep, new: torch.Tensor, go: torch.Tensor,
           bad_step: torch.Tensor) -> None:
    """Write the stepped rows back and update `state`: count steps, freeze nan and finished rows.

    `new` must already hold the old values wherever `go` is False.
    """
    param[step.rows] = new
    state.n_iter[step.rows] += go.long()
    state.freeze(step.rows, ~step.finite | step.bad_grad | bad_step, nan=True)
    state.freeze(step.rows, step.finite & step.stop, done=True)


def descend(param: torch.Tensor, objective: Objective, state: SearchState, adam: AdamState, *, steps: int,
            lr: float, bounds: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Up to `steps` masked Adam steps on the active rows of `param` [B, ...]; returns the new param.

    Each step: evaluate `objective` on the active rows only; freeze rows that stop or go non-finite;
    step the rest; project them onto `bounds`. Updates `state` (active, done, nan, n_iter) and `adam`.
    """
    param = param.detach().clone()
    for _ in range(steps):
        step = active_gradient(param, objective, state)
        if step is None:
            break
        go, p = step.go, step.p
        old = adam.take(step.rows)
        new, sub = masked_adam_step(p, step.grad, old, go, lr)
        if bounds is not None:
            new = torch.where(rows_view(go, new), new.clamp(*bounds), new)
        bad_step = go & ~all_finite(new)
        if bool(bad_step.any()):  # revert the rows whose update overflowed
            go = go & ~bad_step
            keep = rows_view(go, new)
            new = torch.where(keep, new, p)
            sub = AdamState(torch.where(keep, sub.m, old.m), torch.where(keep, sub.v, old.v),
                            torch.where(go, sub.t, old.t))
        adam.put(step.rows, sub)
        settle(param, state, step, new, go, bad_step)
    return param


_REASONS = {
    STATUS_OK: "",
    STATUS_ALREADY: "the query is already classified as the target",
    STATUS_NAN: "the search produced non-finite values; the query was frozen at its last finite state",
}


def argmax_only(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The criterion of a method that asks nothing beyond argmax f(x_cf) = target."""
    return torch.ones_like(target, dtype=torch.bool)


def statuses(nan: torch.Tensor, already: torch.Tensor, ok: torch.Tensor) -> list[str]:
    """Per-query status from [B] bool masks: "nan" > "already" > "ok" > "budget"."""
    return [STATUS_NAN if n else STATUS_ALREADY if a else STATUS_OK if s else STATUS_BUDGET
            for n, a, s in zip(nan.tolist(), already.tolist(), ok.tolist())]


def reasons(status: list[str], budget_reason: Union[str, list[str]]) -> list[str]:
    """Per-query reason: `budget_reason` (one text, or one per query) where the status is "budget"."""
    per_query = [budget_reason] * len(status) if isinstance(budget_reason, str) else budget_reason
    return [b if s == STATUS_BUDGET else _REASONS[s] for s, b in zip(status, per_query)]


class Outcome(Protocol):
    """What a method's `_search` returns: it knows how to finish itself into a CFBatch (`Found`, `LatentFound`)."""

    def finish(self, state: SearchState, handle: ClassifierHandle) -> CFBatch: ...


@dataclass
class Found:
    """What an input-space method's search hands to `finish` (the template's last step, `Method.explain`).

    x_cf [B, *input_shape] the counterfactuals (before the schema projection); budget_reason why a query that
    ends "budget" failed (one text, or one per query); criterion what success asks beyond argmax = target;
    outputs the method's own typed CFBatch fields (z0, a_cf, path, mask, ...), by field name.
    """

    x_cf: torch.Tensor
    budget_reason: Union[str, list[str]]
    criterion: Criterion = argmax_only
    outputs: dict[str, Any] = field(default_factory=dict)

    def finish(self, state: SearchState, handle: ClassifierHandle) -> CFBatch:
        return finish(state, self, handle)


def finish(state: SearchState, found: Found, handle: ClassifierHandle) -> CFBatch:
    """Project the counterfactuals onto valid records (tabular schema), classify them, assemble the CFBatch.

    success = (argmax f(x_cf) == target) AND found.criterion(logits_cf, target) [B] bool, for every row
    (an "already" row included); status: "nan" > "already" > "ok" (success) > "budget";
    explanation = x_cf − x unless the method gives its own.
    """
    x_cf = state.project(found.x_cf)
    with torch.no_grad():
        logits = handle.logits(x_cf).float() if len(x_cf) else state.logits_orig.clone()
    nan = state.nan | ~all_finite(logits) | ~all_finite(x_cf)
    success = ~nan & (logits.argmax(1) == state.target) & found.criterion(logits, state.target)
    status = statuses(nan, state.already, success)
    outputs = {"explanation": x_cf - state.x, **found.outputs}
    return CFBatch(
        x_cf=x_cf, success=success, p_orig=state.p_orig, p_cf=torch.softmax(logits, dim=-1),
        target=state.target, n_iter=state.n_iter, status=status, reason=reasons(status, found.budget_reason),
        **outputs)


def check_field(ok: bool, method: str, field: str, expected: str, value: object) -> None:
    """Raise the config error the project uses: names the field, the expectation and the value."""
    if not ok:
        raise ValueError(f"Expected `{method}.{field}` to be {expected} but got {value!r}")
