"""Caching the residual stream at the post-instruction positions.

For each prompt we read the input of every block plus the output of the last one (L+1 points)
at the last ``n_pos`` token positions (the post-instruction tokens; the batch is left-padded).
Means are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.core.architecture import Architecture, inspect_model, takes_position_ids
from refdir.core.chat import ChatFormat
from refdir.core.forward import left_pad, shared_prefix_batches
from refdir.core.hooks import block_input, output_hidden, registered
from refdir.errors import RefdirError


def decoder_body(model: nn.Module, arch: Architecture) -> nn.Module:
    """The module that owns the blocks (runs without the ``lm_head``)."""
    base = arch.blocks_path.rsplit(".", 1)[0] if "." in arch.blocks_path else ""
    return model.get_submodule(base) if base else model


@contextmanager
def capture_residuals(model: nn.Module, n_pos: int, arch: Architecture | None = None
                      ) -> Iterator[Callable[[], torch.Tensor]]:
    """Record the residual stream while the context is open: at every forward pass, the input of each block and
    the output of the last one (L+1 points) at the last ``n_pos`` positions, float32 on the CPU. Yields a function
    that returns the latest pass's residuals, [b, n_pos, L+1, d]."""
    arch = arch or inspect_model(model)
    L = arch.n_layers
    buf: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(_m, args, kwargs):
            buf[i] = block_input(args, kwargs)[:, -n_pos:, :].detach().to("cpu", torch.float32)

        return hook

    def post_last(_m, _a, out):
        buf[L] = output_hidden(out)[:, -n_pos:, :].detach().to("cpu", torch.float32)

    handles = [bp.block.register_forward_pre_hook(pre(bp.index), with_kwargs=True) for bp in arch.blocks]
    handles.append(arch.blocks[-1].block.register_forward_hook(post_last))
    with registered(handles):
        yield lambda: torch.stack([buf[i] for i in range(L + 1)], dim=2)


@torch.no_grad()
def last_token_residuals(model: nn.Module, rows: list[list[int]], pad: int, batch_size: int) -> torch.Tensor:
    """Residual stream at the last token of each token-id row, every layer (input of each block + final output):
    [N, L+1, d] float32. Rows are left-padded in batches of ``batch_size``."""
    arch = inspect_model(model)
    body = decoder_body(model, arch)
    dev = next(model.parameters()).device
    out = []
    with capture_residuals(model, 1, arch) as read:
        for s in range(0, len(rows), batch_size):
            body(**left_pad(rows[s : s + batch_size], pad, dev), use_cache=False)
            out.append(read()[:, 0])
    return torch.cat(out)


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


def check_finite(model: nn.Module, stack: torch.Tensor, logits: torch.Tensor | None = None) -> None:
    """Refuse residuals [B, P, L+1, d] (or logits) with NaN or inf values: one clear error naming the first such
    layer, never a silent NaN artifact. In fp16 the usual cause is an overflow past 65504."""
    bad = ~torch.isfinite(stack).flatten(3).all(-1).all(0).all(0)  # per layer
    if not bad.any() and (logits is None or torch.isfinite(logits).all()):
        return
    where = f"at layer {int(bad.nonzero()[0])}" if bad.any() else "in the logits"
    dtype = next(model.parameters()).dtype
    hint = (" (in fp16 the activations overflow past 65504: use --dtype bf16 or fp32)" if dtype == torch.float16
            else " (the model's weights may hold NaN or inf values)")
    raise RefdirError(f"the model's activations are not finite (NaN or inf) {where}{hint}")


@torch.no_grad()
def residual_batches(model: nn.Module, fmt: ChatFormat, instructions: list[str], *, n_pos: int, batch_size: int = 16,
                     desc: str = "activations", progress: bool = True, shared_prefix: bool = False,
                     logits: bool = False) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """Per batch: (prompt indices, residuals [b, n_pos, L+1, d] float32 at the last ``n_pos`` positions, and with
    ``logits`` the last-position logits [b, vocab] float32). With ``shared_prefix`` the prompts' common prefix is run
    once and batches are formed by length (:func:`refdir.core.forward.shared_prefix_batches`); the residuals are the
    same up to float rounding."""
    if not instructions:
        raise RefdirError("empty dataset: no instructions to cache activations for")
    arch = inspect_model(model)
    dev = next(model.parameters()).device

    def plain():
        body = model if logits else decoder_body(model, arch)
        for s in range(0, len(instructions), batch_size):
            enc = fmt.encode(instructions[s : s + batch_size], device=dev, positions=takes_position_ids(body))
            out = body(**enc, use_cache=False, **({"logits_to_keep": 1} if logits else {}))
            yield list(range(s, min(s + batch_size, len(instructions)))), out.logits[:, -1, :] if logits else None

    with capture_residuals(model, n_pos, arch) as read:
        batches = (shared_prefix_batches(model, fmt, instructions, batch_size, min_tail=n_pos)
                   if shared_prefix else None) or plain()
        bar = tqdm(total=len(instructions), desc=desc, disable=not progress, leave=False)
        for idx, lg in batches:
            stack = read()  # [B, P, L+1, d]
            check_finite(model, stack, lg)
            bar.update(len(idx))
            yield idx, stack, (lg.float().cpu() if lg is not None else None)
        bar.close()
