"""Forward passes over chat prompts: logits at the first answer position, and the shared-prefix machinery.

Chat prompts share a long common token prefix (the template's system part). Running it once and reusing its KV
cache for every row is exact when each row is ``prefix + pad… + own tokens`` with the padding masked out and the
position ids skipping it. Scoring, generation and activation capture all use the pieces here:

- :func:`common_prefix_len`: how many leading tokens every row shares;
- :func:`prefix_cache` / :func:`cache_for_rows`: the prefix's KV cache, once per hooked plan, spread over a batch;
- :func:`tail_batch`: each row's own tokens padded between the prefix and them;
- :func:`left_pad`: a left-padded batch of token-id rows;
- :func:`length_batches`: batches of rows of similar length, so that batches pad little;
- :func:`shared_prefix_batches`: the forward passes themselves, batch by batch.

``rows`` / ``groups`` mean several edits hooked at once (:func:`refdir.core.edits.hooked_rows`): prompt ``i`` runs
under plan ``groups[i]``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from refdir.core.architecture import attention_only, cache_kwarg, cache_of, takes_position_ids
from refdir.core.chat import ChatFormat
from refdir.errors import RefdirError

# A batch costs about this many tokens' work beyond its rows (the unembedding's weights are read once per batch,
# and small batches run the matmuls less efficiently); used to trade padding against the number of batches.
BATCH_COST_TOKENS = 128


def check_groups(rows, groups: list[int] | None, n: int) -> None:
    """``rows`` and ``groups`` come together, one plan index per prompt."""
    if (rows is None) != (groups is None) or (groups is not None and len(groups) != n):
        raise RefdirError("rows and groups go together: one plan index per prompt")


@torch.no_grad()
def last_logits(model: nn.Module, fmt: ChatFormat, instructions: list[str], batch_size: int = 16,
                progress: bool = False, desc: str = "logits", shared_prefix: bool = False,
                full_logits: bool = False, rows=None, groups: list[int] | None = None) -> torch.Tensor:
    """Logits at the first answer position (the prompt's last token), [N, vocab] float32.

    ``shared_prefix=True`` runs the prompts' common token prefix (the template's system part)
    once and reuses its KV cache for every row; see :func:`last_logits_shared_prefix`.
    ``full_logits=True`` is the plain reference: logits at every position, last one kept.
    """
    if not instructions:
        raise RefdirError("empty prompt set")
    check_groups(rows, groups, len(instructions))
    if shared_prefix:
        return last_logits_shared_prefix(model, fmt, instructions, batch_size, rows=rows, groups=groups)
    dev = next(model.parameters()).device
    out = []
    for s in tqdm(range(0, len(instructions), batch_size), desc=desc, disable=not progress, leave=False):
        enc = fmt.encode(instructions[s : s + batch_size], device=dev, positions=takes_position_ids(model))
        if rows is not None:
            rows.use(groups[s : s + batch_size])
        if full_logits:
            logits = model(**enc, use_cache=False).logits[:, -1, :]
        else:
            logits = model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        out.append(logits.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def last_logits_shared_prefix(model: nn.Module, fmt: ChatFormat, instructions: list[str],
                              batch_size: int = 32, rows=None, groups: list[int] | None = None) -> torch.Tensor:
    """Exact last-position logits with the common prefix computed once (see :func:`shared_prefix_batches`)."""
    check_groups(rows, groups, len(instructions))
    chunks: dict[int, torch.Tensor] = {}
    batches = shared_prefix_batches(model, fmt, instructions, batch_size, rows=rows, groups=groups)
    if batches is None:
        return last_logits(model, fmt, instructions, batch_size, rows=rows, groups=groups)
    for idx, logits in batches:
        for j, i in enumerate(idx):
            chunks[i] = logits[j].float().cpu()
    return torch.stack([chunks[i] for i in range(len(instructions))])


def common_prefix_len(rows: list[list[int]], min_tail: int = 1) -> int:
    """The number of leading tokens all ``rows`` share, leaving every row at least ``min_tail`` of its own."""
    k = min(len(r) for r in rows) - min_tail
    first = rows[0]
    for r in rows[1:]:
        j = 0
        while j < k and r[j] == first[j]:
            j += 1
        k = j
    return max(k, 0)


def length_batches(lengths: list[int], max_rows: int, batch_cost: int = BATCH_COST_TOKENS) -> list[list[int]]:
    """Split prompts into batches of at most ``max_rows`` that pad little: indices sorted by length, cut where the
    padded token count (rows × longest row) plus ``batch_cost`` per batch is smallest (exact, by dynamic
    programming over the sorted lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        lj = lengths[order[j - 1]]
        for i in range(max(0, j - max_rows), j):
            c = best[i] + (j - i) * lj + batch_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    return out[::-1]


def prefix_cache(model, prefix: list[int], rows=None):
    """The KV cache of the token list ``prefix``, run once per hooked plan (``rows``; once without), under whatever
    hooks are active."""
    dev = next(model.parameters()).device
    n_plans = rows.n if rows is not None else 1
    if rows is not None:
        rows.use(list(range(n_plans)))
    return cache_of(model(input_ids=torch.tensor([prefix] * n_plans, device=dev), use_cache=True, logits_to_keep=1))


def cache_for_rows(cache, n: int, groups: list[int] | None, device):
    """Expand a prefix cache (one row per plan) in place to a batch of ``n`` rows: row j gets plan ``groups[j]``'s
    prefix, or the one plan's without ``groups``."""
    if groups is None:
        cache.batch_repeat_interleave(n)
    else:
        cache.batch_select_indices(torch.tensor(groups, device=device))
    return cache


def left_pad(rows: list[list[int]], pad: int, device=None) -> dict:
    """A batch of token-id rows, left-padded: ``input_ids`` and ``attention_mask`` [b, longest row], moved to
    ``device`` when one is given."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    enc = {"input_ids": ids, "attention_mask": mask}
    return enc if device is None else {k: v.to(device) for k, v in enc.items()}


def tail_batch(tails: list[list[int]], k: int, pad: int):
    """Each row's own tokens after a ``k``-token prefix, padded *between* the prefix and them: (input ids [b, S],
    attention mask over prefix + tail [b, k + S], position ids of the tail [b, S])."""
    S = max(len(t) for t in tails)
    ids = torch.full((len(tails), S), pad, dtype=torch.long)
    mask = torch.zeros(len(tails), k + S, dtype=torch.long)
    mask[:, :k] = 1
    pos = torch.zeros(len(tails), S, dtype=torch.long)
    for j, t in enumerate(tails):
        ids[j, S - len(t):] = torch.tensor(t)
        mask[j, k + S - len(t):] = 1
        pos[j, S - len(t):] = torch.arange(k, k + len(t))
    return ids, mask, pos


def shared_prefix_batches(model: nn.Module, fmt: ChatFormat, instructions: list[str], batch_size: int = 32,
                          rows=None, groups: list[int] | None = None, min_tail: int = 1):
    """Forward passes over ``instructions`` with their common token prefix (the template's system part) run once:
    an iterator of ``(indices, last-position logits [b, vocab])``, one per batch, or ``None`` when the prompts share
    no prefix worth caching. Every row keeps at least ``min_tail`` tokens of its own.

    Each row is ``prefix + pad… + own tokens``: the prefix's KV cache (computed once, under
    whatever hooks are active) is repeated over the batch, the padding sits *between* the
    prefix and the row's own tokens and is masked out, and position ids skip it, so every real
    token sees exactly the sequence it would see unpadded. Rows are batched by length
    (:func:`length_batches`) so that batches pad little. Intervention hooks act on every position, prefix
    included, as in the plain path; hooks that read block inputs see each batch's rows (own tokens only,
    left-padded) after seeing the prefix once. With several plans hooked (``rows``), the prefix is run once per
    plan and each row gets its plan's prefix cache.
    """
    ids_rows = [fmt.prompt_ids(i) for i in instructions]
    k = common_prefix_len(ids_rows, min_tail)
    if k < 2 or not attention_only(model) or not within_window(model, max(len(r) for r in ids_rows)):
        return None
    return _prefix_batches(model, fmt, ids_rows, k, batch_size, rows, groups)


def within_window(model: nn.Module, n_tokens: int) -> bool:
    """Whether rows of ``n_tokens`` (prompt and any new tokens) fit in the model's sliding attention window (or it
    has none). The shared-prefix layout pads *between* the prefix and each row's tokens, which a sliding window
    counts as distance: past the window it would hide prefix tokens the plain path shows (Gemma 2/3/4, Mistral)."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    w = getattr(cfg, "sliding_window", None)
    return not isinstance(w, int) or w <= 0 or n_tokens <= w


