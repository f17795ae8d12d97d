"""Checks that the residual stream is what :mod:`refdir.core.architecture` found, on the same tiny traced forward.

A weight edit removes a direction from every parameter that writes to the residual stream. That removes it from the
stream only when the stream is the sum of what those parameters write. Models where it is not: a third branch beside
attention and MLP (a state-space mixer in a hybrid block), a scaled residual, an attention module that adds the
residual itself, a fixed sinusoidal position signal or a norm between the embedding and the first block, or a writer
that is not a linear layer (attention experts held as bare tensors). For those refdir would write a checkpoint that
does not compute the edit it measured, so they are refused with an ``error:`` line instead. Measured on the three
real models the tests use, the margins are wide: relative differences ~1e-3 in bf16 and ~3e-8 in fp32 against the
tolerances 0.05 and 1e-3 (NOTES.md).

``block`` is a :class:`refdir.core.architecture.BlockParts` (not imported: the architecture module imports this one).
"""

from __future__ import annotations

import torch
from torch import nn

from refdir.core.hooks import output_hidden, registered
from refdir.errors import RefdirError

STREAM_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # relative; half precision: 0.05 (its rounding ~0.004)


def check_stream(block, seen: dict, written: dict, embs: list) -> None:
    """Refuse a model whose residual stream is not the sum of what the writers found here write: block 0's
    output must be its input plus its attention's and MLP's contributions, and its input a multiple of the sum of
    the embeddings' outputs (Gemma scales it by √d). Relative error against the norms involved, in float64."""
    x, y = seen.get("in"), seen.get("out")
    parts = [written[k] for k in ("attn", "mlp")]
    if x is None or y is None or any(p is None or p.shape[-1] != x.shape[-1] for p in parts):
        return  # nothing to compare (an unusual call signature): the checkpoint's verification still runs
    tol = STREAM_TOL.get(x.dtype, 0.05)
    x, y, a, m = (t.detach().double().cpu() for t in (x, y, *parts))
    err = float((y - x - a - m).norm() / (x.norm() + a.norm() + m.norm()).clamp_min(1e-30))
    name = type(block.block).__name__
    if err > tol:
        raise RefdirError(
            f"refdir cannot edit this architecture: block 0 ({name}) adds more to the residual stream than its "
            f"attention and MLP outputs (relative difference {err:.2g}): another branch writes to the stream, or "
            "the residual is scaled, so a direction removed from their writers would stay in the stream")
    if embs:
        e = sum(t.detach().double().cpu() for t in embs)
        if e.shape == x.shape:
            c = float((e * x).sum() / (e * e).sum().clamp_min(1e-30))
            err = float((x - c * e).norm() / x.norm().clamp_min(1e-30))
            if err > tol:
                raise RefdirError(
                    f"refdir cannot edit this architecture: the input of block 0 ({name}) is not a multiple of "
                    f"what its embeddings write (relative difference {err:.2g}; a fixed position signal or a norm "
                    "in between), so a direction removed from the embeddings would stay in the stream")


@torch.no_grad()
def check_writers(model: nn.Module, block, seen: dict) -> None:
    """Refuse a model whose attention or MLP writes through a parameter not found here: remove from block 0's
    writers, in place, the direction each component wrote most in the trace (its output's mean), trace again, and
    require that component's output to have lost it; the weights are put back, also on error."""
    params = [getattr(w.module, w.param) for w in block.writers]
    if any(p.is_meta for p in params) or seen.get("attn") is None or seen.get("mlp") is None:
        return
    d = seen["attn"].shape[-1]
    dirs = {c: seen[c].detach().double().cpu().reshape(-1, d).mean(0) for c in ("attn", "mlp")}
    dirs = {c: v / v.norm() for c, v in dirs.items() if v.norm() > 0}
    saved = [p.detach().clone() for p in params]
    after: dict[str, torch.Tensor] = {}
    try:
        for c, r in dirs.items():
            for w in block.component_writers(c):
                p = getattr(w.module, w.param)
                y = p.data.double().movedim(0 if p.dim() == 1 else w.out_axis, -1)
                y = y - (y @ r.to(y.device)).unsqueeze(-1) * r.to(y.device)
                p.data.copy_(y.movedim(-1, 0 if p.dim() == 1 else w.out_axis).to(p.dtype))
        hooks = [getattr(block, c).register_forward_hook(
            lambda _m, _a, out, c=c: after.__setitem__(c, output_hidden(out))) for c in dirs]
        with registered(hooks):
            model(input_ids=torch.tensor([[1, 2, 3]], device=params[0].device), use_cache=False)
    finally:
        for p, v in zip(params, saved, strict=True):
            p.data.copy_(v)
    tol = 0.05 if seen["attn"].dtype in (torch.bfloat16, torch.float16) else 1e-3
    for c, r in dirs.items():
        before = (seen[c].detach().double().cpu().reshape(-1, d) @ r).abs().sum()
        left = float((after[c].detach().double().cpu().reshape(-1, d) @ r).abs().sum() / before.clamp_min(1e-30))
        if left > tol:
            raise RefdirError(
                f"refdir cannot edit this architecture: the {c} module of block 0 ({type(block.block).__name__}) "
                f"still writes {left:.0%} of a direction removed from every writer found in it "
                f"({', '.join(w.name for w in block.component_writers(c)) or 'none'}): it writes through a "
                "parameter refdir does not know")

