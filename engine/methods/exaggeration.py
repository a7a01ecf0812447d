"""Explanation by Progressive Exaggeration (Singla et al., ICLR 2020): forward passes through a trained explainer.

The explainer I_f(x, δ) = G(E(x), c_f(x, δ)) (Eq. 2) is trained once per classifier
(engine/models/explainer_training.py) and arrives in `ModelBundle.explainer`; explaining a batch is then a
progressive series x_δ over the bins of f(x) = P(positive class | x), the classifier's output at each step,
the counterfactual at the end of the series on the target's side, and the saliency map of §4.3.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.methods.base import Method, register
from engine.methods.search import Found, SearchState, check_field
from engine.models.explainer_training import bin_centres, bin_index, positive_log_probs
from engine.models.handles import ModelBundle
from engine.types import QueryBatch

NAME = "exaggeration"


@dataclass(frozen=True)
class ExaggerationConfig:
    deltas: tuple[float, ...] = ()  # requested δ's (f(x) + δ, clamped to [0, 1]); empty: the whole series, one
                                    # step per bin (Fig. 2-3), desired = the bin centre (k + 0.5) / num_bins
    chunk: int = 256                # queries decoded at once (memory bound: chunk · S images in flight)

    def __post_init__(self) -> None:
        deltas = tuple(float(d) for d in self.deltas)
        object.__setattr__(self, "deltas", deltas)
        check_field(all(-1.0 <= d <= 1.0 for d in deltas), NAME, "deltas", "values in [-1, 1]", deltas)
        check_field(isinstance(self.chunk, int) and self.chunk >= 1, NAME, "chunk", "an integer >= 1", self.chunk)


def saliency(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """§4.3: |x_δ(f=1) − x_δ(f=0)| scaled to [0, 1] per query by its maximum. [B, *shape] -> [B, *shape]."""
    diff = (high - low).abs()
    peak = diff.flatten(1).amax(1).clamp_min(1e-12)
    return diff / peak.view(-1, *([1] * (diff.dim() - 1)))


@register
class Exaggeration(Method):
    """Progressive series through the classifier's trained explainer, batched over queries and steps.

    Output: path [B, S, *shape] (S = num_bins, or len(deltas)); desired [B, S] = f(x) + δ
    (bin centres for the whole series), achieved [B, S] = f(x_δ), bins [B, S];
    x_cf = the series' last step if the target is the explainer's positive class, else its first step
    (Table 3: f(x) + δ > 0.9 or < 0.1); success = argmax f(x_cf) == target; n_iter = S;
    explanation = saliency [B, *shape] in [0, 1] (§4.3, from the bins at both ends of f's range).
    An "already" query (classified as its target) keeps x_cf = x and n_iter = 0, but gets its series.
    """

    name = NAME
    Config = ExaggerationConfig
    requires = ("classifier", "explainer")
    explanation_kind = "saliency"

    def _search(self, batch: QueryBatch, models: ModelBundle, state: SearchState) -> Found:
        cfg, handle = self.config, models.classifier
        device, n = state.x.device, len(state.x)
        explainer = models.explainer.to(device).eval()
        nb, pos = int(explainer.num_bins), int(explainer.positive_class)
        if pos >= handle.num_classes:
            raise ValueError(f"{NAME}: the explainer exaggerates class {pos} but model {handle.model_id!r} has "
                             f"{handle.num_classes} classes")
        with torch.no_grad():
            f0 = positive_log_probs(state.logits_orig, pos)[0].exp() if n else torch.zeros(0, device=device)
            f0 = torch.nan_to_num(f0, nan=0.5)  # a NaN query still gets a (meaningless) series; its status is nan
            if cfg.deltas:
                deltas = torch.tensor(cfg.deltas, device=device)
                desired = (f0[:, None] + deltas[None, :]).clamp(0.0, 1.0)
                bins = bin_index(desired, nb)
            else:
                bins = torch.arange(nb, device=device).expand(n, nb)
                desired = bin_centres(nb, device).expand(n, nb).clone()
            s = bins.shape[1]
            ends = torch.tensor([0, nb - 1], device=device).expand(n, 2)
            all_bins = torch.cat([bins, ends], dim=1)  # the saliency's two extremes ride along
            images = (torch.cat([self._series(explainer, state.x[i:i + cfg.chunk], all_bins[i:i + cfg.chunk])
                                 for i in range(0, n, cfg.chunk)]) if n
                      else state.x.new_zeros((0, s + 2, *state.x.shape[1:])))
            path, low, high = images[:, :s], images[:, s], images[:, s + 1]
            achieved = (positive_log_probs(handle.logits(path.flatten(0, 1)), pos)[0].exp().view(n, s) if n
                        else desired.clone())
        # The step on the target's side: the highest desired f for the positive class, the lowest otherwise.
        pick = torch.where(state.target == pos, desired.argmax(1), desired.argmin(1))
        x_cf = path[torch.arange(n, device=device), pick]
        keep = state.already | state.nan
        x_cf = torch.where(keep.view(-1, *([1] * (x_cf.dim() - 1))), state.x, x_cf)
        state.n_iter = torch.where(keep, torch.zeros_like(state.n_iter), torch.full_like(state.n_iter, s))
        rows = torch.arange(n, device=device)
        wanted, got = desired[rows, pick].tolist(), achieved[rows, pick].tolist()
        budget = [f"the series' end point for the target (desired f={w:.2f}, achieved f={a:.2f} for class {pos}) is "
                  "not classified as the target" for w, a in zip(wanted, got)]
        return Found(x_cf, budget, outputs={"desired": desired, "achieved": achieved, "bins": bins, "path": path,
                                            "explanation": saliency(low, high)})

    @staticmethod
    def _series(explainer, x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
        """G(E(x), bins) for every query and step: x [b, *shape], bins [b, S] -> [b, S, *shape]; E runs once."""
        b, s = bins.shape
        codes = explainer.encode(x)
        images = explainer.decode([t.repeat_interleave(s, dim=0) for t in codes], bins.reshape(-1))
        return images.view(b, s, *x.shape[1:])

