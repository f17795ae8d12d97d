"""Interventions on the residual stream, as context managers that always remove their hooks.

- :func:`ablate` projects r̂ out of every block input and every attention / MLP write, at every
  position, including each decoding step of ``generate`` with a KV cache (the hooks run on the
  new token's activations; cached keys/values were computed under the same hooks).
- :func:`add` adds ``coeff · v`` to one block's input at every position.
- :func:`intervene` combines any number of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from refdir.core.architecture import Architecture, inspect_model
from refdir.core.directions import unit_vector


class _PerDevice:
    """A vector cached on each device/dtype it is used on (blocks may live on different devices)."""

    def __init__(self, v: torch.Tensor):
        self.v = v
        self._cache: dict[tuple, torch.Tensor] = {}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.v.to(device=like.device, dtype=like.dtype)
        return self._cache[key]


def project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """x − (x·r̂) r̂, with the projection computed in float32."""
    coef = (x.float() @ r_hat.float().to(x.device)).unsqueeze(-1)
    return (x.float() - coef * r_hat.float().to(x.device)).to(x.dtype)


def _map_hidden(fn):
    """Wrap ``fn(hidden) -> hidden`` as a forward hook on module outputs (tensor or tuple)."""

    def hook(_mod, _args, out):
        if isinstance(out, torch.Tensor):
            return fn(out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (fn(out[0]),) + tuple(out[1:])
        return out

    return hook


def _map_input(fn):
    """Wrap ``fn(hidden) -> hidden`` as a pre-hook on a block's hidden-state input, whether it
    arrives positionally or as the ``hidden_states`` keyword (transformers v5)."""

    def hook(_mod, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        return None

    return hook


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def ablation_hooks(model: nn.Module, direction: torch.Tensor, arch: Architecture | None = None,
                   layers: list[int] | None = None) -> list:
    arch = arch or inspect_model(model)
    r = _PerDevice(unit_vector(direction))

    def fn(x):
        return project_out(x, r.on(x))

    handles = []
    for bp in arch.blocks:
        if layers is not None and bp.index not in layers:
            continue
        handles.append(bp.block.register_forward_pre_hook(_map_input(fn), with_kwargs=True))
        for m in (bp.attn_out, bp.mlp_out):
            if m is not None:
                handles.append(m.register_forward_hook(_map_hidden(fn)))
    return handles


def addition_hooks(model: nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0,
                   arch: Architecture | None = None) -> list:
    arch = arch or inspect_model(model)
    if not 0 <= layer < arch.n_layers:
        raise ValueError(f"layer {layer} outside 0..{arch.n_layers - 1}")
    v = _PerDevice(vector.detach().to(torch.float32).flatten() * float(coeff))

    def fn(x):
        return x + v.on(x)

    return [arch.blocks[layer].block.register_forward_pre_hook(_map_input(fn), with_kwargs=True)]


@contextmanager
def ablate(model: nn.Module, direction: torch.Tensor, arch: Architecture | None = None,
           layers: list[int] | None = None) -> Iterator[None]:
    """Project the direction out of the residual stream everywhere while the context is open."""
    with hooks(ablation_hooks(model, direction, arch, layers)):
        yield


@contextmanager
def add(model: nn.Module, vector: torch.Tensor, layer: int, coeff: float = 1.0,
        arch: Architecture | None = None) -> Iterator[None]:
    """Add ``coeff · vector`` to the input of block ``layer`` at every position."""
    with hooks(addition_hooks(model, vector, layer, coeff, arch)):
        yield


@contextmanager
def intervene(*contexts) -> Iterator[None]:
    """Combine interventions: ``with intervene(ablate(m, r), add(m, v, 10)): ...``."""
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield
