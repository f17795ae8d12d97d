"""Mechanistic analysis of the refusal direction (paper §5).

- :func:`geometry`: per layer, PCA of harmful and harmless residuals at one post-instruction position;
  PC1's explained variance, its cosine with that layer's difference in means and with r̂, and how well
  PC1 (and the projection on r̂) separates the two sets (ROC AUC).
- :func:`expression`: the cosine between the residual and r̂ at every layer, per prompt, for any
  groups of prompts (the paper's Figure 5).
- :func:`head_attribution`: each attention head's direct contribution to r̂ at one position: the head's
  slice of the attention output projection's input, times that slice of the projection's weight,
  dotted with r̂ (the paper's Figure 6, top).
- :func:`attention_shares`: for chosen heads, the share of the last token's attention on the
  instruction tokens and on the suffix tokens (Figure 6, bottom).

Residual points follow :mod:`refdir.activations`: layer ``l`` is the input of block ``l``; layer L is
the output of the last block. A direction found at layer ``l`` is therefore written by blocks
``0 .. l-1``. Everything returns numpy arrays in dataclasses; ``plot_*`` build figures on top.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.core.activations import residuals
from refdir.core.architecture import Architecture, inspect_model
from refdir.core.chat import ChatFormat
from refdir.core.directions import unit_vector
from refdir.errors import RefdirError


def _check_position(fmt: ChatFormat, position: int) -> int:
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
    _check_position(fmt, position)
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
    _check_position(fmt, position)
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


# ------------------------------------------------------------------------------------------------ heads
def attention_output_projection(bp) -> nn.Linear:
    """The linear layer that writes a block's attention output (its last d_model-wide linear)."""
    for w in bp.writers:
        if w.param == "weight" and isinstance(w.module, nn.Linear) and any(w.module is m for m in bp.attn.modules()):
            return w.module
    raise RefdirError(f"block {bp.index}: no attention output projection found")


def head_layout(model: nn.Module, proj: nn.Linear) -> tuple[int, int]:
    """(number of heads, head dim) of the attention output projection's input, from the config."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not n_heads or proj.in_features % n_heads:
        raise RefdirError(f"cannot split the attention output projection ({proj.in_features} inputs) into "
                          f"{n_heads} heads")
    head_dim = proj.in_features // n_heads
    declared = getattr(cfg, "head_dim", None)
    if declared and declared != head_dim:
        raise RefdirError(f"config head_dim {declared} does not match {proj.in_features} / {n_heads} heads")
    return n_heads, head_dim


@dataclass
class HeadAttribution:
    """Direct contribution of every head to r̂ at one position: contrib[n, layer, head]."""

    position: int
    contrib: np.ndarray  # [N, L, H]
    bias: np.ndarray  # [L] the projection's bias on r̂ (no head owns it)
    through_post_norm: bool = False  # a post-norm sits between the projection and the stream: not exact

    def mean(self) -> np.ndarray:
        return self.contrib.mean(0)

    def top(self, k: int, up_to_layer: int | None = None) -> list[tuple[int, int]]:
        """The ``k`` (layer, head) pairs with the largest mean contribution among layers < ``up_to_layer``."""
        m = self.mean().copy()
        if up_to_layer is not None:
            m[up_to_layer:] = -np.inf
        order = np.argsort(-m, axis=None)[:k]
        return [tuple(int(i) for i in np.unravel_index(o, m.shape)) for o in order if np.isfinite(m.flat[o])]

    def total(self, up_to_layer: int) -> np.ndarray:
        """Per prompt: every head's contribution summed over the layers before ``up_to_layer``."""
        return self.contrib[:, :up_to_layer].sum((1, 2))


@torch.no_grad()
def head_attribution(model: nn.Module, fmt: ChatFormat, instructions: list[str], r: torch.Tensor, *,
                     position: int = -1, batch_size: int = 16, arch: Architecture | None = None,
                     progress: bool = True) -> HeadAttribution:
    """Each head's direct write onto r̂ at ``position``: ``z_h · (W_O[:, h] ᵀ r̂)`` where ``z_h`` is head
    h's slice of the output projection's input (captured by a forward pre-hook)."""
    _check_position(fmt, position)
    if not instructions:
        raise RefdirError("no prompts for head attribution")
    arch = arch or inspect_model(model)
    r_hat = unit_vector(r)
    if r_hat.numel() != arch.d_model:
        raise RefdirError(f"direction has size {r_hat.numel()} but the model has d = {arch.d_model}")
    projs = [attention_output_projection(bp) for bp in arch.blocks]
    n_heads, head_dim = head_layout(model, projs[0])
    # u_l = W_O,lᵀ r̂, split into heads: [L, H, hd]
    u = torch.stack([(p.weight.float().T.cpu() @ r_hat).view(n_heads, head_dim) for p in projs])
    bias = np.array([float(p.bias.float().cpu() @ r_hat) if p.bias is not None else 0.0 for p in projs])
    buf: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args):
            buf[i] = args[0][:, position].detach().float().cpu()

        return hook

    dev = next(model.parameters()).device
    rows = []
    handles = [p.register_forward_pre_hook(pre(i)) for i, p in enumerate(projs)]
    try:
        for s in tqdm(range(0, len(instructions), batch_size), desc="head attribution", disable=not progress,
                      leave=False):
            enc = fmt.encode(instructions[s : s + batch_size], device=dev)
            buf.clear()
            model(**enc, use_cache=False, logits_to_keep=1)
            z = torch.stack([buf[i] for i in range(len(projs))], 1).view(-1, len(projs), n_heads, head_dim)
            rows.append((z * u).sum(-1))  # [B, L, H]
    finally:
        for h in handles:
            h.remove()
    return HeadAttribution(position, torch.cat(rows).numpy(), bias, arch.has_post_norms)


