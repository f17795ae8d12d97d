"""Exact removal of r on post-norm architectures (Gemma 2, Gemma 3, OLMo 2): every edited checkpoint, in memory,
streamed and GGUF, writes nothing along r at any block input.

Such a block writes ``n(y) = g ⊙ y / rms(y)``; the writers are made orthogonal to ``g ⊙ r`` (normalized), so
``n(y)·r = 0`` whatever ``rms(y)`` is. Measured: max |cos(x, r)| over every block input and the final norm's input,
for a batch of prompts (one row left-padded), fp32. Measured here: about 6e-8 in memory, streamed and from an F32
GGUF (bound 1e-5). GGUF up to quantization error: with F16 writers, every edited weight is rounded to fp16 after
the edit (relative error at most 2^-11), so r comes back by at most fp16's unit roundoff: bound 2^-11 ≈ 4.9e-4,
measured 6.5e-5 to 9.9e-5. Before the edit the same measure is 0.31 to 0.39.
"""

from __future__ import annotations

import copy
import json
import warnings
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from conftest import EXACT_ARCHS, POSTNORM_ARCHS, make_tiny, max_cos
from torch import nn
from transformers import AutoModelForCausalLM

from refdir.core.architecture import inspect_model, post_layouts
from refdir.core.directions import Candidates
from refdir.core.edits import Edit, Kernel, Plan, Second, apply_weights_, hooked, resolve
from refdir.core.gguf_edit import orthogonalize_gguf
from refdir.core.gguf_plan import export_gguf_plan
from refdir.core.models import save_hf_checkpoint
from refdir.core.orthogonalize import orthogonalize_, stream_orthogonalize
from refdir.core.postnorm import NormForm, norm_form
from refdir.core.projection import project_along

VOCAB = 128
TOL = 1e-5
TOL_F16 = 2.0**-11  # fp16's unit roundoff
GGUF_ARCH = {"gemma2": "gemma2", "gemma3_text": "gemma3", "olmo2": "olmo2", "gemma4_text": "gemma4", "afmoe": "afmoe"}
# llama.cpp's role names of the writing modules (by child name) and of the norms
GGUF_WRITER = {"self_attn": "attn_output", "mlp": "ffn_down", "experts": "ffn_down_exps", "per_layer_projection": "proj"}
GGUF_NORM = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "post_feedforward_layernorm_1": "post_ffw_norm_1", "post_feedforward_layernorm_2": "post_ffw_norm_2",
             "post_per_layer_input_norm": "post_norm", "pre_mlp_layernorm": "ffn_norm",
             "post_mlp_layernorm": "post_ffw_norm"}


def _direction(d: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(POSTNORM_ARCHS))
def postnorm_model(request):
    return request.param, make_tiny(request.param, VOCAB)


# ------------------------------------------------------------------------------------------ the probe


