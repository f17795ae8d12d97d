"""Caching the residual stream at the post-instruction positions.

For each prompt we read the input of every block plus the output of the last one (L+1 points)
at the last ``n_pos`` token positions (the post-instruction tokens; the batch is left-padded).
Means are accumulated in float64.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import Architecture, inspect_model
from .chat import ChatFormat
from .errors import RefdirError


def decoder_body(model: nn.Module, arch: Architecture) -> nn.Module:
    """The module that owns the blocks (runs without the ``lm_head``)."""
    base = arch.blocks_path.rsplit(".", 1)[0] if "." in arch.blocks_path else ""
    return model.get_submodule(base) if base else model


@torch.no_grad()
def residuals(
    model: nn.Module,
    fmt: ChatFormat,
    instructions: list[str],
    *,
    n_pos: int | None = None,
    batch_size: int = 16,
    keep: bool = False,
    desc: str = "activations",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (mean [n_pos, L+1, d] float64, per-prompt [N, n_pos, L+1, d] float32 or None)."""
    if not instructions:
        raise RefdirError("empty dataset: no instructions to cache activations for")
    arch = inspect_model(model)
    n_pos = n_pos or fmt.n_post
    L, d = arch.n_layers, arch.d_model
    body = decoder_body(model, arch)
    dev = next(model.parameters()).device
    total = torch.zeros(n_pos, L + 1, d, dtype=torch.float64)
    kept = [] if keep else None
    buf: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            buf[i] = x[:, -n_pos:, :].detach().to("cpu", torch.float32)

        return hook

    def post_last(_m, _a, out):
        x = out[0] if isinstance(out, tuple) else out
        buf[L] = x[:, -n_pos:, :].detach().to("cpu", torch.float32)

    handles = [bp.block.register_forward_pre_hook(pre(bp.index), with_kwargs=True) for bp in arch.blocks]
    handles.append(arch.blocks[-1].block.register_forward_hook(post_last))
    try:
        batches = range(0, len(instructions), batch_size)
        for s in tqdm(batches, desc=desc, disable=not progress, leave=False):
            enc = fmt.encode(instructions[s : s + batch_size], device=dev)
            buf.clear()
            body(**enc, use_cache=False)
            stack = torch.stack([buf[i] for i in range(L + 1)], dim=2)  # [B, P, L+1, d]
            total += stack.to(torch.float64).sum(0)
            if kept is not None:
                kept.append(stack)
    finally:
        for h in handles:
            h.remove()
    mean = total / len(instructions)
    return mean, (torch.cat(kept) if kept is not None else None)