@torch.no_grad()
def _prefix_batches(model, fmt, ids_rows, k, batch_size, rows, groups):
    dev = next(model.parameters()).device
    cache = prefix_cache(model, ids_rows[0][:k], rows)
    ckw = cache_kwarg(model)
    for idx in length_batches([len(r) - k for r in ids_rows], batch_size):
        ids, mask, pos = tail_batch([ids_rows[i][k:] for i in idx], k, fmt.tokenizer.pad_token_id)
        g = [groups[i] for i in idx] if rows is not None else None
        c = cache_for_rows(copy.deepcopy(cache), len(idx), g, dev)
        if rows is not None:
            rows.use(g)
        out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                    use_cache=True, logits_to_keep=1, **{ckw: c})
        yield idx, out.logits[:, -1, :]


def prefix_encode(model, fmt: ChatFormat, instructions: list[str], rows=None,
                  groups: list[int] | None = None, new_tokens: int = 0) -> dict | None:
    """Inputs for ``model.generate`` with the prompts' common prefix already in a KV cache (once per plan with
    ``rows``): the full input ids, the attention mask over prefix + padded tails, and the cache. None when the
    prompts share no prefix worth caching, or when they and ``new_tokens`` do not fit the sliding window
    (:func:`within_window`)."""
    dev = next(model.parameters()).device
    ids = [fmt.prompt_ids(i) for i in instructions]
    k = common_prefix_len(ids)
    if k < 2 or not attention_only(model) or not within_window(model, max(len(r) for r in ids) + new_tokens):
        return None
    cache = cache_for_rows(prefix_cache(model, ids[0][:k], rows), len(ids), groups, dev)
    tail, mask, _pos = tail_batch([r[k:] for r in ids], k, fmt.tokenizer.pad_token_id)
    input_ids = torch.cat([torch.tensor([ids[0][:k]] * len(ids), dtype=torch.long), tail], dim=1)
    return {"input_ids": input_ids.to(dev), "attention_mask": mask.to(dev), cache_kwarg(model): cache}