@pytest.mark.parametrize("arch_name", sorted(EXACT_ARCHS) + sorted(POSTNORM_ARCHS))
def test_post_norms_from_the_module_tree_alone_match_the_traced_forward(arch_name):
    model = make_tiny(arch_name, VOCAB)
    traced = inspect_model(model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    # from a traced copy's layouts (what streaming does): no weights, no forward pass, every chain
    copied = inspect_model(skeleton, trace=False, layouts=post_layouts(traced))
    assert [bp.post for bp in copied.blocks] == [bp.post for bp in traced.blocks]
    assert copied.tied == traced.tied  # on the meta device every data_ptr is 0: tied is identity there
    static = inspect_model(skeleton, trace=False)  # from the forward source alone: one post-norm per module at most
    if arch_name == "gemma4_text":  # chains of norms and normed extra branches: not claimed
        assert not static.post_norms_known
        return
    assert static.post_norms_known
    assert static.has_post_norms == (arch_name in POSTNORM_ARCHS)
    assert [bp.post for bp in static.blocks] == [bp.post for bp in traced.blocks]


def test_norm_form_reads_gain_offset_centring_and_bias():
    def attn_post(a):
        bp = inspect_model(make_tiny(a, VOCAB)).blocks[0]
        return bp.chain(bp.attn)[0]

    forms = {a: norm_form(attn_post(a)) for a in POSTNORM_ARCHS}
    assert forms == {"gemma2": NormForm(False, 1.0, False), "gemma3_text": NormForm(False, 1.0, False),
                     "olmo2": NormForm(False, 0.0, False), "gemma4_text": NormForm(False, 0.0, False),
                     "afmoe": NormForm(False, 0.0, False)}
    assert norm_form(nn.LayerNorm(16)) == NormForm(True, 0.0, True)
    assert norm_form(nn.LayerNorm(16, bias=False)) == NormForm(True, 0.0, False)
    with torch.device("meta"):
        assert norm_form(nn.LayerNorm(16)) == NormForm(True, 0.0, True)  # works without weights
    assert norm_form(nn.Linear(4, 4)) is None


# ------------------------------------------------------------------------------------------ in memory


def test_in_memory_edit_removes_r_at_every_block_input(postnorm_model, tmp_path):
    name, model = postnorm_model
    r = _direction(64)
    assert max_cos(model, r) > 0.1  # the unedited model writes along r
    naive = copy.deepcopy(model)  # what the edit used to do: writers orthogonal to r itself
    for bp in inspect_model(naive).blocks:
        for w in bp.writers:
            p = getattr(w.module, w.param)
            p.data.copy_(project_along(p.data, r / r.norm(), 0 if p.dim() == 1 else w.out_axis))
    assert max_cos(naive, r) > 1e-3, "a post-norm re-introduces r when the writers are orthogonal to r itself"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = orthogonalize_(model, r)
    assert summary["post_norms"] == "exact" and summary["exact"]  # exact removal, and what the hooks compute
    assert max_cos(model, r) <= TOL
    save_hf_checkpoint(model, None, tmp_path / "ckpt")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    assert max_cos(reloaded, r) <= TOL, name


# ------------------------------------------------------------------------------------------ streamed


@pytest.mark.parametrize("sharded", [True, False])
def test_streamed_edit_removes_r_and_equals_the_in_memory_edit(postnorm_model, tmp_path, sharded):
    name, model = postnorm_model
    r = _direction(64)
    src = tmp_path / "src"
    model.save_pretrained(src, **({"max_shard_size": "100KB"} if sharded else {}))
    assert (src / "model.safetensors.index.json").exists() == sharded
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = stream_orthogonalize(src, r, tmp_path / "out", progress=False)
    assert summary["post_norms"] == "exact"
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert max_cos(streamed, r) <= TOL, name
    # a tied head is written out unedited and actually loaded (a lone model.safetensors would hide the index)
    emb = model.get_input_embeddings().weight
    assert torch.equal(streamed.get_output_embeddings().weight, emb) == bool(summary["untied_lm_head"])
    in_memory = copy.deepcopy(model)
    orthogonalize_(in_memory, r)
    got, want = dict(streamed.named_parameters()), dict(in_memory.named_parameters())
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_streaming_an_untied_single_file_checkpoint_writes_no_extra_head(tmp_path):
    src = tmp_path / "src"
    make_tiny("llama", VOCAB).save_pretrained(src)
    summary = stream_orthogonalize(src, _direction(64), tmp_path / "out", progress=False)
    assert not summary["untied_lm_head"] and summary["post_norms"] == "none"
    assert not (tmp_path / "out" / "model-lm_head.safetensors").exists()


# ------------------------------------------------------------------------------------------ GGUF


def _writers(bp) -> list[tuple[str, torch.Tensor]]:
    """A block's writers under llama.cpp's names (``blk.N.attn_output.weight``, ``blk.N.ffn_down.bias`` ...)."""
    out = []
    for mod in (m for c in ("attn", "mlp") for m in bp.modules(c)):
        for wr in bp.writers_of(mod):
            t = getattr(wr.module, wr.param)
            role = ("ffn_down_shexp" if "shared_expert" in wr.name else "ffn_down_exps" if ".experts." in wr.name
                    else GGUF_WRITER[bp.child_name(mod)])  # a MoE block's shared and routed experts (AfMoE)
            out.append((f"blk.{bp.index}.{role}.{'bias' if t.dim() == 1 else 'weight'}", t))
    return out


def _gguf_from(model: nn.Module, arch: str, path, dtype=np.float32, centred: bool = False) -> None:
    """A GGUF with llama.cpp's role names for the tensors the edit reads or writes, from a tiny HF model: the
    embedding, writers, and norms, whose gains are stored as llama.cpp's converters store them (Gemma: 1 + w)."""
    a = inspect_model(model)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_float32(f"{arch}.attention.layer_norm_{'' if centred else 'rms_'}epsilon", 1e-6)

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().numpy().astype(dtype if t.dim() > 1 else np.float32))

    put("token_embd.weight", model.get_input_embeddings().weight)
    llama_name = GGUF_NORM
    for bp in a.blocks:
        for name, t in _writers(bp):
            put(name, t)
        for child, norm in bp.block.named_children():
            form = norm_form(norm) if child in llama_name else None
            if form is not None:
                put(f"blk.{bp.index}.{llama_name[child]}.weight", form.offset + norm.weight)
                if form.has_bias:
                    put(f"blk.{bp.index}.{llama_name[child]}.bias", norm.bias)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def _load_edited(model: nn.Module, path) -> nn.Module:
    """``model`` with the GGUF's edited tensors (embedding, writers, post-norm biases) put back in."""
    edited = copy.deepcopy(model)
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}
    a = inspect_model(edited)
    with torch.no_grad():
        edited.get_input_embeddings().weight.copy_(torch.from_numpy(tensors["token_embd.weight"].copy()))
        for bp in a.blocks:
            for name, t in _writers(bp):
                t.copy_(torch.from_numpy(tensors[name].copy()))
            for child, role in GGUF_NORM.items():
                norm = getattr(bp.block, child, None)
                if norm is not None and getattr(norm, "bias", None) is not None:
                    norm.bias.copy_(torch.from_numpy(tensors[f"blk.{bp.index}.{role}.bias"].copy()))
    return edited


