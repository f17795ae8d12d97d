"""Batched greedy generation (any intervention may be active around the call).

Two decoders give the same tokens:

- the default (:func:`greedy_new_tokens`): a plain greedy loop over a ``DynamicCache`` that drops the rows that have
  finished (emitted an EOS id) from the batch, so that every later step computes only the rows still running.
  Short answers (refusals) end long before ``max_new_tokens``, so batches shrink fast;
- HF ``model.generate``, the reference: it keeps computing finished rows (feeding them padding) until every row
  has finished or the token budget is spent. It runs when ``drop_finished=False`` (or :data:`DROP_FINISHED` is
  off), and automatically whenever the loop could not reproduce it exactly (see :func:`_greedy_setup`).

The loop feeds the model exactly what ``model.generate`` feeds it: the prompt (its uncached part when a prefix
cache comes with it), position ids from the attention mask (``cumsum − 1``, 0 on padding; the mask itself left out
when it has no padding), the same cache class, ``logits_to_keep=1`` where the model takes it, then one token per
step with position ``last + 1`` and the mask grown by one. Dropping a row removes it from the cache
(``Cache.batch_select_indices``), the mask, the position ids and, with several edit plans hooked, the plan
assignment (:meth:`refdir.core.row_hooks.Rows.use`); the rows that stay compute what they computed before. In fp32 the
tokens match ``model.generate`` exactly; in bf16 a smaller batch can round a matmul differently, as any change of
batch composition can.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from refdir.core.architecture import cache_kwarg, cache_of
from refdir.core.chat import ChatFormat
from refdir.core.forward import check_groups, prefix_encode
from refdir.errors import RefdirError

DROP_FINISHED = True  # the default for generate / greedy_new_tokens: drop finished rows (False: HF model.generate)
# the activation memory one generation batch may take, as estimated by :func:`row_bytes` (KV cache, one layer's
# transients): this share of the model's fp32 size (4 bytes a parameter, whatever the dtype), and at least
# GEN_MEMORY_MIN. Batches hold fewer rows than ``batch_size`` where their rows would need more, so a run's peak
# stays a bounded multiple of the model's fp32 size (the memory target is stated that way); a half-precision run,
# whose rows take half the bytes, gets twice the rows. On the default model in fp32 the estimate is about 1.6 x
# what a 157-row batch of 64 new tokens measured (~5.7 MB a row)
GEN_MEMORY_SHARE = 0.25
GEN_MEMORY_MIN = 256 * 2**20

# the HF generation steps the plain loop reproduces; a model class that overrides any of them gets model.generate
_HF_STEPS = ("generate", "_sample", "_prefill", "prepare_inputs_for_generation", "_update_model_kwargs_for_generation")


@torch.no_grad()
def generate(model, fmt: ChatFormat, instructions: list[str], *, max_new_tokens: int = 128,
             batch_size: int = 16, progress: bool = True, desc: str = "generate",
             return_ids: bool = False, rows=None, groups: list[int] | None = None,
             shared_prefix: bool = False, drop_finished: bool | None = None, first_logits: bool = False,
             decided: Callable[[str], bool] | None = None):
    """Greedy completions, left-padded batches, with a progress bar. ``rows`` / ``groups``: several edits hooked
    at once (:func:`refdir.core.edits.hooked_rows`); prompt ``i`` is generated under plan ``groups[i]``.
    ``shared_prefix``: the prompts' common token prefix (the template's system part) is run once per batch (once
    per plan) and handed to the decoder as its KV cache; each row is ``prefix + pad… + own tokens`` with the
    padding masked out, so every token sees what it would see unpadded (the same scheme as
    :func:`refdir.core.forward.shared_prefix_batches`). Not for hooks that count positions from an empty cache.
    ``drop_finished``: rows leave the batch once they end (:func:`greedy_new_tokens`); ``False``: HF ``model.generate``
    (the reference, same tokens); ``None``: :data:`DROP_FINISHED`. ``first_logits``: also return the logits the
    first step computed at each prompt's first answer position, [N, vocab] float32 in prompt order (what
    :func:`refdir.core.forward.last_logits` computes, without a second pass over the prompts). ``decided``: a test
    of a row's text so far that, once true, stays true for every continuation (e.g. a judge's verdict that no later
    token can change, :func:`refdir.method.refusal_judge.refusal_settled`): each row ends at the first token where
    it holds, as at an EOS, and its text is cut there, whichever decoder ran (the rows left compute what they
    computed before, so the other rows' tokens are unchanged)."""
    check_groups(rows, groups, len(instructions))
    dev = next(model.parameters()).device
    tok = fmt.tokenizer
    eos = _eos_ids(model, tok)
    until = None if decided is None else (lambda ids: decided(tok.decode(ids, skip_special_tokens=True)))
    # sort by length so that batches pad little; restore order at the end
    order = sorted(range(len(instructions)), key=lambda i: len(instructions[i]))
    results: dict[int, object] = {}
    firsts = None  # [N, vocab] float32, filled batch by batch (no per-row copies to stack at the end)
    # as few batches as batch_size and the memory budget allow, of even sizes (no small leftover batch)
    longest = fmt.encode(instructions)["input_ids"].shape[1] if instructions else 0
    cap = max(1, int(generation_budget(model) // max(1, row_bytes(model, longest, max_new_tokens))))
    n_batches = -(-len(order) // min(batch_size, cap))
    size = -(-len(order) // n_batches) if order else 1
    for s in tqdm(range(0, len(order), size), desc=desc, disable=not progress, leave=False):
        idx = order[s : s + size]
        g = [groups[i] for i in idx] if rows is not None else None
        enc = (prefix_encode(model, fmt, [instructions[i] for i in idx], rows, g, max_new_tokens)
               if shared_prefix else None) \
            or fmt.encode([instructions[i] for i in idx], device=dev)
        if rows is not None:
            rows.use(g)  # the batch's rows in order; the decoder re-assigns them when it drops rows
        # rows stop at any id that ends the text below (a superset of the model's own EOS ids): the cut is the same
        new = greedy_new_tokens(model, enc, max_new_tokens, tok.pad_token_id, eos_ids=eos, rows=rows, groups=g,
                                drop_finished=drop_finished, first_logits=first_logits, until=until)
        if first_logits:
            new, lg = new
            if firsts is None:
                firsts = lg.new_empty((len(instructions), lg.shape[-1]))
            firsts[torch.as_tensor(idx, device=lg.device)] = lg
            del lg
        for j, i in enumerate(idx):
            ids = new[j].tolist()
            cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
            ids = ids[:cut]
            if until is not None:
                ids = ids[:_first_decided(ids, until)]
            text = tok.decode(ids, skip_special_tokens=True)
            results[i] = (text, ids) if return_ids else text
    out = [results[i] for i in range(len(instructions))]
    if first_logits:
        return out, (firsts if firsts is not None else torch.empty(0))
    return out


def _first_decided(ids: list[int], until: Callable[[list[int]], bool]) -> int:
    """The length of the shortest prefix of ``ids`` that ``until`` accepts (``len(ids)`` when none does), for a
    test that stays true once true: the cut the plain loop makes while decoding, found afterwards for a decoder
    that ran to the end (HF ``model.generate``)."""
    if not ids or not until(ids):
        return len(ids)
    lo, hi = 1, len(ids)  # until(ids[:hi]) holds
    while lo < hi:
        mid = (lo + hi) // 2
        if until(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return hi


def generation_budget(model) -> float:
    """Bytes of activations one generation batch may take (see :data:`GEN_MEMORY_SHARE`)."""
    fp32_size = 4 * sum(p.numel() for p in model.parameters())
    return max(GEN_MEMORY_MIN, GEN_MEMORY_SHARE * fp32_size)


def row_bytes(model, prompt_tokens: int, new_tokens: int) -> int:
    """An upper estimate of the memory one generation row needs beyond the weights: its KV cache at full length
    (every layer) and one layer's transients (keys and values repeated to every query head; the MLP's hidden
    activations over the prompt), from the model's config. 0 where the config lacks the sizes (no cap)."""
    try:
        cfg = model.config.get_text_config(decoder=True)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size)
        layers = int(cfg.num_hidden_layers)
        elem = next(model.parameters()).element_size()
    except (AttributeError, TypeError, ValueError, StopIteration):
        return 0
    t = prompt_tokens + new_tokens
    return (layers * 2 * kv * hd * t + 2 * heads * hd * t + 3 * inter * prompt_tokens) * elem


@torch.no_grad()
def greedy_new_tokens(model, enc: dict, max_new_tokens: int, pad_token_id: int | None, *,
                      eos_ids=None, rows=None, groups: list[int] | None = None,
                      drop_finished: bool | None = None, fallback: bool = True, first_logits: bool = False,
                      until: Callable[[list[int]], bool] | None = None):
    """Greedy decoding of one encoded batch (sampling settings switched off): the new token ids [b, n_new], each
    row padded with ``pad_token_id`` after its end. With ``drop_finished`` (default :data:`DROP_FINISHED`) and a
    model / cache the plain loop supports, a loop that drops each row from the batch once it ends; otherwise HF
    ``model.generate`` (``fallback=False``: raise :class:`RefdirError` instead, for a model, generation config or
    cache the loop cannot decode exactly like ``model.generate``). ``eos_ids``: the
    ids that end a row (default: the ones ``model.generate`` stops at, which makes the two outputs equal as
    tensors; a superset ends rows earlier, equal up to each row's first id of the set). ``rows`` / ``groups``:
    several plans hooked (:func:`refdir.core.edits.hooked_rows`), ``groups[j]`` the plan of batch row ``j``; the
    caller has called ``rows.use(groups)``. ``first_logits``: return ``(ids, logits)``, the first step's logits
    [b, vocab] float32 beside the ids. ``until``: a test of a row's new ids that ends the row where it first holds
    (the plain loop only; HF ``model.generate`` ignores it, and the caller cuts its rows afterwards)."""
    drop = DROP_FINISHED if drop_finished is None else drop_finished
    setup = _greedy_setup(model, enc, max_new_tokens, pad_token_id) if drop else None
    if setup is None:
        if drop and not fallback:
            raise RefdirError("this model / generation config / cache needs HF model.generate (rows cannot be dropped)")
        return hf_greedy_new_tokens(model, enc, max_new_tokens, pad_token_id, first_logits)
    return _decode(model, enc, max_new_tokens, setup, eos_ids, pad_token_id, rows, groups, first_logits, until)


def hf_greedy_new_tokens(model, enc: dict, max_new_tokens: int, pad_token_id: int | None,
                         first_logits: bool = False):
    """The reference: HF ``model.generate`` greedy (finished rows keep being computed): new token ids [b, n_new]
    (with ``first_logits``, ``(ids, the first step's logits [b, vocab] float32)``)."""
    if not first_logits:
        gen = model.generate(**enc, **_hf_kwargs(max_new_tokens, pad_token_id))
        return gen[:, enc["input_ids"].shape[1]:]
    gen = model.generate(**enc, **_hf_kwargs(max_new_tokens, pad_token_id), output_logits=True,
                         return_dict_in_generate=True)
    return gen.sequences[:, enc["input_ids"].shape[1]:], gen.logits[0].float()


# ------------------------------------------------------------------------------------------ the plain loop


@dataclass
class _Setup:
    """How ``model.generate`` would run this batch, as far as the plain loop needs it."""

    cache: object  # the cache to decode with (the one in enc, or a fresh one of the class generate would make)
    cache_key: str  # the keyword model.forward takes it by
    stop_ids: list[int]  # the ids generate stops a row at
    pad_id: int | None  # what generate writes after a row's end
    position_ids: bool  # generate passes position ids
    logits_to_keep: bool  # generate passes logits_to_keep=1
    decode_context: object  # generate's context manager around the decoding steps


def _hf_kwargs(max_new_tokens: int, pad_token_id: int | None) -> dict:
    return dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=pad_token_id)


def _greedy_setup(model, enc: dict, max_new_tokens: int, pad_token_id: int | None) -> _Setup | None:
    """What the plain loop needs to reproduce ``model.generate`` on ``enc``, or None where it cannot: an
    encoder-decoder model; a model class that overrides a generation step; a generation config that is not plain
    greedy (beams, assisted decoding, logits processors such as a repetition penalty, stop strings, a time limit,
    a static / quantized / offloaded cache, no cache, chunked prefill, extra outputs); a cache whose rows cannot be
    selected exactly (anything but a ``DynamicCache`` of plain full / sliding-window layers). Decided from the
    objects; the HF internals it reads are guarded, any surprise meaning ``model.generate``."""
    try:
        from transformers import DynamicCache
        from transformers.generation import GenerationMixin
        from transformers.generation.configuration_utils import GenerationMode
    except ImportError:
        return None
    cfg = getattr(model, "config", None)
    ids, mask = enc.get("input_ids"), enc.get("attention_mask")
    if (cfg is None or getattr(cfg, "is_encoder_decoder", False) or not isinstance(model, GenerationMixin)
            or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not isinstance(mask, torch.Tensor)
            or mask.dim() != 2 or set(enc) - {"input_ids", "attention_mask", "cache", "past_key_values"}):
        return None
    if any(getattr(type(model), n, None) is not getattr(GenerationMixin, n, None) for n in _HF_STEPS):
        return None
    try:
        params = set(inspect.signature(model.forward).parameters)
        if "attention_mask" not in params or not model._supports_default_dynamic_cache():
            return None
        gc, model_kwargs = model._prepare_generation_config(None, **_hf_kwargs(max_new_tokens, pad_token_id))
        if (model_kwargs or gc.get_generation_mode() != GenerationMode.GREEDY_SEARCH
                or gc.num_return_sequences not in (None, 1) or gc.use_cache is False
                or gc.cache_implementation is not None or gc.prefill_chunk_size is not None
                or gc.max_time is not None or gc.stop_strings is not None or gc.token_healing
                or gc.output_attentions or gc.output_hidden_states or gc.return_dict_in_generate):
            return None
        model._prepare_special_tokens(gc, True, device=ids.device, batch_size=ids.shape[0])
        if len(model._get_logits_processor(gc, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids,
                                           device=ids.device, model_kwargs=dict(enc))):
            return None
        eos_t, pad_t = gc._eos_token_tensor, gc._pad_token_tensor
        stop_ids = [] if eos_t is None else [int(t) for t in eos_t.flatten().tolist()]
        pad_id = None if pad_t is None else int(pad_t)
        cache = enc.get("cache", enc.get("past_key_values"))
        if cache is None:
            cache = DynamicCache(config=cfg.get_text_config(decoder=True))
        if not _rows_selectable(cache):
            return None
        ctx = model._optimize_model_for_decode()
    except Exception:  # noqa: BLE001 - HF internals changed shape: use model.generate itself
        return None
    return _Setup(cache, cache_kwarg(model), stop_ids, pad_id, "position_ids" in params,
                  "logits_to_keep" in params, ctx)


def _rows_selectable(cache) -> bool:
    """Whether ``cache.batch_select_indices`` keeps exactly the chosen rows of everything the cache holds: a plain
    ``DynamicCache`` (not offloaded) whose layers are full or sliding-window attention key/value layers (or the
    empty stand-ins of layers that share another's)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

    plain = (DynamicLayer, DynamicSlidingWindowLayer, DummyLayer)
    rep = getattr(cache, "layer_class_to_replicate", None)
    return (type(cache) is DynamicCache and not getattr(cache, "offloading", False)
            and callable(getattr(cache, "batch_select_indices", None))
            and all(type(layer) in plain for layer in cache.layers) and (rep is None or rep in plain))


def _decode(model, enc: dict, max_new_tokens: int, setup: _Setup, eos_ids, pad_token_id, rows, groups,
            first_logits: bool = False, until=None):
    ids, mask = enc["input_ids"], enc["attention_mask"]
    dev = ids.device
    b = ids.shape[0]
    check_groups(rows, groups, b)
    stop = sorted({int(t) for t in eos_ids}) if eos_ids is not None else setup.stop_ids
    pad = pad_token_id if pad_token_id is not None else setup.pad_id
    if pad is None:
        pad = stop[0] if stop else 0
    stop_t = torch.tensor(stop, dtype=torch.long, device=dev)
    cache = setup.cache
    # as generate: position ids from the mask (0 on padding); the mask itself only when it has padding
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 0)
    attn = None if bool((mask == 1).all()) else mask
    past = cache.get_seq_length()
    if past and mask.shape[1] == ids.shape[1]:  # the full sequence was passed: feed only what the cache lacks
        ids = ids[:, past:]
    step_ids = ids
    pos_in = pos[:, -ids.shape[1]:]
    extra = {"use_cache": True}
    if setup.logits_to_keep:
        extra["logits_to_keep"] = 1
    out = torch.full((b, max(max_new_tokens, 0)), pad, dtype=torch.long, device=dev)
    alive = torch.arange(b, device=dev)  # the original row of every batch row still decoding
    g_alive = torch.as_tensor(groups, dtype=torch.long) if rows is not None else None
    n = 0
    with setup.decode_context:
        while n < max_new_tokens:
            kw = {setup.cache_key: cache, **extra}
            if setup.position_ids:
                kw["position_ids"] = pos_in
            if attn is not None:
                kw["attention_mask"] = attn
            res = model(input_ids=step_ids, return_dict=True, **kw)
            cache = cache_of(res)
            step = res.logits[:, -1].to(dtype=torch.float32)
            if first_logits and n == 0:
                # this step's logits as they are where they hold just this step (no copy), else a copy
                first = step if step.untyped_storage().nbytes() == step.nbytes else step.clone()
            nxt = torch.argmax(step, dim=-1)
            del res, step
            out[alive, n] = nxt
            n += 1
            done = torch.isin(nxt, stop_t)
            if until is not None:
                so_far = out[alive, :n].tolist()
                done |= torch.tensor([not d and until(r) for r, d in zip(so_far, done.tolist(), strict=True)],
                                     dtype=torch.bool, device=dev)
            if n >= max_new_tokens or bool(done.all()):
                break
            if bool(done.any()):  # drop the finished rows from everything that has a batch axis
                keep = (~done).nonzero().flatten()
                cache.batch_select_indices(keep)
                alive, nxt, pos = alive[keep], nxt[keep], pos[keep]
                if attn is not None:
                    attn = attn[keep]
                if rows is not None:
                    g_alive = g_alive[keep.cpu()]
                    rows.use(g_alive)
            # the next step: each row's new token at position last + 1, the mask grown by one
            pos = pos[:, -1:] + 1
            pos_in = pos
            step_ids = nxt[:, None]
            if attn is not None:
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=-1)
    if first_logits:
        return out[:, :n], (first if n else torch.empty(b, 0))
    return out[:, :n]


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