# ------------------------------------------------------------------------------------------------ attention
def regions(fmt: ChatFormat, instruction: str, suffix_text: str = "", joined: str | None = None
            ) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the rendered prompt, and the token indices of the instruction and of the suffix.

    ``joined`` is the user text (instruction followed by suffix; default their plain concatenation). A token is
    assigned to the region its characters overlap most."""
    joined = joined if joined is not None else instruction + suffix_text
    if not joined.startswith(instruction):
        raise RefdirError("the user text must start with the instruction")
    text = fmt.render(joined)
    start = text.find(joined)
    if start < 0:
        raise RefdirError("the rendered prompt does not contain the user text verbatim")
    spans = {"instruction": (start, start + len(instruction)), "suffix": (start + len(instruction), start + len(joined))}
    try:
        enc = fmt.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError) as e:
        raise RefdirError("attention shares need a fast tokenizer (offset mappings)") from e
    idx: dict[str, list[int]] = {"instruction": [], "suffix": []}
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        best, best_overlap = None, 0
        for name, (s, e) in spans.items():
            ov = min(b, e) - max(a, s)
            if ov > best_overlap:
                best, best_overlap = name, ov
        if best is not None:
            idx[best].append(t)
    return list(enc["input_ids"]), idx["instruction"], idx["suffix"]


@dataclass
class AttentionShares:
    """Share of the last token's attention on the instruction and on the suffix, per prompt and head."""

    heads: list[tuple[int, int]]
    instruction: np.ndarray  # [N, k]
    suffix: np.ndarray  # [N, k]


def _attn_impl(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


@torch.no_grad()
def attention_shares(model: nn.Module, fmt: ChatFormat, items: list[tuple[str, str]],
                     heads: list[tuple[int, int]], *, progress: bool = True) -> AttentionShares:
    """For each (instruction, user text) pair, the last token's attention weights of each chosen head summed
    over the instruction tokens and over the suffix tokens. Runs with eager attention (to get the weights)
    and restores the model's attention implementation afterwards."""
    if not heads:
        raise RefdirError("no heads given for attention shares")
    if not items:
        raise RefdirError("no prompts for attention shares")
    dev = next(model.parameters()).device
    before = _attn_impl(model)
    ins = np.zeros((len(items), len(heads)))
    suf = np.zeros((len(items), len(heads)))
    try:
        model.set_attn_implementation("eager")
        for n, (instr, joined) in enumerate(tqdm(items, desc="attention", disable=not progress, leave=False)):
            ids, ii, si = regions(fmt, instr, joined=joined)
            out = model(input_ids=torch.tensor([ids], device=dev), use_cache=False, output_attentions=True,
                        logits_to_keep=1)
            if not out.attentions or out.attentions[0] is None:
                raise RefdirError("this model returns no attention weights")
            for k, (layer, head) in enumerate(heads):
                w = out.attentions[layer][0, head, -1].float().cpu()
                ins[n, k] = float(w[ii].sum()) if ii else 0.0
                suf[n, k] = float(w[si].sum()) if si else 0.0
    finally:
        if before is not None:
            model.set_attn_implementation(before)
    return AttentionShares(list(heads), ins, suf)


# ------------------------------------------------------------------------------------------------ plots
@dataclass
class _Palette:
    colors: dict = field(default_factory=lambda: {"harmful": "#c0392b", "harmless": "#2874a6",
                                                  "harmful + adversarial suffix": "#7d3c98",
                                                  "harmful + random suffix": "#d68910"})

    def __call__(self, name: str, i: int) -> str:
        import matplotlib.pyplot as plt

        return self.colors.get(name, plt.rcParams["axes.prop_cycle"].by_key()["color"][i % 10])


PALETTE = _Palette()


def plot_geometry_lines(g: Geometry, direction_layer: int | None = None, threshold: float = 0.95):
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
