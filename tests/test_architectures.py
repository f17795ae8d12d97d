"""Equivalence of ablation hooks and weight orthogonalization on tiny random decoders."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import EXACT_ARCHS, POSTNORM_ARCHS, make_tiny, uneven_post_norms
from transformers import AutoModelForCausalLM

from refdir.core.architecture import inspect_model
from refdir.core.edits import Plan, hooked
from refdir.core.hooks import contiguous_unembedding, map_input, registered, row_major_strides
from refdir.core.interventions import ablate, add, intervene
from refdir.core.models import save_hf_checkpoint
from refdir.core.orthogonalize import orthogonalize_

VOCAB = 128


def _inputs(seed=1, batch=2, seq=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    return ids, mask


def _record_block_inputs(arch):
    seen = []

    def hook(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append(x.detach().clone())

    handles = [bp.block.register_forward_pre_hook(hook, with_kwargs=True) for bp in arch.blocks]
    return seen, handles


def _after_norm_ablation(model, arch, r):
    """What ``ablate`` computed on post-norm models before the thirty-first session: r̂ projected out of each
    component's *normed* output (and every block input), which no weight edit computes."""
    r_hat = r / r.norm()

    def fn(_m, _a, out):
        x = out[0] if isinstance(out, tuple) else out
        x = x - (x @ r_hat).unsqueeze(-1) * r_hat
        return (x, *out[1:]) if isinstance(out, tuple) else x

    hs = [m.register_forward_hook(fn) for bp in arch.blocks for c in ("attn", "mlp") for m in bp.outs(c)]
    hs += [bp.block.register_forward_pre_hook(map_input(lambda x: x - (x @ r_hat).unsqueeze(-1) * r_hat),
                                              with_kwargs=True) for bp in arch.blocks]
    return registered(hs)


@pytest.mark.parametrize(("arch_name", "uneven"), [(a, False) for a in sorted(EXACT_ARCHS) + sorted(POSTNORM_ARCHS)]
                         + [(a, True) for a in sorted(POSTNORM_ARCHS)])
def test_ablation_equals_orthogonalized_checkpoint(arch_name, uneven, tmp_path):
    # on post-norm models too: ablate acts where the writers write (before the norm, along gain ⊙ r̂), as the
    # weight edit does, so selection and evaluation score what the checkpoint computes. Post-norm gains as uneven
    # as Gemma 3's make the old after-norm projection a different model (checked below, so this test can fail)
    model = make_tiny(arch_name, VOCAB)
    if uneven:
        uneven_post_norms(model)
    arch = inspect_model(model)
    r = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(7))
    ids, mask = _inputs()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with ablate(model, r):
            abl = model(input_ids=ids, attention_mask=mask).logits
    assert (abl - base).abs().max() > 1e-3, "ablation must change the output of a random model"
    assert arch.weight_edit_exact
    scale = max(1.0, float(base.abs().max()) / 10)
    if uneven:
        with torch.no_grad(), _after_norm_ablation(model, arch, r):
            after = model(input_ids=ids, attention_mask=mask).logits
        assert (after - abl).abs().max() > 1e-2 * scale
    with torch.no_grad(), hooked(model, Plan.full(r, arch.n_layers)):  # the search's full edit: the same
        full = model(input_ids=ids, attention_mask=mask).logits
    assert (abl - full).abs().max() <= 1e-4 * scale, f"{arch_name}: ablate != the search's full edit"
    orthogonalize_(model, r)
    save_hf_checkpoint(model, None, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ortho = reloaded(input_ids=ids, attention_mask=mask).logits
    assert (abl - ortho).abs().max() <= 1e-4 * scale, f"{arch_name}: ablate != orthogonalized"


@pytest.mark.parametrize("arch_name", sorted(EXACT_ARCHS) + sorted(POSTNORM_ARCHS))
def test_ablation_removes_direction_at_every_block_input_during_cached_decoding(arch_name):
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    r = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(3))
    r_hat = r / r.norm()
    ids, mask = _inputs(batch=2, seq=8)
    with torch.no_grad(), ablate(model, r):
        # registered after the ablation hooks, so it sees what each block actually receives
        seen, handles = _record_block_inputs(arch)
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 use_cache=True, pad_token_id=0)
        finally:
            for h in handles:
                h.remove()
    assert out.shape[1] == ids.shape[1] + 4
    # prefill + cached decoding steps, each through every block
    assert len(seen) % arch.n_layers == 0 and len(seen) >= arch.n_layers * 4
    assert any(x.shape[1] == 1 for x in seen), "decoding steps must run with a KV cache"
    for x in seen:
        proj = (x @ r_hat).abs()
        assert torch.all(proj <= 1e-5 * x.norm(dim=-1) + 1e-6)
    # and the hooks are gone afterwards
    assert all(not bp.block._forward_pre_hooks for bp in arch.blocks)


