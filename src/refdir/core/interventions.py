"""Interventions on the residual stream, as context managers that always remove their hooks.

- :func:`ablate` projects r̂ out of the embeddings' output, every block input and every attention / MLP write, at
  every position, including each decoding step of
  ``generate`` with a KV cache (the hooks run on the new token's activations; cached keys/values were computed
  under the same hooks). Given a basis B [k, d] instead of a vector, it projects out the whole span:
  ``x ← x − Bᵀ(B x)``. Where a post-norm sits between a module and the stream (Gemma 2/3/4, OLMo 2), the write is
  projected where the module's writers write, before the norm, off ``normalize(gain ⊙ r̂)`` (through every norm
  of a chain: :func:`refdir.core.postnorm.chain_basis`; :func:`ablation_sites`), so the block writes nothing along
  r̂ and the hooks compute exactly what the weight edit :func:`refdir.core.orthogonalize.orthogonalize_` computes.
  Removing r̂ from the normed output instead (the paper's definition, whose models had no post-norms) is no weight
  edit: on Gemma 3 270M it moved the model ~15 nats away from the edited checkpoint (NOTES.md).
- :func:`add` adds ``coeff · v`` to one block's input at every position.
- :func:`intervene` combines any number of them.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from refdir.core.architecture import Architecture, inspect_model
from refdir.core.directions import ablation_operand, check_direction
from refdir.core.hooks import PerDevice, map_input, map_output, registered, remove_all
from refdir.core.postnorm import COMPONENTS, chain_basis, chain_gains


def project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """x − (x·r̂) r̂ for a unit vector r̂ [d], or x − Bᵀ(B x) for an orthonormal basis B [k, d]; computed in
    float32."""
    r = r_hat.float().to(x.device)
    if r.dim() == 2:
        return (x.float() - (x.float() @ r.T) @ r).to(x.dtype)
    coef = (x.float() @ r).unsqueeze(-1)
    return (x.float() - coef * r).to(x.dtype)


def ablation_sites(arch: Architecture, layers: list[int] | None = None) -> list[tuple[nn.Module, list | None]]:
    """Where the ablation projects a component's write: each attention / MLP module's own output, with the gains of
    the post-norms between it and the stream (:func:`refdir.core.postnorm.chain_gains`; ``[]`` without one), whose
    weight edit the projection equals; where a chain's form is unknown, its outermost norm's output, with None (the
    projection after it: an approximation, as the weight edit is there)."""
    sites: list[tuple[nn.Module, list | None]] = []
    for bp in arch.blocks:
        if layers is not None and bp.index not in layers:
            continue
        for c in COMPONENTS:
            for mod in bp.modules(c):
                gains = chain_gains(bp, mod)  # [] without a post-norm
                site = mod if gains is not None else bp.chain(mod)[-1]
                if not any(site is s for s, _ in sites):
                    sites.append((site, gains))
    return sites


def placed_hooks(arch: Architecture, projection, layers: list[int] | None = None) -> list:
    """Register the ablation at every place it acts (handles; the caller removes them): ``projection(gains)`` is the
    map ``x → x'`` for a place under post-norms of these gains (``[]`` for the embeddings' output, the block inputs and
    modules without post-norms; None after a norm of unknown form, :func:`ablation_sites`), or None for no hook there.
    :func:`ablate` and the RDO training (:mod:`refdir.method.optimize`) both place theirs here."""
    handles = []
    projected: list = []  # the embeddings' last projected output, weakly: block 0 does not project it again

    def embedding_fn(fn):
        def f(x):
            y = fn(x)
            projected[:] = [weakref.ref(y)]
            return y

        return f

    def block0_fn(fn):  # a call given inputs_embeds, a dispatch or a norm in between: not that tensor, projected
        return lambda x: x if projected and projected[0]() is x else fn(x)

    try:
        if (layers is None or 0 in layers) and (fn := projection([])) is not None:
            # as an edited embedding: before any norm, and for every reader of it (Gemma 4's per-layer inputs)
            handles += [emb.register_forward_hook(map_output(embedding_fn(fn))) for _n, emb in arch.embeddings]
        for bp in arch.blocks:
            if (layers is None or bp.index in layers) and (fn := projection([])) is not None:
                fn = block0_fn(fn) if bp.index == 0 else fn
                handles.append(bp.block.register_forward_pre_hook(map_input(fn), with_kwargs=True))
        for site, gains in ablation_sites(arch, layers):
            if (fn := projection(gains)) is not None:
                handles.append(site.register_forward_hook(map_output(fn)))
    except Exception:
        remove_all(handles)
        raise
    return handles


def ablation_hooks(model: nn.Module, direction: torch.Tensor, arch: Architecture | None = None,
                   layers: list[int] | None = None) -> list:
    """The hooks of :func:`ablate` (handles; the caller removes them)."""
    operand = ablation_operand(direction)

    def projection(gains):
        u = chain_basis(gains, operand) if gains else operand
        if u is None:  # the norm cannot write along r̂ at all
            return None
        r = PerDevice(u.to(torch.float32))
        return lambda x: project_out(x, r.on(x))

    return placed_hooks(arch or inspect_model(model), projection, layers)


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