@pytest.mark.parametrize("dtype,tol", [(np.float32, TOL), (np.float16, TOL_F16)])
def test_gguf_edit_removes_r_up_to_the_storage_type(postnorm_model, tmp_path, dtype, tol):
    name, model = postnorm_model
    r = _direction(64)
    _gguf_from(model, GGUF_ARCH[name], tmp_path / "src.gguf", dtype)
    summary = orthogonalize_gguf(tmp_path / "src.gguf", r, tmp_path / "out.gguf", progress=False)
    assert summary["post_norms"] == "exact" and summary["changed_types"] == {}
    assert max_cos(_load_edited(model, tmp_path / "out.gguf"), r) <= tol, name
    if dtype is np.float32:
        in_memory = copy.deepcopy(model)
        orthogonalize_(in_memory, r)
        edited = _load_edited(model, tmp_path / "out.gguf")
        for bp_a, bp_b in zip(inspect_model(edited).blocks, inspect_model(in_memory).blocks, strict=True):
            for wa, wb in zip(bp_a.writers, bp_b.writers, strict=True):
                assert torch.allclose(getattr(wa.module, wa.param), getattr(wb.module, wb.param), atol=1e-6)


def test_gguf_post_attention_norm_feeding_the_mlp_is_not_a_post_norm(tmp_path):
    # gpt-oss and Qwen3-Next GGUFs name the MLP's input norm `post_attention_norm`: with no `ffn_norm` and no
    # `post_ffw_norm` in the block, the attention output is written to the stream directly and edited against r
    model = make_tiny("llama", VOCAB)
    path = tmp_path / "src.gguf"
    w = gguf.GGUFWriter(str(path), arch="gpt-oss")
    w.add_tensor("token_embd.weight", model.get_input_embeddings().weight.detach().numpy())
    for bp in inspect_model(model).blocks:
        w.add_tensor(f"blk.{bp.index}.attn_norm.weight", np.ones(64, np.float32))
        w.add_tensor(f"blk.{bp.index}.attn_output.weight", bp.writers[0].module.weight.detach().numpy())
        w.add_tensor(f"blk.{bp.index}.post_attention_norm.weight", np.linspace(0.5, 2, 64, dtype=np.float32))
        w.add_tensor(f"blk.{bp.index}.ffn_down.weight", bp.writers[1].module.weight.detach().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    r = _direction(64)
    summary = orthogonalize_gguf(path, r, tmp_path / "out.gguf", progress=False)
    assert summary["post_norms"] == "none"
    rh = (r / r.norm()).numpy()
    for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors:
        if t.name.endswith(("attn_output.weight", "ffn_down.weight")):
            assert np.abs(rh @ np.asarray(t.data)).max() < 1e-5, t.name


# ------------------------------------------------------------------------------------------ LayerNorm post-norms


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, hidden_states):
        return self.o_proj(torch.tanh(self.q_proj(hidden_states)))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


class _Block(nn.Module):
    """A block with LayerNorm post-norms (centring, with a bias) after attention and MLP."""

    def __init__(self, d):
        super().__init__()
        self.self_attn, self.mlp = _Attn(d), _MLP(d)
        self.post_attention_layernorm, self.post_feedforward_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, hidden_states):
        attn_out = self.self_attn(hidden_states)
        attn_out = self.post_attention_layernorm(attn_out)
        hidden_states = hidden_states + attn_out
        mlp_out = self.mlp(hidden_states)
        return hidden_states + self.post_feedforward_layernorm(mlp_out)


class _Inner(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)


class _LayerNormDecoder(nn.Module):
    def __init__(self, d=64, n=3):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=d, num_hidden_layers=n)
        self.model = _Inner(d, n)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids, attention_mask=None, **_):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.model.norm(h)


def _layernorm_decoder() -> _LayerNormDecoder:
    torch.manual_seed(0)
    m = _LayerNormDecoder().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.2)
    return m


