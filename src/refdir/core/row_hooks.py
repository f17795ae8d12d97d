"""Hooks that apply a different edit to each row of one batch (:func:`refdir.core.edits.hooked_rows`), so that many
edits are scored or generated in one forward pass: :class:`Rows` says which plan each row uses, and the two hook
makers below apply per-row directions and strengths to a module's output or scale a writer's input units.
"""

from __future__ import annotations

import torch

from refdir.core.hooks import PerDevice, map_output
from refdir.errors import RefdirError


class Rows:
    """Which plan each batch row uses, for hooks that apply several plans in one forward pass
    (:func:`hooked_rows`). With one plan every row uses it and nothing needs to be set; with several, the caller
    calls :meth:`use` before each forward with the plan index of every batch row (rows keep their order through
    ``generate``'s decoding steps, so one call per ``generate`` batch is enough)."""

    def __init__(self, n_plans: int):
        self.n = n_plans
        self._g: torch.Tensor | None = None

    def use(self, groups) -> None:
        g = torch.as_tensor(groups, dtype=torch.long).flatten()
        if g.numel() == 0 or int(g.min()) < 0 or int(g.max()) >= self.n:
            raise RefdirError(f"row plan indices must lie in 0..{self.n - 1}")
        self._g = g

    def gather(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``t [K, ...]`` that the batch rows of ``x`` use, shaped to broadcast against ``x``
        (``x [B, ..., n]``, or ``[B·T, n]`` / ``[B·T]`` for a block that flattens its tokens)."""
        g = self._g
        if g is None:
            raise RefdirError("several plans are hooked: call Rows.use(groups) before the forward pass")
        sel = t[g.to(t.device)]
        if x.shape[0] == g.numel():
            return sel.view(g.numel(), *([1] * (x.dim() - sel.dim())), *sel.shape[1:])
        if x.dim() <= 2 and x.shape[0] % g.numel() == 0:  # tokens flattened batch-major (Gemma 4's experts)
            return sel.repeat_interleave(x.shape[0] // g.numel(), dim=0)
        raise RefdirError(f"a hooked module saw {x.shape[0]} rows but {g.numel()} were assigned plans")


def out_hook(rows: Rows, r: torch.Tensor, s: torch.Tensor):
    """Each row's output loses ``s[k]`` of its part along ``r[k]`` (``k``: the row's plan); r [K, d], s [K]."""
    rr, ss = PerDevice(r.to(torch.float32)), PerDevice(s.to(torch.float32))

    def fn(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        rv, sv = rr.on(xf), ss.on(xf)
        if rows.n == 1:
            return (xf - sv[0] * (xf @ rv[0]).unsqueeze(-1) * rv[0]).to(x.dtype)
        g = rows._g
        if xf.dim() == 3 and xf.shape[0] == 1 and g is not None and g.numel() > 1:
            xf = xf.expand(g.numel(), *xf.shape[1:])  # one row shared by the batch (learned positions): one per row
        rb, sb = rows.gather(rv, xf), rows.gather(sv, xf[..., 0])
        return (xf - (sb * (xf * rb).sum(-1)).unsqueeze(-1) * rb).to(x.dtype)

    return map_output(fn)


def scale_pre_hook(rows: Rows, scale: torch.Tensor):
    """Each row's input to a writer is scaled per input unit by ``scale[k]`` [K, n]."""
    sc = PerDevice(scale)

    def hook(_m, args):
        x = args[0]
        s = sc.on(x)
        return (x * (s[0] if rows.n == 1 else rows.gather(s, x)),) + tuple(args[1:])

    return hook
