"""Forward-hook primitives shared by every intervention, edit, capture and steering vector.

PyTorch hooks see a block's hidden state in different places: as the first positional argument or the
``hidden_states`` keyword (transformers v5) on the way in, as a tensor or the first item of a tuple on the way
out. The helpers here read and rewrite it in either form, cache a vector on each device a hook meets (blocks may
sit on different devices), and remove hooks on exit, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PerDevice:
    """A vector cached on each device/dtype it is used on (blocks may live on different devices)."""

    def __init__(self, v: torch.Tensor):
        self.v = v
        self._cache: dict[tuple, torch.Tensor] = {}

    def on(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self.v.to(device=like.device, dtype=like.dtype)
        return self._cache[key]


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block receives (a pre-hook's ``args`` / ``kwargs``), positional or keyword."""
    return args[0] if args and isinstance(args[0], torch.Tensor) else kwargs["hidden_states"]


def output_hidden(out) -> torch.Tensor:
    """The hidden state in a module's output: the tensor itself or the first item of a tuple (or of a list, which
    some older modules return: GPT-1's attention)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def map_output(fn):
    """Wrap ``fn(hidden) -> hidden`` as a forward hook on module outputs (a tensor, or a tuple or list led by one)."""

    def hook(_mod, _args, out):
        if isinstance(out, torch.Tensor):
            return fn(out)
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            new = (fn(out[0]), *out[1:])
            return list(new) if isinstance(out, list) else new
        return out

    return hook


def map_input(fn):
    """Wrap ``fn(hidden) -> hidden`` as a pre-hook (``with_kwargs=True``) on a block's hidden-state input, whether
    it arrives positionally or as the ``hidden_states`` keyword (transformers v5)."""

    def hook(_mod, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = fn(kwargs["hidden_states"])
            return args, kwargs
        return None

    return hook


def remove_all(handles: list) -> None:
    """Remove every hook handle in ``handles``."""
    for h in handles:
        h.remove()


@contextmanager
def registered(handles: list) -> Iterator[list]:
    """Keep the hooks ``handles`` while the context is open; remove them on exit, also on error."""
    try:
        yield handles
    finally:
        remove_all(handles)


@contextmanager
def contiguous_unembedding(model) -> Iterator[None]:
    """Give the output embedding (the unembedding, ``model.get_output_embeddings()``) an input laid out with plain
    row-major strides while open.

    HF causal LMs apply it to ``hidden[:, -logits_to_keep:, :]``, a strided view. Where the weight does not require
    grad (a frozen model, as in training a direction), torch's matmul folds a [b, t, d] input into one matrix
    product only if its strides are row-major, even along size-1 dimensions, which a view of the last position
    (stride ``T · d`` on the batch axis) is not, whether or not ``is_contiguous()`` says so. Otherwise it runs a
    batched product over the weight broadcast to every row, and the CPU kernels copy that broadcast weight out per
    row (in bf16: one ``vocab × d`` copy per row, forward and backward). A row-major input folds into one product
    over the same numbers. On the default model in bf16: a training forward and backward of 8 rows × 17 target
    positions 8.1 → 2.0 s; the template prefix's one-row forward 0.7 → 0.02 s. A no-op for models without an
    output embedding module."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def hook(_mod, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].stride() != row_major_strides(args[0].shape):
            return (args[0].clone(memory_format=torch.contiguous_format),) + tuple(args[1:])
        return None

    with registered([head.register_forward_pre_hook(hook)]):
        yield


def row_major_strides(shape) -> tuple[int, ...]:
    """The strides of a freshly allocated contiguous tensor of ``shape`` (size-1 dimensions included)."""
    out, step = [], 1
    for n in reversed(tuple(shape)):
        out.append(step)
        step *= n
    return tuple(reversed(out))
