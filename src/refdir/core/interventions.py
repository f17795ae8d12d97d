"""Interventions on the residual stream, as context managers that always remove their hooks.

- :func:`ablate` projects r̂ out of every block input and every attention / MLP write (and the embeddings' output
  where a norm rescales it per token before block 0), at every position, including each decoding step of
  ``generate`` with a KV cache (the hooks run on the new token's activations; cached keys/values were computed
  under the same hooks). Given a basis B [k, d]
  instead of a vector, it projects out the whole span: ``x ← x − Bᵀ(B x)``.
- :func:`add` adds ``coeff · v`` to one block's input at every position.
- :func:`intervene` combines any number of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from refdir.core.architecture import Architecture, inspect_model
from refdir.core.directions import ablation_operand, check_direction
from refdir.core.hooks import PerDevice, map_input, map_output, registered


def project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """x − (x·r̂) r̂ for a unit vector r̂ [d], or x − Bᵀ(B x) for an orthonormal basis B [k, d]; computed in
    float32."""
    r = r_hat.float().to(x.device)
    if r.dim() == 2:
        return (x.float() - (x.float() @ r.T) @ r).to(x.dtype)
    coef = (x.float() @ r).unsqueeze(-1)
    return (x.float() - coef * r).to(x.dtype)


def ablation_hooks(model: nn.Module, direction: torch.Tensor, arch: Architecture | None = None,
                   layers: list[int] | None = None) -> list:
    """The hooks of :func:`ablate` (handles; the caller removes them)."""
    arch = arch or inspect_model(model)
    r = PerDevice(ablation_operand(direction))

    def fn(x):
        return project_out(x, r.on(x))

    handles = []
    if arch.embedding_rescaled and (layers is None or 0 in layers):  # before the norm, as an edited embedding
        handles += [emb.register_forward_hook(map_output(fn)) for _n, emb in arch.embeddings]
    for bp in arch.blocks:
        if layers is not None and bp.index not in layers:
            continue
        handles.append(bp.block.register_forward_pre_hook(map_input(fn), with_kwargs=True))
        for m in (*bp.outs("attn"), *bp.outs("mlp")):
            if m is not None:
                handles.append(m.register_forward_hook(map_output(fn)))
    return handles


def addition_hooks(model: nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0,
                   arch: Architecture | None = None) -> list:
    """The hook of :func:`add` (handles; the caller removes them)."""
    arch = arch or inspect_model(model)
    if not 0 <= layer < arch.n_layers:
        raise ValueError(f"layer {layer} outside 0..{arch.n_layers - 1}")
    v = PerDevice(check_direction(vector.detach().to(torch.float32).flatten() * float(coeff), "the added vector",
                                  allow_zero=True))

    def fn(x):
        return x + v.on(x)

    return [arch.blocks[layer].block.register_forward_pre_hook(map_input(fn), with_kwargs=True)]


@contextmanager
def ablate(model: nn.Module, direction: torch.Tensor, arch: Architecture | None = None,
           layers: list[int] | None = None) -> Iterator[None]:
    """Project the direction [d] (or the span of the basis [k, d]) out of the residual stream everywhere while
    the context is open."""
    with registered(ablation_hooks(model, direction, arch, layers)):
        yield


@contextmanager
def add(model: nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0,
        arch: Architecture | None = None) -> Iterator[None]:
    """Add ``coeff · vector`` to the input of block ``layer`` at every position."""
    with registered(addition_hooks(model, vector, layer, coeff, arch)):
        yield


@contextmanager
def intervene(*contexts) -> Iterator[None]:
    """Combine interventions: ``with intervene(ablate(m, r), add(m, v, 10)): ...``."""
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield
