"""Batched greedy generation (any intervention may be active around the call)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from refdir.core.chat import ChatFormat
from refdir.core.forward import check_groups, prefix_encode


@torch.no_grad()
def generate(model, fmt: ChatFormat, instructions: list[str], *, max_new_tokens: int = 128,
             batch_size: int = 16, progress: bool = True, desc: str = "generate",
             return_ids: bool = False, rows=None, groups: list[int] | None = None,
             shared_prefix: bool = False) -> list:
    """Greedy completions, left-padded batches, with a progress bar. ``rows`` / ``groups``: several edits hooked
    at once (:func:`refdir.core.edits.hooked_rows`); prompt ``i`` is generated under plan ``groups[i]``.
    ``shared_prefix``: the prompts' common token prefix (the template's system part) is run once per batch (once
    per plan) and handed to ``model.generate`` as its KV cache; each row is ``prefix + pad… + own tokens`` with the
    padding masked out, so every token sees what it would see unpadded (the same scheme as
    :func:`refdir.core.forward.shared_prefix_batches`). Not for hooks that count positions from an empty cache."""
    check_groups(rows, groups, len(instructions))
    dev = next(model.parameters()).device
    tok = fmt.tokenizer
    eos = _eos_ids(model, tok)
    # sort by length so that batches pad little; restore order at the end
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    results: dict[int, object] = {}
    # as few batches as batch_size allows, of even sizes (no small leftover batch)
    n_batches = -(-len(order) // batch_size)
    size = -(-len(order) // n_batches) if order else 1
    for s in tqdm(range(0, len(order), size), desc=desc, disable=not progress, leave=False):
        idx = order[s : s + size]
        g = [groups[i] for i in idx] if rows is not None else None
        enc = (prefix_encode(model, fmt, [instructions[i] for i in idx], rows, g) if shared_prefix else None) \
            or fmt.encode([instructions[i] for i in idx], device=dev)
        if rows is not None:
            rows.use(g)  # decoding keeps the batch's rows in order
        new = greedy_new_tokens(model, enc, max_new_tokens, tok.pad_token_id)
        for j, i in enumerate(idx):
            ids = new[j].tolist()
            cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
            ids = ids[:cut]
            text = tok.decode(ids, skip_special_tokens=True)
            results[i] = (text, ids) if return_ids else text
    return [results[i] for i in range(len(instructions))]


def greedy_new_tokens(model, enc: dict, max_new_tokens: int, pad_token_id: int | None) -> torch.Tensor:
    """Greedy decoding of one encoded batch (sampling settings switched off): the new token ids [b, n_new]."""
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                         top_p=None, top_k=None, pad_token_id=pad_token_id)
    return gen[:, enc["input_ids"].shape[1]:]


def _eos_ids(model, tok) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(e)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    if tok.pad_token_id is not None:
        ids.add(tok.pad_token_id)
    return ids
