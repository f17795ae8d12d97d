"""A refusal direction kept off the directions along which harmless prompts vary.

The difference in means r also points partly along the principal components of harmless prompts' activations at
its layer and position (what the prompts are about: on the default model |cos| up to 0.46 with one of the top
five). Ablating r removes those components from every prompt, which is most of the KL on harmless prompts. This
source removes from r its projection on the top ``k`` principal components of harmless activations (the mean
removed, as in PCA) and keeps r's norm: the ``projected`` edit variant does the same with the harmless mean alone.

Measured on the default model (NOTES.md, development split): with k = 4 the full ablation refuses 4–5 of 60
harmful prompts at first-token KL 0.032–0.036, against 9 of 60 at 0.047 for r itself.
"""

from __future__ import annotations

import torch

from refdir.core.activations import residuals
from refdir.core.chat import ChatFormat
from refdir.errors import RefdirError

COMPONENTS = 4  # principal components removed (development split, NOTES.md: 2, 4 and 8 all helped; 16 did not)


def off_principal_components(r: torch.Tensor, x: torch.Tensor, k: int = COMPONENTS) -> torch.Tensor:
    """``r`` [d] minus its projection on the top ``k`` principal components of the rows of ``x`` [n, d], rescaled
    to ``r``'s norm (float64 inside; ``r``'s dtype out). ``k`` is capped at n − 1 (the centred rows span at most
    that many); k = 0 returns ``r``."""
    if x.ndim != 2 or x.shape[1] != r.shape[-1]:
        raise RefdirError(f"activations {tuple(x.shape)} do not match a direction of size {r.shape[-1]}")
    k = min(k, x.shape[0] - 1)
    if k <= 0:
        return r.clone()
    xc = x.double() - x.double().mean(0)
    v = torch.linalg.svd(xc, full_matrices=False).Vh[:k]  # [k, d], orthonormal rows
    r64 = r.double()
    out = r64 - v.T @ (v @ r64)
    if float(out.norm()) <= 1e-6 * float(r64.norm()):
        raise RefdirError("the direction lies in the span of the harmless principal components: nothing is left")
    return (out * (r64.norm() / out.norm())).to(r.dtype)


def prompt_residuals(model, fmt: ChatFormat, prompts: list[str], batch_size: int = 16,
                     progress: bool = True) -> torch.Tensor:
    """Each prompt's residual stream at every post-instruction position and block input, [n, n_post, L+1, d]
    (float32): what :func:`harmless_activations` selects from, computable once for several sources."""
    _, per_prompt = residuals(model, fmt, prompts, batch_size=batch_size, keep=True, desc="harmless activations",
                              progress=progress, shared_prefix=True)
    return per_prompt


def harmless_activations(model, fmt: ChatFormat, prompts: list[str], position: int, layer: int,
                         batch_size: int = 16, progress: bool = True, acts: torch.Tensor | None = None) -> torch.Tensor:
    """The residual stream [n, d] (float32) of each prompt at block ``layer``'s input and post-instruction
    ``position`` (negative, as the candidates count it). ``acts``: the prompts' :func:`prompt_residuals`, if the
    caller has them (the same numbers: the same prompts in the same batches)."""
    if not -fmt.n_post <= position < 0:
        raise RefdirError(f"position {position} is not a post-instruction position (-{fmt.n_post}..-1)")
    if acts is None:
        acts = prompt_residuals(model, fmt, prompts, batch_size, progress)
    return acts[:, fmt.n_post + position, layer]


def pca_direction(model, fmt: ChatFormat, r: torch.Tensor, prompts: list[str], position: int, layer: int,
                  k: int = COMPONENTS, batch_size: int = 16, progress: bool = True,
                  acts: torch.Tensor | None = None) -> torch.Tensor:
    """r off the top ``k`` principal components of ``prompts``' (harmless) activations at its position and layer
    (``acts``: their :func:`prompt_residuals`, if already computed)."""
    with torch.no_grad():
        x = harmless_activations(model, fmt, prompts, position, layer, batch_size, progress, acts)
    return off_principal_components(r, x, k)
