"""What the search optimises and over what: the proxy objective, the edit space and the Pareto front.

Two objectives, both from one forward pass per prompt with the edit applied as hooks (no weight copies):

- **refusal**: the mean refusal metric (refusal-token log-odds at the first answer position) on the
  harmful proxy prompts (lower is better);
- **KL**: the mean first-token KL(base ‖ edited) on the harmless proxy prompts.

Logits are taken at the last position only, with the template's common prefix run once per batch
(:func:`refdir.method.scoring.last_logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from refdir.core.architecture import inspect_model
from refdir.core.edits import COMPONENTS, DIM, Component, Edit, Kernel, Plan, hooked
from refdir.errors import RefdirError
from refdir.method.scoring import first_token_kl, last_logits, refusal_metric_from_logits


class Proxy:
    """The search objective: (mean refusal metric on harmful, mean first-token KL on harmless)."""

    def __init__(self, model, fmt, harmful: list[str], harmless: list[str], refusal_ids: list[int],
                 batch_size: int = 32):
        self.model, self.fmt, self.ids, self.bs = model, fmt, refusal_ids, batch_size
        self.arch = inspect_model(model)
        self.prompts, self.nh = harmful + harmless, len(harmful)
        base = self.base_logits = self._logits()
        self.base_metric = float(refusal_metric_from_logits(base[: self.nh], refusal_ids).mean())
        self.base_logp = torch.log_softmax(base[self.nh:].double(), -1)

    def _logits(self) -> torch.Tensor:
        return last_logits(self.model, self.fmt, self.prompts, self.bs, shared_prefix=True)

    def __call__(self, plan: Plan | None) -> tuple[float, float]:
        if plan is None:
            return self.base_metric, 0.0
        with hooked(self.model, plan, self.arch):
            lg = self._logits()
        m = float(refusal_metric_from_logits(lg[: self.nh], self.ids).mean())
        kl = float(first_token_kl(self.base_logp, lg[self.nh:]).mean())
        if not (math.isfinite(m) and math.isfinite(kl)):
            raise RefdirError("non-finite proxy scores: the model produces NaN logits under this edit")
        return m, kl


@dataclass
class Space:
    """The searched edits: a candidate position, a float layer between ``layer_lo`` and ``layer_hi``, and per
    component a strength kernel (peak up to ``max_strength``, center, width, floor) and a variant; the embedding
    edited or not; with optimized directions (``directions`` beyond ``"dim"``), which direction. Parameters are
    optuna trial parameters, so a trial's edit can be rebuilt from its params."""

    positions: list[int]
    n_layers: int
    layer_lo: float
    layer_hi: float
    max_strength: float
    variants: list[str]
    directions: tuple[str, ...] = (DIM,)  # a "direction" parameter is drawn only when there is a choice

    def suggest(self, trial) -> Edit:
        pos = trial.suggest_categorical("position", self.positions)
        layer = trial.suggest_float("layer", self.layer_lo, self.layer_hi)
        direction = trial.suggest_categorical("direction", list(self.directions)) if self._choose else DIM
        comps = {}
        L = self.n_layers
        for c in COMPONENTS:
            peak = trial.suggest_float(f"{c}_peak", 0.0, self.max_strength)
            center = trial.suggest_float(f"{c}_center", 0.0, L - 1.0)
            width = trial.suggest_float(f"{c}_width", 1.0, float(L))
            floor = trial.suggest_float(f"{c}_floor", 0.0, 1.0)  # as a fraction of the peak
            variant = trial.suggest_categorical(f"{c}_variant", self.variants)
            comps[c] = Component(Kernel(peak, center, width, floor * peak), variant)
        emb = trial.suggest_categorical("embedding", [True, False])
        return Edit(pos, layer, comps["attn"], comps["mlp"], emb, direction)

    @property
    def _choose(self) -> bool:
        return len(self.directions) > 1

    def distributions(self) -> dict:
        """The optuna distribution of every parameter :meth:`suggest` draws (for trials added with known values)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        L = self.n_layers
        d = {"position": CategoricalDistribution(self.positions),
             "layer": FloatDistribution(self.layer_lo, self.layer_hi)}
        for c in COMPONENTS:
            d |= {f"{c}_peak": FloatDistribution(0.0, self.max_strength),
                  f"{c}_center": FloatDistribution(0.0, L - 1.0), f"{c}_width": FloatDistribution(1.0, float(L)),
                  f"{c}_floor": FloatDistribution(0.0, 1.0), f"{c}_variant": CategoricalDistribution(self.variants)}
        d["embedding"] = CategoricalDistribution([True, False])
        if self._choose:
            d["direction"] = CategoricalDistribution(list(self.directions))
        return d

    def full_params(self, position: int, layer: float, variant: str = "plain", direction: str = DIM) -> dict:
        """Trial parameters whose edit is full strength everywhere (width L covers every layer at peak)."""
        L = self.n_layers
        p = {"position": position, "layer": float(min(max(layer, self.layer_lo), self.layer_hi)), "embedding": True}
        if self._choose:
            p["direction"] = direction
        elif direction != DIM:
            raise RefdirError(f"direction {direction!r} is not in the searched space")
        for c in COMPONENTS:
            p |= {f"{c}_peak": min(1.0, self.max_strength), f"{c}_center": (L - 1) / 2, f"{c}_width": float(L),
                  f"{c}_floor": 1.0, f"{c}_variant": variant}
        return p

    def scaled_params(self, params: dict, a: float) -> dict:
        """The same edit with both components' peaks times ``a`` (clipped to the searched maximum); floors are
        stored as fractions of the peak, so they scale too."""
        q = dict(params)
        for c in COMPONENTS:
            q[f"{c}_peak"] = float(min(self.max_strength, max(0.0, params[f"{c}_peak"] * a)))
        return q


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimised), sorted by the second."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0]))
    front, best = [], math.inf
    for i in order:
        if points[i][0] < best:
            front.append(i)
            best = points[i][0]
    return front


# TPE treats edits whose proxy KL lies outside [KL_BAND[0]·smallest mark, KL_BAND[1]·largest mark] as infeasible, so
# that its few best trials (the tenth of them it models as "good") sit where the KL budgets are, not at the front's ends
KL_BAND = (0.5, 1.2)


def kl_band(marks: list[float]) -> tuple[float, float]:
    """The proxy KL range TPE treats as feasible for these KL marks (see ``KL_BAND``)."""
    return KL_BAND[0] * min(marks), KL_BAND[1] * max(marks)


def set_band(trial, kl: float, band: tuple[float, float]) -> None:
    """Record how far the trial's KL lies outside the band (≤ 0 inside): optuna's constraints, which TPE reads."""
    trial.set_constraint("kl_low", band[0] - kl)
    trial.set_constraint("kl_high", kl - band[1])
