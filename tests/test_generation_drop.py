"""Greedy decoding that drops finished rows from the batch gives exactly the tokens of HF ``model.generate``
(tiny random decoders, fp32), with and without the shared-prefix cache and with several edit plans in one batch;
and it really does shrink the batch."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import make_tiny

from refdir.core.architecture import inspect_model
from refdir.core.chat import ChatFormat
from refdir.core.directions import Candidates
from refdir.core.edits import Edit, hooked_rows, resolve
from refdir.core.forward import prefix_encode
from refdir.core.generation import (
    _greedy_setup,
    _rows_selectable,
    generate,
    greedy_new_tokens,
    hf_greedy_new_tokens,
)
from refdir.errors import RefdirError

ARCHS = ["qwen2", "llama", "gemma3_text", "gemma2", "gpt_neox", "qwen2_moe", "gemma4_text"]
PROMPTS = ["Explain tides", "Write a short poem about the sea and the moon", "Hi", "Bake bread now please",
           "How do magnets work?", "List three colours", "Tell me a joke about cats and dogs", "Why is the sky blue",
           "Summarise the plot of a famous novel in one line", "Name a prime number"]
N_TOKENS = 12


def _fmt(tok) -> ChatFormat:
    return ChatFormat(tok, system="You are a helpful assistant.")


def first_block(model):
    return inspect_model(model).blocks[0].block  # (inspect_model runs a probe forward: not under row plans)


@contextmanager
def batch_sizes(block):
    """The batch size of every forward pass through ``block``, recorded while the context is open."""
    seen: list[int] = []

    def pre(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(int(x.shape[0]))

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield seen
    finally:
        h.remove()


def _early_eos(model, fmt, prompts) -> int:
    """A token id that the model emits early for some prompts but not for others (used as an extra EOS id, so
    that rows finish at different steps): chosen from the HF greedy trajectories without any stop."""
    enc = fmt.encode(prompts)
    gc = model.generation_config
    old = gc.eos_token_id
    gc.eos_token_id = None
    try:
        traj = hf_greedy_new_tokens(model, enc, N_TOKENS, fmt.tokenizer.pad_token_id)
    finally:
        gc.eos_token_id = old
    best, best_score = None, -1
    for t in torch.unique(traj).tolist():
        first = [row.tolist().index(t) if t in row.tolist() else None for row in traj]
        early = [f for f in first if f is not None and f < N_TOKENS - 2]
        if len(early) == len(prompts):  # every row would end: nothing left to compare after the drop
            continue
        score = len(set(early)) * 10 + len(early)
        if early and score > best_score:
            best, best_score = t, score
    assert best is not None, "the tiny model must emit some token early for some rows only"
    return int(best)


def _with_eos(model, fmt, prompts) -> int:
    t = _early_eos(model, fmt, prompts)
    model.generation_config.eos_token_id = [t, fmt.tokenizer.eos_token_id]
    return t


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_dropping_finished_rows_gives_the_tokens_of_model_generate(tiny_tokenizer, arch, shared_prefix):
    model = make_tiny(arch, len(tiny_tokenizer))
    fmt = _fmt(tiny_tokenizer)
    _with_eos(model, fmt, PROMPTS)
    assert _greedy_setup(model, fmt.encode(PROMPTS[:2]), N_TOKENS, tiny_tokenizer.pad_token_id) is not None, \
        f"{arch}: the plain loop must support this model"
    kw = dict(max_new_tokens=N_TOKENS, batch_size=len(PROMPTS), progress=False, return_ids=True,
              shared_prefix=shared_prefix)
    ref = generate(model, fmt, PROMPTS, drop_finished=False, **kw)
    with batch_sizes(first_block(model)) as seen:
        got = generate(model, fmt, PROMPTS, drop_finished=True, **kw)
    assert got == ref, arch
    lengths = [len(ids) for _t, ids in ref]
    assert min(lengths) < N_TOKENS - 2 and max(lengths) > min(lengths) + 1, f"{arch}: rows must end at different steps"
    steps = seen[seen.index(len(PROMPTS)):]  # (after the prefix's own pass with shared_prefix)
    assert steps[-1] < len(PROMPTS), f"{arch}: finished rows must leave the batch"
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False)), "the batch only ever shrinks"


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_new_token_tensors_equal_model_generate(tiny_tokenizer, arch, shared_prefix):
    """With the model's own EOS ids the loop's output tensor equals generate's: same width, padding after each end."""
    model = make_tiny(arch, len(tiny_tokenizer))
    fmt = _fmt(tiny_tokenizer)
    _with_eos(model, fmt, PROMPTS)
    pad = tiny_tokenizer.pad_token_id

    def enc():
        return (prefix_encode(model, fmt, PROMPTS) if shared_prefix else None) or fmt.encode(PROMPTS)

    ref = hf_greedy_new_tokens(model, enc(), N_TOKENS, pad)
    got = greedy_new_tokens(model, enc(), N_TOKENS, pad, fallback=False)
    assert torch.equal(got, ref)
    assert torch.equal(greedy_new_tokens(model, enc(), N_TOKENS, pad), ref)
    assert (ref == pad).any(), "some rows must have ended early"


