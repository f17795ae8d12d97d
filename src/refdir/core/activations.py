"""Caching the residual stream at the post-instruction positions.

For each prompt we read the input of every block plus the output of the last one (L+1 points)
at the last ``n_pos`` token positions (the post-instruction tokens; the batch is left-padded).
Means are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.core.architecture import Architecture, inspect_model
from refdir.core.chat import ChatFormat
from refdir.errors import RefdirError


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
    shared_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return (mean [n_pos, L+1, d] float64, per-prompt [N, n_pos, L+1, d] float32 or None).
    ``shared_prefix``: run the prompts' common prefix once (see :func:`residual_batches`)."""
    n_pos = n_pos or fmt.n_post
    total = None
    kept: dict[int, torch.Tensor] = {}
    for idx, stack, _ in residual_batches(model, fmt, instructions, n_pos=n_pos, batch_size=batch_size, desc=desc,
                                          progress=progress, shared_prefix=shared_prefix):
        part = stack.to(torch.float64).sum(0)
        total = part if total is None else total + part
        if keep:
            kept.update({i: stack[j] for j, i in enumerate(idx)})
    mean = total / len(instructions)
    return mean, (torch.stack([kept[i] for i in range(len(instructions))]) if keep else None)


@torch.no_grad()
def residual_batches(model: nn.Module, fmt: ChatFormat, instructions: list[str], *, n_pos: int, batch_size: int = 16,
                     desc: str = "activations", progress: bool = True, shared_prefix: bool = False,
                     logits: bool = False) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Per batch: (prompt indices, residuals [b, n_pos, L+1, d] float32 at the last ``n_pos`` positions, and with
    ``logits`` the last-position logits [b, vocab] float32). With ``shared_prefix`` the prompts' common prefix is run
    once and batches are formed by length (:func:`refdir.method.scoring.shared_prefix_batches`); the residuals are the
    same up to float rounding."""
    from refdir.method.scoring import shared_prefix_batches

    if not instructions:
        raise RefdirError("empty dataset: no instructions to cache activations for")
    arch = inspect_model(model)
    L = arch.n_layers
    dev = next(model.parameters()).device
    buf: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]
            buf[i] = x[:, -n_pos:, :].detach().to("cpu", torch.float32)

        return hook

    def post_last(_m, _a, out):
        x = out[0] if isinstance(out, tuple) else out
        buf[L] = x[:, -n_pos:, :].detach().to("cpu", torch.float32)

    def plain():
        body = model if logits else decoder_body(model, arch)
        for s in range(0, len(instructions), batch_size):
            enc = fmt.encode(instructions[s : s + batch_size], device=dev)
            out = body(**enc, use_cache=False, **({"logits_to_keep": 1} if logits else {}))
            yield list(range(s, min(s + batch_size, len(instructions)))), out.logits[:, -1, :] if logits else None

    handles = [bp.block.register_forward_pre_hook(pre(bp.index), with_kwargs=True) for bp in arch.blocks]
    handles.append(arch.blocks[-1].block.register_forward_hook(post_last))
    try:
        batches = (shared_prefix_batches(model, fmt, instructions, batch_size, min_tail=n_pos)
                   if shared_prefix else None) or plain()
        bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
        for idx, lg in batches:
            stack = torch.stack([buf[i] for i in range(L + 1)], dim=2)  # [B, P, L+1, d]
            bar.update(len(idx))
            yield idx, stack, (lg.float().cpu() if lg is not None else None)
        bar.close()
    finally:
        for h in handles:
            h.remove()