@pytest.mark.parametrize("arch_name", sorted(POSTNORM_ARCHS))
def test_postnorm_architectures_are_detected_and_the_weight_edit_is_exact_removal(arch_name):
    # the weight edit removes r from the stream exactly (tests/test_postnorm.py) and equals the hooks, which act
    # under the post-norms as it does (test_ablation_equals_orthogonalized_checkpoint), so it does not warn
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    assert arch.has_post_norms and arch.weight_edit_exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = orthogonalize_(model, torch.randn(arch.d_model))
    assert summary["post_norms"] == "exact"


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])
def test_ablation_projects_block_zero_when_given_inputs_embeds(arch_name):
    # the embeddings' output is projected once, where it is made; a caller passing inputs_embeds (nanogcg, the
    # Python API) skips that hook, so block 0 still projects its input: the same logits as from token ids
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    r = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(5))
    ids, mask = _inputs()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)  # unprojected: made outside the hooks
        with ablate(model, r):
            want = model(input_ids=ids, attention_mask=mask).logits
            seen, handles = _record_block_inputs(arch)
            try:
                got = model(inputs_embeds=embeds, attention_mask=mask).logits
            finally:
                for h in handles:
                    h.remove()
    r_hat = r / r.norm()
    assert float((seen[0] @ r_hat).abs().max()) <= 1e-5 * float(seen[0].norm(dim=-1).max())
    assert float((got - want).abs().max()) <= 1e-4 * max(1.0, float(want.abs().max()) / 10)


def test_tied_lm_head_is_untied_and_unembedding_unchanged():
    model = make_tiny("gemma", VOCAB)
    arch = inspect_model(model)
    assert arch.tied
    head_before = model.get_output_embeddings().weight.detach().clone()
    r = torch.randn(arch.d_model)
    summary = orthogonalize_(model, r)
    assert summary["untied_lm_head"]
    assert torch.equal(model.get_output_embeddings().weight, head_before)
    emb = model.get_input_embeddings().weight
    assert (emb.double() @ (r / r.norm()).double()).abs().max() < 1e-5


def test_hooks_removed_even_on_error():
    model = make_tiny("llama", VOCAB)
    arch = inspect_model(model)
    with pytest.raises(RuntimeError):
        with ablate(model, torch.randn(arch.d_model)):
            raise RuntimeError("boom")
    for bp in arch.blocks:
        assert not bp.block._forward_pre_hooks
        assert not bp.attn._forward_hooks and not bp.mlp._forward_hooks


@pytest.mark.parametrize("arch_name", sorted(EXACT_ARCHS) + sorted(POSTNORM_ARCHS))
def test_contiguous_unembedding_gives_the_same_logits_from_a_row_major_input(arch_name):
    """Several kept positions a row, or one (where the view may count as contiguous but its batch stride is not
    row-major, so a frozen model's matmul would not fold it): the unembedding sees a view with other strides
    without the hook, row-major strides with it, and the logits are the same; the hook is gone on exit, also on
    error."""
    model = make_tiny(arch_name, VOCAB)
    ids, mask = _inputs()
    head = model.get_output_embeddings()
    seen = []
    # a forward hook runs after the pre-hooks: it sees what the unembedding computed from
    rec = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].stride() == row_major_strides(args[0].shape)))
    for keep, rows in ((5, len(ids)), (1, len(ids)), (1, 1)):  # one row, one position: is_contiguous() is True
        seen.clear()
        with torch.no_grad():
            ref = model(input_ids=ids[:rows], attention_mask=mask[:rows], logits_to_keep=keep).logits
            with contiguous_unembedding(model):
                got = model(input_ids=ids[:rows], attention_mask=mask[:rows], logits_to_keep=keep).logits
        assert seen == [False, True], (keep, rows)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    rec.remove()
    with pytest.raises(RuntimeError), contiguous_unembedding(model):
        raise RuntimeError("boom")
    assert not head._forward_pre_hooks


