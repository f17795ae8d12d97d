"""Figures of the mechanistic analysis: geometry per layer, PCA scatters, direction expression (Figure 5) and
head contributions with attention shares (Figure 6). Each returns a matplotlib figure."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from refdir.analysis.geometry import Expression, Geometry
from refdir.analysis.heads import AttentionShares
from refdir.core.html import plt


# ------------------------------------------------------------------------------------------------ plots
@dataclass
class _Palette:
    colors: dict = field(default_factory=lambda: {"harmful": "#c0392b", "harmless": "#2874a6",
                                                  "harmful + adversarial suffix": "#7d3c98",
                                                  "harmful + random suffix": "#d68910"})

    def __call__(self, name: str, i: int) -> str:
            return self.colors.get(name, plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10])


PALETTE = _Palette()


def plot_geometry_lines(g: Geometry, direction_layer: int | None = None, threshold: float = 0.95):
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    xs = np.arange(len(g.pc1_var))
    axes[0].plot(xs, g.pc1_var, marker=".", label="PC1")
    axes[0].plot(xs, g.pc2_var, marker=".", label="PC2")
    axes[0].set_title("explained variance ratio", fontsize=9)
    axes[1].plot(xs, g.cos_pc1_diff, marker=".", label="cos(PC1, diff-in-means at layer)")
    axes[1].plot(xs, g.cos_pc1_r, marker=".", label="cos(PC1, r̂)")
    axes[1].set_title("cosine of PC1", fontsize=9)
    axes[2].plot(xs, g.auc_pc1, marker=".", label="PC1 coordinate")
    axes[2].plot(xs, g.auc_r, marker=".", label="projection on r̂")
    axes[2].axhline(threshold, color="gray", ls="--", lw=1)
    axes[2].set_title("harmful vs harmless separability (ROC AUC)", fontsize=9)
    s = g.first_separating_layer(threshold)
    for layer in g.separating_layers(threshold):  # shade every layer where PC1 separates
        axes[2].axvspan(layer - 0.5, layer + 0.5, color="green", alpha=0.08, lw=0)
    for ax in axes:
        if direction_layer is not None:
            ax.axvline(direction_layer, color="red", lw=1, alpha=0.6)
        if s is not None:
            ax.axvline(s, color="green", lw=1, ls=":")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    return fig


def plot_geometry_scatter(g: Geometry, layers: list[int]):
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        c = g.coords[layer]
        for lab, name in ((1, "harmful"), (0, "harmless")):
            m = g.labels == lab
            ax.scatter(c[m, 0], c[m, 1], s=8, alpha=0.7, color=PALETTE(name, lab), label=name)
        ax.set_title(f"layer {layer}: AUC(PC1) {g.auc_pc1[layer]:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return fig


def plot_expression(expr: Expression, direction_layer: int | None = None, title: str | None = None):
    """Mean cos(residual, r̂) per layer and a ±1 std band, one line per group (the paper's Figure 5 layout)."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, (name, arr) in enumerate(expr.groups.items()):
        xs = np.arange(arr.shape[1])
        m, s = arr.mean(0), arr.std(0)
        col = PALETTE(name, i)
        ax.plot(xs, m, color=col, label=f"{name} (n={len(arr)})")
        ax.fill_between(xs, m - s, m + s, color=col, alpha=0.15)
    if direction_layer is not None:
        ax.axvline(direction_layer, color="gray", ls="--", lw=1, label=f"direction layer {direction_layer}")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"cos(residual at position {expr.position}, r̂)")
    ax.set_title(title or "refusal direction expression", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def plot_heads(heads: list[tuple[int, int]], contrib: dict[str, np.ndarray], shares: dict[str, AttentionShares]):
    """The paper's Figure 6 layout: each top head's direct contribution to r̂ per group (left), and the
    last token's attention share on the instruction vs the suffix for suffixed groups (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.8))
    labels = [f"L{la}H{h}" for la, h in heads]
    xs = np.arange(len(heads))
    w = 0.8 / max(1, len(contrib))
    for i, (name, vals) in enumerate(contrib.items()):
        axes[0].bar(xs + i * w, vals, w, color=PALETTE(name, i), label=name)
    axes[0].set_xticks(xs + w * (len(contrib) - 1) / 2, labels, fontsize=7)
    axes[0].axhline(0, color="black", lw=0.5)
    axes[0].set_ylabel("direct contribution to r̂ (last token)")
    axes[0].legend(fontsize=7)
    w = 0.8 / max(1, 2 * len(shares))
    k = 0
    for i, (name, sh) in enumerate(shares.items()):
        col = PALETTE(name, i)
        axes[1].bar(xs + k * w, sh.instruction.mean(0), w, color=col, alpha=0.9, label=f"{name}: instruction")
        k += 1
        axes[1].bar(xs + k * w, sh.suffix.mean(0), w, color=col, alpha=0.45, hatch="//", label=f"{name}: suffix")
        k += 1
    axes[1].set_xticks(xs + w * (k - 1) / 2, labels, fontsize=7)
    axes[1].set_ylabel("share of last-token attention")
    axes[1].legend(fontsize=6)
    return fig