def test_no_row_ending_runs_to_the_token_budget(tiny_tokenizer):
    model = make_tiny("llama", len(tiny_tokenizer))
    fmt = _fmt(tiny_tokenizer)
    model.generation_config.eos_token_id = None
    enc = fmt.encode(PROMPTS[:4])
    ref = hf_greedy_new_tokens(model, enc, 7, tiny_tokenizer.pad_token_id)
    assert ref.shape == (4, 7)
    assert torch.equal(greedy_new_tokens(model, fmt.encode(PROMPTS[:4]), 7, 0, eos_ids=[], fallback=False), ref)


def _planned_batch(tokenizer, arch: str, n: int):
    """A tiny model of ``arch``, its chat format, the three plans of :func:`_plans`, and the first ``n`` prompts
    repeated once per plan with each row's plan index."""
    model = make_tiny(arch, len(tokenizer))
    fmt = _fmt(tokenizer)
    prompts = PROMPTS[:n]
    plans = _plans(model, fmt)
    return model, fmt, prompts, plans, [k for k in range(len(plans)) for _ in prompts], prompts * len(plans)


def _plans(model, fmt):
    g = torch.Generator().manual_seed(3)
    arch = inspect_model(model)
    cands = Candidates.from_means(torch.randn(fmt.n_post, arch.n_layers + 1, arch.d_model, generator=g,
                                              dtype=torch.float64),
                                  torch.randn(fmt.n_post, arch.n_layers + 1, arch.d_model, generator=g,
                                              dtype=torch.float64))
    return [None, resolve(Edit.full(-1, 1), cands), resolve(Edit.full(-2, 2), cands)]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_row_plans_keep_their_plan_when_rows_are_dropped(tiny_tokenizer, arch, shared_prefix):
    """Several edits hooked in one batch (hooked_rows): after rows leave, every remaining row keeps its own plan."""
    model, fmt, prompts, plans, groups, everything = _planned_batch(tiny_tokenizer, arch, 6)
    block = first_block(model)
    with hooked_rows(model, plans) as rows:
        rows.use(groups)
        # an EOS id that some rows (under some plan) emit early
        t = _early_eos(model, fmt, everything)
        model.generation_config.eos_token_id = [t, tiny_tokenizer.eos_token_id]
        kw = dict(max_new_tokens=N_TOKENS, batch_size=len(everything), progress=False, return_ids=True,
                  rows=rows, groups=groups, shared_prefix=shared_prefix)
        ref = generate(model, fmt, everything, drop_finished=False, **kw)
        with batch_sizes(block) as seen:
            got = generate(model, fmt, everything, drop_finished=True, **kw)
    assert got == ref
    assert seen[-1] < len(everything), "rows must have been dropped"
    assert ref[:len(prompts)] != ref[len(prompts):2 * len(prompts)], "the plans must change some completions"


