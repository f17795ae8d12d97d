"""Mechanistic analysis of the refusal direction (paper §5).

- :func:`geometry`: per layer, PCA of harmful and harmless residuals at one post-instruction position;
  PC1's explained variance, its cosine with that layer's difference in means and with r̂, and how well
  PC1 (and the projection on r̂) separates the two sets (ROC AUC).
- :func:`expression`: the cosine between the residual and r̂ at every layer, per prompt, for any
  groups of prompts (the paper's Figure 5).
- heads (:mod:`refdir.analysis.heads`): each attention head's direct contribution to r̂, and the attention
  shares on the instruction and the suffix (Figure 6); plots in :mod:`refdir.analysis.plots`.

Residual points follow :mod:`refdir.core.activations`: layer ``l`` is the input of block ``l``; layer L is
the output of the last block. A direction found at layer ``l`` is therefore written by blocks
``0 .. l-1``. Everything returns numpy arrays in dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from refdir.core.activations import residuals
from refdir.core.chat import ChatFormat
from refdir.core.directions import unit_vector
from refdir.errors import RefdirError


def check_position(fmt: ChatFormat, position: int) -> int:
    """``position`` if it is one of the post-instruction positions (-n_post .. -1), else one clear error."""
    if not -fmt.n_post <= position <= -1:
        raise RefdirError(f"position {position} is not a post-instruction position (-{fmt.n_post} .. -1)")
    return position


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of ``scores`` for ``labels`` (1 = positive), ties counted half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


# ------------------------------------------------------------------------------------------------ geometry
@dataclass
class Geometry:
    """Per-layer geometry of harmful (label 1) vs harmless (label 0) residuals at one position.

    PC1 is oriented so that the harmful mean projects higher than the harmless mean."""

    position: int
    labels: np.ndarray  # [N]
    pc1_var: np.ndarray  # [L+1] explained-variance ratio of PC1
    pc2_var: np.ndarray  # [L+1]
    cos_pc1_diff: np.ndarray  # [L+1] cos(PC1, mean(harmful) − mean(harmless)) at that layer
    cos_pc1_r: np.ndarray  # [L+1] cos(PC1, r̂)
    auc_pc1: np.ndarray  # [L+1] AUC of the PC1 coordinate
    auc_r: np.ndarray  # [L+1] AUC of the projection on r̂
    coords: np.ndarray  # [L+1, N, 2] PC1 / PC2 coordinates

    @property
    def n_layers(self) -> int:
        return len(self.pc1_var) - 1

    def _auc(self, on: str) -> np.ndarray:
        if on not in ("pc1", "r"):
            raise RefdirError(f"on must be 'pc1' or 'r', not {on!r}")
        return self.auc_pc1 if on == "pc1" else self.auc_r

    def separating_layers(self, threshold: float = 0.95, on: str = "pc1") -> list[int]:
        """Every layer where the AUC of PC1 (``on="pc1"``) or of the projection on r̂ (``"r"``) is ≥ ``threshold``."""
        return [int(i) for i in np.flatnonzero(self._auc(on) >= threshold)]

    def first_separating_layer(self, threshold: float = 0.95, on: str = "pc1") -> int | None:
        """The first layer from which the sets separate (AUC ≥ ``threshold``), whether or not later layers do."""
        layers = self.separating_layers(threshold, on)
        return layers[0] if layers else None

    def separating_layer(self, threshold: float = 0.95, on: str = "pc1") -> int | None:
        """The first layer from which the AUC stays ≥ ``threshold`` at every later layer (the strict reading)."""
        ok = self._auc(on) >= threshold
        for layer in range(len(ok)):
            if ok[layer:].all():
                return layer
        return None

    def summary(self, threshold: float = 0.95) -> dict:
        band = self.separating_layers(threshold)
        f = band[0] if band else None

        def at(a, layer):
            return None if layer is None else float(a[layer])

        return {"position": self.position, "threshold": threshold,
                "first_separating_layer": f, "separating_layers": band,
                "separating_layer": self.separating_layer(threshold),
                "cos_pc1_r_there": at(self.cos_pc1_r, f), "cos_pc1_diff_there": at(self.cos_pc1_diff, f),
                "pc1_var_there": at(self.pc1_var, f), "auc_pc1_there": at(self.auc_pc1, f),
                "max_auc_pc1": float(self.auc_pc1.max()), "max_auc_pc1_layer": int(self.auc_pc1.argmax()),
                "first_separating_layer_r": self.first_separating_layer(threshold, "r"),
                "separating_layers_r": self.separating_layers(threshold, "r"),
                "separating_layer_r": self.separating_layer(threshold, "r"),
                "per_layer": [{"layer": i, "pc1_var": float(self.pc1_var[i]), "pc2_var": float(self.pc2_var[i]),
                               "cos_pc1_diff": float(self.cos_pc1_diff[i]), "cos_pc1_r": float(self.cos_pc1_r[i]),
                               "auc_pc1": float(self.auc_pc1[i]), "auc_r": float(self.auc_r[i])}
                              for i in range(len(self.pc1_var))]}


def geometry_from_activations(harmful: torch.Tensor, harmless: torch.Tensor, r: torch.Tensor,
                              position: int = -1) -> Geometry:
    """:class:`Geometry` from residuals ``[N, L+1, d]`` of each set (one position)."""
    if harmful.ndim != 3 or harmless.ndim != 3 or harmful.shape[1:] != harmless.shape[1:]:
        raise RefdirError("harmful and harmless activations must both be [N, layers, d] with the same layers and d")
    if len(harmful) < 2 or len(harmless) < 2:
        raise RefdirError("geometry needs at least 2 harmful and 2 harmless prompts")
    r_hat = unit_vector(r).double()
    if r_hat.numel() != harmful.shape[-1]:
        raise RefdirError(f"direction has size {r_hat.numel()} but the activations have d = {harmful.shape[-1]}")
    x_all = torch.cat([harmful, harmless]).double()  # [N, L+1, d]
    labels = np.r_[np.ones(len(harmful)), np.zeros(len(harmless))]
    n_layers = x_all.shape[1]
    out = {k: np.zeros(n_layers) for k in ("pc1_var", "pc2_var", "cos_pc1_diff", "cos_pc1_r", "auc_pc1", "auc_r")}
    coords = np.zeros((n_layers, len(labels), 2))
    for layer in range(n_layers):
        x = x_all[:, layer]
        xc = x - x.mean(0)
        _, s, vt = torch.linalg.svd(xc, full_matrices=False)
        var = s**2
        tot = var.sum()
        diff = harmful[:, layer].double().mean(0) - harmless[:, layer].double().mean(0)
        pc1, pc2 = vt[0], vt[1] if len(vt) > 1 else torch.zeros_like(vt[0])
        if (pc1 @ diff) < 0:
            pc1 = -pc1
        c = xc @ torch.stack([pc1, pc2]).T
        coords[layer] = c.numpy()
        if tot <= 0:  # every prompt has the same residual here (e.g. a template token at layer 0)
            out["auc_pc1"][layer] = out["auc_r"][layer] = 0.5
            continue
        out["pc1_var"][layer] = float(var[0] / tot)
        out["pc2_var"][layer] = float(var[1] / tot) if len(var) > 1 else 0.0
        dn = diff.norm()
        out["cos_pc1_diff"][layer] = float(pc1 @ diff / dn) if dn > 0 else 0.0
        out["cos_pc1_r"][layer] = float(pc1 @ r_hat)
        out["auc_pc1"][layer] = auc(c[:, 0].numpy(), labels)
        out["auc_r"][layer] = auc((x @ r_hat).numpy(), labels)
    return Geometry(position, labels, coords=coords, **out)


def geometry(model: nn.Module, fmt: ChatFormat, harmful: list[str], harmless: list[str], r: torch.Tensor, *,
             position: int = -1, batch_size: int = 16, progress: bool = True) -> Geometry:
    """Cache residuals of both sets at ``position`` and compute :class:`Geometry`."""
    check_position(fmt, position)
    acts = []
    for name, prompts in (("harmful", harmful), ("harmless", harmless)):
        _, kept = residuals(model, fmt, prompts, n_pos=-position, batch_size=batch_size, keep=True,
                            desc=f"geometry: {name}", progress=progress)
        acts.append(kept[:, 0])  # the first kept position is `position`
    return geometry_from_activations(acts[0], acts[1], r, position)


# ------------------------------------------------------------------------------------------------ expression
@dataclass
class Expression:
    """cos(residual, r̂) per prompt and layer, for named groups of prompts."""

    position: int
    groups: dict[str, np.ndarray]  # name -> [N, L+1]

    def mean(self, name: str) -> np.ndarray:
        return self.groups[name].mean(0)

    def std(self, name: str) -> np.ndarray:
        return self.groups[name].std(0)

    def summary(self) -> dict:
        return {"position": self.position,
                "mean": {k: self.mean(k).tolist() for k in self.groups},
                "std": {k: self.std(k).tolist() for k in self.groups}}


def expression(model: nn.Module, fmt: ChatFormat, groups: dict[str, list[str]], r: torch.Tensor, *,
               position: int = -1, batch_size: int = 16, progress: bool = True) -> Expression:
    """The cosine between the residual at ``position`` and r̂, at every layer, for every prompt of every group."""
    check_position(fmt, position)
    if not groups:
        raise RefdirError("no prompt groups given")
    r_hat = unit_vector(r)
    out = {}
    for name, prompts in groups.items():
        _, kept = residuals(model, fmt, prompts, n_pos=-position, batch_size=batch_size, keep=True,
                            desc=f"expression: {name}", progress=progress)
        x = kept[:, 0]  # [N, L+1, d]
        if r_hat.numel() != x.shape[-1]:
            raise RefdirError(f"direction has size {r_hat.numel()} but the model has d = {x.shape[-1]}")
        out[name] = (torch.nn.functional.cosine_similarity(x, r_hat.expand_as(x), dim=-1)).numpy()
    return Expression(position, out)


def curve_distances(expr: Expression, from_layer: int, a: str, b: str) -> float:
    """Mean absolute gap between the mean curves of groups ``a`` and ``b`` over layers ``from_layer`` .. L."""
    return float(np.abs(expr.mean(a)[from_layer:] - expr.mean(b)[from_layer:]).mean())
