"""Targeted fast gradient sign method (Goodfellow et al. 2015; targeted and iterative forms: Kurakin et al.
2017), the adversarial baseline of AIP's image comparison (§4.1.4, Fig. 6-7): one signed-gradient step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.methods import losses
from engine.methods.base import Method, register
from engine.methods.search import Found, SearchState, active_gradient, check_field, rows_view, settle
from engine.models.handles import ModelBundle
from engine.types import QueryBatch

NAME = "fgsm"


@dataclass(frozen=True)
class FGSMConfig:
    epsilon: float = 0.1  # ε, L∞ size of each signed step in input units; 0.1 suits inputs in [0, 1] (see FGSM doc)
    steps: int = 1        # 1: FGSM's single step; > 1: the iterative variant, ε per step, stopping at the target

    def __post_init__(self) -> None:
        check_field(self.epsilon > 0.0, NAME, "epsilon", "> 0", self.epsilon)
        check_field(isinstance(self.steps, int) and self.steps >= 1, NAME, "steps", "an integer >= 1", self.steps)


@register
class FGSM(Method):
    """x′ ← clip(x′ − ε · sign(∇_x′ CE(f(x′), target))), starting at x′ = x, batched over queries.

    The targeted form descends the cross-entropy to the target; for two classes it is the paper's
    "maximise the loss of the original prediction". clip is the classifier's value_range. With
    steps > 1 a query stops before a step once f(x′) predicts the target and is frozen while the
    others continue; there is no projection onto the ε-ball around x, so after n steps ‖x′ − x‖∞ ≤ nε.
    success = argmax f(x′) == target. With a tabular schema immutable columns take no step and x′ is
    judged (and returned) projected onto a valid record. ε is absolute: the papers give no value (AIP §4.1.4 neither);
    0.1 is a visible but small change on [0, 1] images; scale it with the value range for other data.
    """

    name = NAME
    Config = FGSMConfig
    requires = ("classifier",)

    def _search(self, batch: QueryBatch, models: ModelBundle, state: SearchState) -> Found:
        cfg, handle = self.config, models.classifier
        x_cf = state.x.clone()
        movable = state.movable()  # tabular schema: immutable columns take no step

        def objective(x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, target = handle.logits(x).float(), state.target[rows]
            with torch.no_grad():  # judged on the valid record when there is a tabular schema
                judged = logits if state.codec is None else handle.logits(state.project(x.detach(), rows)).float()
            return losses.cross_entropy_to_target(logits, target), judged.argmax(1) == target

        for _ in range(cfg.steps):
            step = active_gradient(x_cf, objective, state)
            if step is None:
                break
            sign = step.grad.sign() if movable is None else step.grad.sign() * movable
            new = (step.p - cfg.epsilon * sign).clamp(*state.bounds)
            settle(x_cf, state, step, torch.where(rows_view(step.go, new), new, step.p), step.go,
                   torch.zeros_like(step.go))
        return Found(x_cf, f"not classified as the target after {cfg.steps} signed step(s) of epsilon={cfg.epsilon}")