def test_model_generate_runs_where_the_loop_cannot_be_exact(tiny_tokenizer, monkeypatch):
    """A logits processor (repetition penalty), a static cache, or the flag off: HF model.generate, same tokens."""
    from transformers import DynamicCache, StaticCache

    import refdir.core.generation as generation

    model = make_tiny("qwen2", len(tiny_tokenizer))
    fmt = _fmt(tiny_tokenizer)
    enc = fmt.encode(PROMPTS[:4])
    pad = tiny_tokenizer.pad_token_id
    assert _greedy_setup(model, enc, 5, pad) is not None
    model.generation_config.repetition_penalty = 1.3
    assert _greedy_setup(model, enc, 5, pad) is None
    with pytest.raises(RefdirError):
        greedy_new_tokens(model, enc, 5, pad, fallback=False)
    with batch_sizes(first_block(model)) as seen:
        out = greedy_new_tokens(model, enc, 5, pad)
    assert torch.equal(out, hf_greedy_new_tokens(model, enc, 5, pad)) and seen  # through model.generate
    model.generation_config.repetition_penalty = 1.0
    loops = []  # a spy on the row-dropping loop: it still decodes
    real_decode = generation._decode
    monkeypatch.setattr(generation, "_decode", lambda *a, **k: loops.append(1) or real_decode(*a, **k))
    ref = greedy_new_tokens(model, enc, 5, pad, drop_finished=False)
    assert not loops  # the flag off: model.generate, not the loop
    assert torch.equal(ref, greedy_new_tokens(model, enc, 5, pad, drop_finished=True)) and loops  # the loop agrees
    assert _rows_selectable(DynamicCache(config=model.config))
    assert not _rows_selectable(StaticCache(config=model.config, max_cache_len=32))
    assert _greedy_setup(model, {**enc, "cache": StaticCache(config=model.config, max_cache_len=64)}, 5, pad) is None