def test_add_shifts_block_input_and_combines_with_ablation():
    """``add`` puts coeff·v on its block's input; with the ablation beside it, the block receives the ablated
    input plus v (the ablation's hook runs first), and the blocks after it see v's part along r removed again."""
    model = make_tiny("qwen2", VOCAB)
    arch = inspect_model(model)
    v = torch.randn(arch.d_model)
    r = torch.randn(arch.d_model)
    r_hat = r / r.norm()
    ids, mask = _inputs()

    def block_inputs(*contexts):
        """What blocks 1 and 2 receive under ``contexts``: recorders registered after their hooks."""
        rec = {1: [], 2: []}
        with torch.no_grad(), intervene(*contexts):
            hs = [arch.blocks[i].block.register_forward_pre_hook(
                lambda m, a, k, i=i: rec[i].append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)
                for i in rec]
            try:
                logits = model(input_ids=ids, attention_mask=mask).logits
            finally:
                for h in hs:
                    h.remove()
        return rec[1][0], rec[2][0], logits

    base_in, _, base_logits = block_inputs()
    added_in, _, _ = block_inputs(add(model, v, layer=1, coeff=2.0))
    assert torch.allclose(added_in, base_in + 2.0 * v, atol=1e-5)
    abl_in, _, _ = block_inputs(ablate(model, r))
    both_in, both_next, both = block_inputs(ablate(model, r), add(model, v, 1))
    assert torch.allclose(abl_in @ r_hat, torch.zeros(()), atol=1e-4)
    assert torch.allclose(both_in, abl_in + v, atol=1e-5)
    assert torch.allclose(both_next @ r_hat, torch.zeros(()), atol=1e-4)
    assert not torch.allclose(both, base_logits, atol=1e-3)
    for bp in arch.blocks:  # every hook removed on exit
        assert not bp.block._forward_pre_hooks


def test_unknown_module_tree_fails_with_the_tree_in_the_message():
    from refdir.errors import RefdirError

    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.config = type("C", (), {"hidden_size": 8, "num_hidden_layers": 2})()

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(RefdirError, match="module tree"):
        inspect_model(Weird())


# Decoders whose residual stream is not the sum of what the writers refdir finds write: a weight edit would leave
# the direction in the stream, so they are refused (loaded, and streamed from a config) instead of edited wrongly.
UNCOVERED = [
    ("minimax", "adds more to the residual stream"),  # scaled residuals
    ("doge", "adds more to the residual stream"),  # a learned per-channel residual scale
    ("bloom", "not a multiple of what its embeddings write"),  # a normed embedding; attention adds the residual
    ("jetmoe", "attn module of block 0 .* still writes"),  # attention experts held as bare tensors
    ("trocr", "adds more to the residual stream"),  # post-LN; its cross-attention is not called decoder-only
    ("gpt_neox_japanese", "block 2 .* adds more to the residual stream"),  # the last block's attention bias
    # post-LN; its attention returns a list, which the trace once failed on with a traceback
    ("openai-gpt", "adds more to the residual stream"),
    ("qwen4_exp_text", "residual stream into block 0 .* is 256 wide"),  # four parallel streams of width d
]


@pytest.mark.parametrize(("arch_name", "why"), UNCOVERED)
def test_a_stream_a_weight_edit_cannot_cover_is_refused(arch_name, why):
    from refdir.core.config_check import check_config
    from refdir.errors import RefdirError

    model = make_tiny(arch_name, VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RefdirError, match=f"cannot edit this architecture: .*{why}"):
        inspect_model(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the writer check must put the weights back"
    with pytest.raises(RefdirError, match="cannot edit this architecture"):
        check_config(model.config)  # the streamed path: a shrunk random model of the same class


def test_a_model_that_reads_the_padding_is_refused():
    """RecurrentGemma's recurrence reads left padding the attention mask hides (a padded row's logits differ from
    the row alone by 0.42 relative): every batched figure would be off, so it is refused; refdir's own models pass."""
    from refdir.errors import RefdirError

    with pytest.raises(RefdirError, match="cannot run this architecture .* in batches: a left-padded row's logits"):
        inspect_model(make_tiny("recurrent_gemma", VOCAB))
    inspect_model(make_tiny("llama", VOCAB))


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "qwen2_moe", "gemma2", "falcon_h1", "granitemoehybrid",
                                       "nanochat"])