def test_layernorm_post_norms_centre_the_gain_and_edit_the_bias(tmp_path):
    model = _layernorm_decoder()
    arch = inspect_model(model)
    assert [norm_form(bp.chain(bp.attn)[0]) for bp in arch.blocks] == [NormForm(True, 0.0, True)] * 3
    r = _direction(64)
    assert max_cos(model, r) > 0.1
    edited = copy.deepcopy(model)
    summary = orthogonalize_(edited, r)
    assert summary["post_norms"] == "exact"
    assert "model.layers.0.post_attention_layernorm.bias" in summary["edited"]
    assert max_cos(edited, r) <= TOL
    # GGUF: a LayerNorm's epsilon key says centred; the bias tensors are edited too
    _gguf_from(model, "gemma2", tmp_path / "ln.gguf", centred=True)
    summary = orthogonalize_gguf(tmp_path / "ln.gguf", r, tmp_path / "ln-out.gguf", progress=False)
    assert "blk.0.post_ffw_norm.bias" in summary["edited"]
    assert max_cos(_load_edited(model, tmp_path / "ln-out.gguf"), r) <= TOL


def test_edit_summary_is_recorded(tmp_path):
    model = make_tiny("olmo2", VOCAB)
    src = tmp_path / "src"
    model.save_pretrained(src)
    stream_orthogonalize(src, _direction(64), tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "refdir_edit.json").read_text())["post_norms"] == "exact"


# ------------------------------------------------------------------------------ parameterised edits (refdir run)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))


def test_a_full_edit_removes_r_as_hooks_and_as_weights(postnorm_model):
    """The run's edits on post-norm models: at full strength every block input loses r, hooked and in the weights,
    and the two compute the same logits."""
    _, model = postnorm_model
    arch = inspect_model(model)
    r = _direction(64)
    plan = Plan.full(r, arch.n_layers)
    with hooked(model, plan):
        assert max_cos(model, r) <= TOL
        want = _logits(model, IDS)
    edited = copy.deepcopy(model)
    assert apply_weights_(edited, plan)["exact"]
    assert max_cos(edited, r) <= TOL and (want - _logits(edited, IDS)).abs().max() <= 1e-4


def test_a_kernel_edit_in_a_gguf_equals_it_in_memory(postnorm_model, tmp_path):
    """``export_gguf_plan`` edits the writers under a post-norm along gain ⊙ d with the gains as llama.cpp stores
    them (Gemma: 1 + w), the same edit as ``apply_weights_`` (and so the hooks), second direction included."""
    name, model = postnorm_model
    arch = inspect_model(model)
    g = torch.Generator().manual_seed(7)
    cands = Candidates.from_means(torch.randn(2, arch.n_layers + 1, 64, generator=g, dtype=torch.float64),
                                  torch.randn(2, arch.n_layers + 1, 64, generator=g, dtype=torch.float64))
    cands = cands.with_optimized("second", _direction(64, seed=9))
    edit = Edit.from_dict({**Edit.full(-1, 1.0).to_dict(), "layer": 0.6})
    edit.attn.variant, edit.mlp.variant, edit.second = "norm", "projected", Second("second", 0.4)
    edit.embedding = False  # a tied embedding's edit unties the head, which _load_edited does not read back
    edit.attn.kernel, edit.mlp.kernel = Kernel(0.8, 1.0, 1.5, 0.3), Kernel(0.6, 0.5, 2.0, 0.1)
    plan = resolve(edit, cands)
    _gguf_from(model, GGUF_ARCH[name], tmp_path / "src.gguf")
    summary = export_gguf_plan(tmp_path / "src.gguf", plan, tmp_path / "out.gguf", progress=False)
    assert summary["post_norms"] == "exact"
    in_memory = copy.deepcopy(model)
    apply_weights_(in_memory, plan)
    with hooked(model, plan):
        want = _logits(model, IDS)
    got = _logits(_load_edited(model, tmp_path / "out.gguf"), IDS)
    assert (got - _logits(in_memory, IDS)).abs().max() <= 1e-4 and (got - want).abs().max() <= 1e-4


def _logits_plain(model):
    with torch.no_grad():
        return model(IDS)  # the hand-written decoder returns its final norm's output


def test_a_layernorm_post_norm_edit_is_the_same_as_hooks_and_weights():
    """A centring post-norm with a bias: hooks and weights edit the writers along the centred gain ⊙ r and leave
    the bias as it is, so they compute the same."""
    model = _layernorm_decoder()
    r = _direction(64)
    plan = Plan.full(r, inspect_model(model).n_layers)
    plan.strengths = {c: [0.7] * len(v) for c, v in plan.strengths.items()}
    with hooked(model, plan):
        want = _logits_plain(model)
    edited = copy.deepcopy(model)
    assert apply_weights_(edited, plan)["exact"]
    assert (want - _logits_plain(edited)).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