def test_a_model_that_overrides_generation_steps_gets_model_generate(tiny_tokenizer):
    """phi3 overrides prepare_inputs_for_generation (it may switch its rope): the loop is not used, tokens unchanged."""
    model = make_tiny("phi3", len(tiny_tokenizer))
    fmt = _fmt(tiny_tokenizer)
    _with_eos(model, fmt, PROMPTS)
    assert _greedy_setup(model, fmt.encode(PROMPTS), N_TOKENS, tiny_tokenizer.pad_token_id) is None
    kw = dict(max_new_tokens=N_TOKENS, batch_size=len(PROMPTS), progress=False, return_ids=True)
    with batch_sizes(first_block(model)) as seen:
        got = generate(model, fmt, PROMPTS, **kw)
    assert got == generate(model, fmt, PROMPTS, drop_finished=False, **kw)
    assert set(seen) == {len(PROMPTS)}, "model.generate keeps every row"


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
@pytest.mark.parametrize("drop", [True, False])
def test_first_step_logits_equal_a_separate_pass(tiny_tokenizer, arch, drop):
    """generate(first_logits=True) returns the logits a separate last_logits pass computes (several plans hooked,
    shared prefix; the loop and HF generate alike), and the same completions as without it."""
    from refdir.core.forward import last_logits

    model, fmt, prompts, plans, groups, everything = _planned_batch(tiny_tokenizer, arch, 5)
    with hooked_rows(model, plans) as rows:
        kw = dict(max_new_tokens=4, batch_size=7, progress=False, rows=rows, groups=groups, shared_prefix=True,
                  drop_finished=drop)
        texts, lg = generate(model, fmt, everything, first_logits=True, **kw)
        assert texts == generate(model, fmt, everything, **kw)
        ref = last_logits(model, fmt, everything, 7, shared_prefix=True, rows=rows, groups=groups)
    assert lg.shape == ref.shape and lg.dtype == torch.float32
    torch.testing.assert_close(lg, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(lg[: len(prompts)], lg[len(prompts): 2 * len(prompts)]), "plans change the logits"


def test_a_memory_budget_splits_generation_into_smaller_batches(tiny_tokenizer, monkeypatch):
    """Rows per batch are capped by generation_budget over row_bytes (the KV cache grows with rows × tokens): a
    budget of three rows gives batches of at most three, the same completions and first-step logits as one batch."""
    import refdir.core.generation as gen

    model = make_tiny("qwen2", len(tiny_tokenizer))
    fmt = _fmt(tiny_tokenizer)
    longest = fmt.encode(PROMPTS)["input_ids"].shape[1]
    per_row = gen.row_bytes(model, longest, N_TOKENS)
    cfg = model.config
    assert per_row >= cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (longest + N_TOKENS) * 4, \
        "at least the fp32 KV cache of a full-length row"
    kw = dict(max_new_tokens=N_TOKENS, batch_size=len(PROMPTS), progress=False, drop_finished=False)
    with batch_sizes(first_block(model)) as seen:
        ref, ref_lg = generate(model, fmt, PROMPTS, first_logits=True, **kw)
    assert max(seen) == len(PROMPTS)
    assert gen.generation_budget(model) == gen.GEN_MEMORY_MIN, "a tiny model gets the floor"
    monkeypatch.setattr(gen, "GEN_MEMORY_MIN", 3 * per_row + per_row // 2)
    with batch_sizes(first_block(model)) as seen:
        got, lg = generate(model, fmt, PROMPTS, first_logits=True, **kw)
    assert max(seen) == 3, "no batch above the budget's three rows (10 prompts: 4 batches of 3, 3, 3, 1 → 3)"
    assert got == ref
    torch.testing.assert_close(lg, ref_lg, rtol=1e-4, atol=1e-4)
    fp32_size = 4 * sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(gen, "GEN_MEMORY_MIN", 0)
    assert gen.generation_budget(model) == gen.GEN_MEMORY_SHARE * fp32_size, "else a share of the fp32 size"
    assert gen.generation_budget(model.to(torch.bfloat16)) == gen.GEN_MEMORY_SHARE * fp32_size, "in any dtype"


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_a_decided_row_ends_there_and_the_others_run_on_unchanged(tiny_tokenizer, arch, shared_prefix):
    """``decided``: each row ends at its first token whose text passes the test (here: two spaces written, which
    stays true as text grows), the same cut whether the loop stopped it or ``model.generate`` ran to the end; the
    rows that never pass keep every token they had without the test, and cut rows leave the batch."""
    model = make_tiny(arch, len(tiny_tokenizer))
    fmt = _fmt(tiny_tokenizer)
    _with_eos(model, fmt, PROMPTS)
    tok = tiny_tokenizer

    def decided(text: str) -> bool:
        return text.count(" ") >= 2

    kw = dict(max_new_tokens=N_TOKENS, batch_size=len(PROMPTS), progress=False, return_ids=True,
              shared_prefix=shared_prefix)
    full = generate(model, fmt, PROMPTS, **kw)
    with batch_sizes(first_block(model)) as seen:
        got = generate(model, fmt, PROMPTS, decided=decided, **kw)
    ref = generate(model, fmt, PROMPTS, decided=decided, drop_finished=False, **kw)
    assert got == ref
    cut_rows = 0
    for (text, ids), (_t, all_ids) in zip(got, full, strict=True):
        first = next((k for k in range(1, len(all_ids) + 1) if decided(tok.decode(all_ids[:k], skip_special_tokens=True))),
                     None)
        assert ids == all_ids[:first] if first else ids == all_ids
        assert text == tok.decode(ids, skip_special_tokens=True)
        cut_rows += first is not None and first < len(all_ids)
    assert 0 < cut_rows < len(PROMPTS), "the test must cut some rows and not others"
    with batch_sizes(first_block(model)) as seen_full:
        generate(model, fmt, PROMPTS, **kw)
    assert sum(seen) < sum(seen_full), "decided rows must leave the batch"