def test_the_stream_checks_pass_and_leave_the_weights_alone(arch_name):
    """Supported decoders pass both checks (loaded and from the config), and the writer check's temporary edit of
    block 0 leaves every weight bit for bit as it was."""
    from refdir.core.config_check import check_config

    model = make_tiny(arch_name, VOCAB)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inspect_model(model)
    check_config(model.config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch_name", ["llama", "qwen2_moe"])
def test_split_device_map_hooks_are_device_correct(arch_name):
    """Blocks placed one by one by an accelerate device map (all on CPU here, but dispatched through accelerate's
    hooks, which wrap every block's forward) still ablate exactly as the undispatched model does."""
    import copy

    from accelerate import dispatch_model

    model = make_tiny(arch_name, VOCAB)
    ref_model = copy.deepcopy(model)
    arch = inspect_model(model)
    r = torch.randn(arch.d_model)
    ids, mask = _inputs()
    with torch.no_grad():
        base = ref_model(input_ids=ids, attention_mask=mask).logits
        with ablate(ref_model, r):
            ref = ref_model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ref, base, atol=1e-3)  # the ablation changes the logits, so the comparison can fail
    n_layers = model.config.num_hidden_layers
    device_map = {f"model.{n}": "cpu" for n, _ in model.model.named_children() if n != "layers"}
    device_map |= {f"model.layers.{i}": "cpu" for i in range(n_layers)} | {"lm_head": "cpu"}
    model2 = dispatch_model(model, device_map=device_map, force_hooks=True)
    assert all(hasattr(model2.model.layers[i], "_hf_hook") for i in range(n_layers))
    with warnings.catch_warnings(), torch.no_grad(), ablate(model2, r):
        warnings.simplefilter("ignore")
        got = model2(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ref, got, atol=1e-5)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_the_streamed_check_builds_narrow_and_sees_dense_and_moe_blocks(model_type, monkeypatch):
    """The streamed path's structural check of a config whose first blocks are dense and the rest MoE (transformers'
    default DeepSeek-V3 config: latent attention, 3 dense blocks of 61) runs on a narrow two-block copy that keeps one
    block of each layout; no full-width copy (a 24B-wide one took a minute and 9 GB) is built."""
    from transformers import AutoConfig

    import refdir.core.config_check as cc

    cut = cc._cut

    def narrow_only(config, narrow):
        assert narrow, "the check fell back to a full-width copy"
        return cut(config, narrow)

    monkeypatch.setattr(cc, "_cut", narrow_only)
    layouts = cc.check_config(AutoConfig.for_model(model_type))
    assert layouts is not None and len(layouts) == 2  # the dense block's layout and the MoE block's


@pytest.mark.parametrize("arch_name", ["gemma2", "nanochat"])
def test_a_model_is_traced_once_and_again_when_a_block_layout_changes(arch_name, monkeypatch):
    """Every hook context inspects the model; the traced forward that finds post-norms (and block 0's rescaled
    input) runs once per model and block layout, without hooks open, and later calls reuse what it found."""
    import copy

    import refdir.core.architecture as architecture

    traces = []
    trace = architecture.trace_block
    monkeypatch.setattr(architecture, "trace_block", lambda model, bp, emb: traces.append(bp.index) or trace(model, bp, emb))
    model = make_tiny(arch_name, VOCAB)
    handle = model.model.norm.register_forward_hook(lambda *a: None)  # a trace with a hook open is not kept
    inspect_model(model)
    handle.remove()
    assert traces == [0]
    first = inspect_model(model)
    with ablate(model, torch.randn(model.config.hidden_size)):
        again = inspect_model(model)
    assert traces == [0, 0]
    fresh = inspect_model(copy.deepcopy(model))  # another model object: traced itself
    assert traces == [0, 0, 0]
    for a, b, c in zip(first.blocks, again.blocks, fresh.blocks, strict=True):
        assert a.post == b.post == c.post and a.input_rescaled == b.input_rescaled == c.input_rescaled
    assert first.has_post_norms == (arch_name == "gemma2") and first.embedding_rescaled == (arch_name == "nanochat")
    block = model.model.layers[1]
    block.add_module("extra_norm", copy.deepcopy(block.input_layernorm))  # block 1's layout changes: traced again
    inspect_model(model)
    assert traces == [0, 0, 0, 1]
