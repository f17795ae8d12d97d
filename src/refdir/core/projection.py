"""The one formula for removing a direction from weights: each vector a parameter writes to the residual stream
loses (a share of) its part along r̂, or along the span of an orthonormal basis.

Edits as weights (``core.edits``), orthogonalization in memory, streamed and in GGUF files, the norm-preserving
variant and the stream checks all use it, so a change to how a write vector is projected is made once. It computes in float64 (a bf16 weight projected in bf16
keeps a visible remainder of r̂). Hooks apply the same projection to activations in their own, dtype-aware code
(:mod:`refdir.core.interventions`, :mod:`refdir.core.row_hooks`).
"""

from __future__ import annotations

import torch


def project_rows(x: torch.Tensor, r: torch.Tensor, s: float = 1.0, keep_norm: bool = False) -> torch.Tensor:
    """Rows of ``x [..., d]`` (float64) lose ``s`` of their part along the unit ``r [d]`` (or, at ``s = 1``, along
    the span of an orthonormal basis ``r [k, d]``). With ``keep_norm`` each row is rescaled to its old norm (the
    norm-preserving variant; a row that becomes zero stays zero)."""
    if r.dim() == 2:
        if s != 1.0:
            raise ValueError("a basis is only removed whole (s = 1)")
        y = x - (x @ r.T) @ r
    else:
        y = x - s * (x @ r).unsqueeze(-1) * r
    if keep_norm:
        n0 = x.norm(dim=-1, keepdim=True)
        n1 = y.norm(dim=-1, keepdim=True)
        y = torch.where(n1 > 0, y * (n0 / n1.clamp_min(1e-300)), y)
    return y


def project_along(t: torch.Tensor, r: torch.Tensor, axis: int, s: float = 1.0, keep_norm: bool = False) -> torch.Tensor:
    """:func:`project_rows` applied to the vectors ``t`` holds along ``axis`` (its output axis: 0 for an
    ``nn.Linear`` weight or a bias, 1 for GPT-2's ``Conv1D`` or an embedding's rows); returned in ``t``'s dtype."""
    x = t.detach().to(torch.float64).movedim(axis, -1)
    return project_rows(x, r.to(x.device, torch.float64), s, keep_norm).movedim(-1, axis).to(t.dtype)


BLOCK_ELEMS = 1 << 22  # elements projected at a time in place (32 MiB of float64)


def project_along_(t: torch.Tensor, axis: int, *steps: tuple[torch.Tensor, float, bool]) -> None:
    """In place: the vectors ``t`` holds along ``axis`` pass through :func:`project_rows` once per ``(r, s,
    keep_norm)`` of ``steps``, in float64, and are cast back to ``t``'s dtype once. A block of vectors at a time,
    so that no float64 copy of a large weight is made (the default model's embedding, 151,936 × 896, would take
    1.1 GB of it)."""
    steps = tuple((r.to(t.device, torch.float64), s, k) for r, s, k in steps)

    def projected(x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float64)
        for r, s, k in steps:
            y = project_rows(y, r, s, k)
        return y.to(t.dtype)

    v = t.detach().movedim(axis, -1)  # a view: writing into it writes into t
    if v.dim() == 1 or not v.numel():
        v.copy_(projected(v))
        return
    n = max(1, BLOCK_ELEMS // v[0].numel())
    for i in range(0, v.shape[0], n):
        v[i:i + n].copy_(projected(v[i:i + n]))


def input_scale(weight: torch.Tensor, r: torch.Tensor, s: float) -> torch.Tensor:
    """The norm-preserving variant as an input rescale: per input unit ``j`` of a linear weight laid out
    ``[d_model, n]``, ``‖w_j‖ / ‖w_j − s(w_j·r̂)r̂‖`` (float64), so that scaling the inputs and then projecting the
    output equals the projected-and-rescaled weight."""
    w = weight.detach().to(torch.float64)
    a = r.to(w.device, torch.float64) @ w  # [n]
    n0sq = (w * w).sum(0)
    n1sq = (n0sq - (2 * s - s * s) * a * a).clamp_min(0)
    return torch.where(n1sq > 0, (n0sq / n1sq.clamp_min(1e-300)).sqrt(), torch.ones_like(n0sq))
