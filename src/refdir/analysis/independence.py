"""Representational independence (Wollschläger et al., ICML 2025, §5): do two refusal directions act through each
other?

Take the difference-in-means direction d̂ and a trained direction r, made orthogonal to d̂ (r⊥ = r − (r·d̂) d̂,
normalised), so that ablating one cannot change the other's component directly. Ablate d̂ everywhere and read the
expression of r⊥ (the projection of the residual stream on it, at the last prompt position, every layer); then
ablate r⊥ and read the expression of d̂. When neither ablation changes the other's expression, the two directions
are representationally independent; a large change means one is computed downstream of the other.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from refdir.core.activations import residuals
from refdir.core.chat import ChatFormat
from refdir.core.directions import unit_vector
from refdir.core.interventions import ablate
from refdir.errors import RefdirError

# relative change of the mean expression below which a direction counts as unaffected by the other's ablation
INDEPENDENT_BELOW = 0.1


def orthogonal_to(r: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """r with its component along d removed, unit norm; an r parallel to d is an error."""
    d_hat, r_hat = unit_vector(d), unit_vector(r)
    out = r_hat - (r_hat @ d_hat) * d_hat
    if float(out.norm()) < 1e-4:
        raise RefdirError("the trained direction is parallel to the difference-in-means one; nothing is left "
                          "after orthogonalizing it")
    return out / out.norm()


@dataclass
class Independence:
    """Mean expression per layer [L+1] of ``r⊥`` and ``d̂``, unedited and with the other ablated."""

    cos_r_d: float  # cosine of the trained direction with d̂ before orthogonalizing
    from_layer: int  # the layers compared in the headline: from_layer .. L (where the directions act)
    r_base: np.ndarray
    r_d_ablated: np.ndarray
    d_base: np.ndarray
    d_r_ablated: np.ndarray
    n_prompts: int

    @staticmethod
    def _change(base: np.ndarray, edited: np.ndarray, lo: int) -> float:
        den = float(np.abs(base[lo:]).mean())
        return float(np.abs(edited[lo:] - base[lo:]).mean() / den) if den > 0 else float("nan")

    @property
    def r_change(self) -> float:
        """Mean |Δ expression of r⊥| under ablation of d̂, relative to its mean |expression| (layers ≥ from)."""
        return self._change(self.r_base, self.r_d_ablated, self.from_layer)

    @property
    def d_change(self) -> float:
        """Mean |Δ expression of d̂| under ablation of r⊥, relative to its mean |expression|."""
        return self._change(self.d_base, self.d_r_ablated, self.from_layer)

    @property
    def independent(self) -> bool:
        return self.r_change < INDEPENDENT_BELOW and self.d_change < INDEPENDENT_BELOW

    def summary(self) -> dict:
        return {"cos_r_d": self.cos_r_d, "from_layer": self.from_layer, "n_prompts": self.n_prompts,
                "r_change_under_d_ablation": self.r_change, "d_change_under_r_ablation": self.d_change,
                "independent": self.independent, "threshold": INDEPENDENT_BELOW,
                "per_layer": {"r_base": self.r_base.tolist(), "r_d_ablated": self.r_d_ablated.tolist(),
                              "d_base": self.d_base.tolist(), "d_r_ablated": self.d_r_ablated.tolist()}}


def _expression(model, fmt, prompts, dirs: list[torch.Tensor], ablated: torch.Tensor | None, batch_size: int,
                progress: bool) -> list[np.ndarray]:
    """Mean projection per layer of the last-position residual on each unit vector of ``dirs``."""
    with ablate(model, ablated) if ablated is not None else nullcontext():
        _, kept = residuals(model, fmt, prompts, n_pos=1, batch_size=batch_size, keep=True, progress=progress,
                            desc="independence")
    x = kept[:, 0].double()  # [N, L+1, d]
    return [(x @ u.double()).mean(0).numpy() for u in dirs]


@torch.no_grad()
def independence(model: nn.Module, fmt: ChatFormat, prompts: list[str], r: torch.Tensor, d: torch.Tensor,
                 from_layer: int = 0, batch_size: int = 16, progress: bool = False) -> Independence:
    """Representational independence of ``r`` (made orthogonal to ``d``) and ``d`` on ``prompts``."""
    if not prompts:
        raise RefdirError("no prompts for the independence analysis")
    d_hat = unit_vector(d)
    r_perp = orthogonal_to(r, d)
    r_base, d_base = _expression(model, fmt, prompts, [r_perp, d_hat], None, batch_size, progress)
    (r_abl,) = _expression(model, fmt, prompts, [r_perp], d_hat, batch_size, progress)
    (d_abl,) = _expression(model, fmt, prompts, [d_hat], r_perp, batch_size, progress)
    return Independence(float(unit_vector(r) @ d_hat), from_layer, r_base, r_abl, d_base, d_abl, len(prompts))
