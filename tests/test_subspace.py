"""Subspace (refusal cone) ablation: an orthonormal basis B [k, d] whose whole span is projected out,
``x ← x − Bᵀ(B x)``, as hooks and as weight edits (in memory, streamed, GGUF), from a ``Subspace`` file.

Pre-norm decoders: the hooks and the in-memory weight edit give the same logits (fp32, k = 2 and 3, every
architecture of tests/test_architectures.py; measured: at most 3.6e-6 of the largest logit). Post-norm decoders
(Gemma 2/3, OLMo 2, a LayerNorm block): the writers are made orthogonal to the span of ``gain ⊙ b_i``, which
removes span(B) from the stream exactly for any k; measured max |B x| / |x| over every block input and the final
norm's input, k = 2 and 3, fp32: 5.3e-8 to 8.2e-8 (bound 1e-5), against 0.32 to 0.52 before the edit.
"""

from __future__ import annotations

import copy
import json
import warnings

import gguf
import numpy as np
import pytest
import torch
from conftest import EXACT_ARCHS, POSTNORM_ARCHS, make_tiny, uneven_post_norms
from test_postnorm import GGUF_ARCH, _gguf_from, _layernorm_decoder, _load_edited
from torch import nn
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core.architecture import inspect_model
from refdir.core.directions import (
    Direction,
    Subspace,
    ablation_operand,
    load_ablation,
    load_edit,
    orthonormal_basis,
)
from refdir.core.gguf_edit import orthogonalize_gguf
from refdir.core.interventions import ablate, project_out
from refdir.core.orthogonalize import orthogonalize_, stream_orthogonalize
from refdir.core.postnorm import gain_basis, gain_direction
from refdir.errors import RefdirError
from refdir.evaluate.evaluation import EvalConfig, arm_context, load_directions, parse_arm, run_eval

VOCAB = 128
D = 64
TOL = 1e-5


def _basis(k: int, seed: int = 11) -> torch.Tensor:
    """A random, not orthonormal, full-rank [k, D] matrix (the edits orthonormalize it themselves)."""
    return torch.randn(k, D, generator=torch.Generator().manual_seed(seed))


def _inputs(batch: int = 2, seq: int = 10):
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # one left-padded row
    return ids, mask


def _logits(model: nn.Module) -> torch.Tensor:
    ids, mask = _inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return getattr(out, "logits", out)  # the hand-built LayerNorm decoder returns a tensor


def span_share(model: nn.Module, basis: torch.Tensor) -> float:
    """max |B x| / |x| over every block input and the final norm's input (B orthonormalized), fp64."""
    arch = inspect_model(model, trace=False)
    seen: list[torch.Tensor] = []
    called: set[int] = set()

    def grab(m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().double())
        called.add(id(m))

    mods = [bp.block for bp in arch.blocks] + ([arch.final_norm] if arch.final_norm is not None else [])
    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
    try:
        _logits(model)
    finally:
        for h in handles:
            h.remove()
    assert called == {id(m) for m in mods}  # nanochat's final norm also norms the embedding: seen twice
    b = orthonormal_basis(basis, torch.float64)
    return max(float(((x @ b.T).norm(dim=-1) / x.norm(dim=-1)).max()) for x in seen)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= 1e-4 * max(1.0, float(b.abs().max()) / 10)


# ------------------------------------------------------------------------------------------ the basis


def test_orthonormal_basis_keeps_the_span_and_one_row_is_the_unit_vector():
    b = _basis(3)
    q = orthonormal_basis(b, torch.float64)
    assert torch.allclose(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    # same span: every row of b is its own projection onto span(q), and the projectors agree
    bb = b.double()
    assert torch.allclose(bb @ q.T @ q, bb, atol=1e-10)
    assert (q[0] @ bb[0]) > 0 and torch.allclose(q[0], bb[0] / bb[0].norm(), atol=1e-12)
    # an already orthonormal basis is kept bit for bit; a one-row basis is the vector's unit vector, bit for bit
    q32 = orthonormal_basis(b)
    assert torch.equal(orthonormal_basis(q32), q32)
    r = torch.randn(D)
    assert torch.equal(ablation_operand(r[None]), ablation_operand(r))
    assert ablation_operand(r).shape == (D,) and ablation_operand(b).shape == (3, D)


@pytest.mark.parametrize("bad,match", [
    (torch.stack([torch.ones(D), 2 * torch.ones(D)]), "rank-deficient"),
    (torch.stack([torch.ones(D), torch.zeros(D)]), "rank-deficient"),
    (torch.stack([torch.ones(D), torch.ones(D) + 1e-9 * torch.arange(D)]), "rank-deficient"),
    (torch.zeros(2, D), "zero"),
    (torch.tensor([[1.0, float("nan")] * (D // 2), [0.0, 1.0] * (D // 2)]), "NaN or infinite"),
    (torch.tensor([[float("inf")] + [0.0] * (D - 1), [0.0, 1.0] + [0.0] * (D - 2)]), "NaN or infinite"),
    (torch.randn(5, 4), "at most 4"),
    (torch.randn(2, 3, D), "2-D"),
    (torch.zeros(0, D), "empty"),
])
def test_bad_bases_are_refused(bad, match):
    with pytest.raises(RefdirError, match=match):
        Subspace(bad, 1, -1)
    if bad.dim() == 2 and bad.shape[0] > 1:
        with pytest.raises(RefdirError, match=match):
            ablation_operand(bad)


def test_bad_bases_are_refused_by_every_edit(tmp_path):
    model = make_tiny("llama", VOCAB)
    parallel = torch.stack([torch.ones(D), -3 * torch.ones(D)])
    with pytest.raises(RefdirError, match="rank-deficient"):
        with ablate(model, parallel):
            pass
    assert all(not bp.block._forward_pre_hooks for bp in inspect_model(model).blocks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RefdirError, match="rank-deficient"):
        orthogonalize_(model, parallel)
    with pytest.raises(RefdirError, match="size 65"):
        orthogonalize_(model, torch.randn(2, D + 1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing edited
    src = tmp_path / "src"
    model.save_pretrained(src)
    _gguf_from(model, "llama", tmp_path / "src.gguf")
    for bad, match in ((parallel, "rank-deficient"), (torch.randn(2, D + 1), "size 65")):
        with pytest.raises(RefdirError, match=match):
            stream_orthogonalize(src, bad, tmp_path / "out", progress=False)
        with pytest.raises(RefdirError, match=match):
            orthogonalize_gguf(tmp_path / "src.gguf", bad, tmp_path / "out.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "src.gguf"]


# ------------------------------------------------------------------------------------------ files


def test_subspace_file_round_trip_and_load_ablation(tmp_path):
    s = Subspace(_basis(3), layer=2, position=-1, model_id="tiny", meta={"source": "cone", "seed": 11})
    assert s.k == 3 and s.d_model == D and s.basis.dtype == torch.float32
    assert torch.allclose(s.basis @ s.basis.T, torch.eye(3), atol=1e-6)
    path = s.save(tmp_path / "cone")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert (meta["kind"], meta["k"], meta["d_model"], meta["format"]) == ("subspace", 3, D, "refdir.subspace")
    back = Subspace.load(tmp_path / "cone")
    assert torch.equal(back.basis, s.basis)
    assert (back.layer, back.position, back.model_id, back.meta) == (2, -1, "tiny", {"source": "cone", "seed": 11})
    assert isinstance(load_edit(path), Subspace) and torch.equal(load_ablation(path), s.basis)
    # a direction file loads exactly as before, and load_ablation gives its unit vector
    d = Direction(torch.randn(D), 1, -2)
    dp = d.save(tmp_path / "dir")
    assert torch.equal(Direction.load(dp).vector, d.vector) and isinstance(load_edit(dp), Direction)
    assert torch.equal(load_ablation(dp), d.unit())
    with pytest.raises(RefdirError, match="is a subspace"):
        Direction.load(path)
    with pytest.raises(RefdirError, match="not a refdir subspace"):
        Subspace.load(dp)
    bad = json.loads(dp.with_suffix(".json").read_text()) | {"format": "refdir.candidates"}
    dp.with_suffix(".json").write_text(json.dumps(bad))
    with pytest.raises(RefdirError, match="neither a refdir direction nor a refdir subspace"):
        load_ablation(dp)
    meta["k"] = 2  # the metadata must agree with the tensor
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(RefdirError, match=r"\[k = 2, d_model\]"):
        Subspace.load(path)


# ------------------------------------------------------------------------------------------ hooks ≡ weights


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("arch_name", sorted(EXACT_ARCHS) + sorted(POSTNORM_ARCHS))
def test_subspace_hooks_equal_weights(arch_name, k):
    # post-norm models with gains as uneven as Gemma 3's: the hooks act under the norms, as the weights do
    model = make_tiny(arch_name, VOCAB)
    if arch_name in POSTNORM_ARCHS:
        uneven_post_norms(model)
    b = _basis(k)
    base = _logits(model)
    with ablate(model, b):
        hooked = _logits(model)
    with ablate(model, b[0]):
        first_only = _logits(model)
    assert (hooked - base).abs().max() > 1e-3 and (hooked - first_only).abs().max() > 1e-3, \
        "ablating the span must differ from the base model and from ablating one of its directions"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = orthogonalize_(model, b)
    assert summary["k"] == k and summary["exact"]
    assert _close(_logits(model), hooked), f"{arch_name}: ablate(B) != orthogonalize_(B)"
    assert span_share(model, b) <= TOL


@pytest.mark.parametrize("arch_name", ["llama", "qwen2_moe", "gemma2"])
def test_one_row_basis_is_the_vector_case_bit_for_bit(arch_name):
    model = make_tiny(arch_name, VOCAB)
    r = torch.randn(D, generator=torch.Generator().manual_seed(4))
    with ablate(model, r):
        want = _logits(model)
    with ablate(model, r[None]):
        assert torch.equal(_logits(model), want)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    orthogonalize_(a, r)
    orthogonalize_(b, r[None])
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    # a stored one-row Subspace (QR-normalized, float32) is the same edit up to rounding
    with ablate(model, Subspace(r[None], 0, -1).basis):
        assert _close(_logits(model), want)


@pytest.mark.parametrize("arch_name", sorted(EXACT_ARCHS) + sorted(POSTNORM_ARCHS))
def test_subspace_hooks_remove_the_span_during_cached_decoding(arch_name):
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    b = orthonormal_basis(_basis(3))
    ids, mask = _inputs(seq=8)
    seen: list[torch.Tensor] = []

    def grab(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    with torch.no_grad(), ablate(model, b):
        handles = [bp.block.register_forward_pre_hook(grab, with_kwargs=True) for bp in arch.blocks]
        try:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=True,
                           pad_token_id=0)
        finally:
            for h in handles:
                h.remove()
    assert any(x.shape[1] == 1 for x in seen)
    for x in seen:
        assert torch.all((x @ b.T).norm(dim=-1) <= 1e-5 * x.norm(dim=-1) + 1e-6)
    assert all(not bp.block._forward_pre_hooks for bp in arch.blocks)


def test_project_out_is_the_orthogonal_projector():
    b = orthonormal_basis(_basis(3))
    x = torch.randn(4, 5, D)
    y = project_out(x, b)
    assert torch.allclose(y @ b.T, torch.zeros(4, 5, 3), atol=1e-5)
    assert torch.allclose(project_out(y, b), y, atol=1e-6)  # idempotent
    assert torch.allclose(x - y, (x @ b.T) @ b, atol=1e-5)  # what is removed lies in span(B)


# ------------------------------------------------------------------------------------------ post-norms


def test_gain_basis_spans_gain_times_basis_and_drops_what_the_gain_zeroes():
    b = orthonormal_basis(_basis(3), torch.float64)
    g = torch.linspace(0.2, 2.0, D, dtype=torch.float64)
    u = gain_basis(b, g, centred=False)
    assert u.shape == (3, D) and torch.allclose(u @ u.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    m = b * g  # rows gain ⊙ b_i lie in span(U), so y ⊥ U ⇒ B (g ⊙ y) = 0
    assert torch.allclose(m @ u.T @ u, m, atol=1e-12)
    uc = gain_basis(b, g, centred=True)
    mc = m - m.mean(dim=1, keepdim=True)
    assert torch.allclose(mc @ uc.T @ uc, mc, atol=1e-12)
    assert float(uc.sum(dim=1).abs().max()) <= 1e-12  # centred: a constant shift of y is invisible to the norm
    # a gain that zeroes coordinate 0 cannot write along e_0: only e_1's image is left
    e = torch.eye(D, dtype=torch.float64)[:2]
    g0 = torch.ones(D, dtype=torch.float64)
    g0[0] = 0
    u0 = gain_basis(e, g0, centred=False)
    assert u0.shape == (1, D) and torch.allclose(u0.abs(), e[1])
    assert gain_basis(e, torch.zeros(D, dtype=torch.float64), centred=False) is None
    r = b[0]
    assert torch.equal(gain_basis(r, g, False), gain_direction(r, g, False))  # 1-D: the vector case


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("arch_name", sorted(POSTNORM_ARCHS))
def test_postnorm_weight_edit_removes_the_span_exactly(arch_name, k, tmp_path):
    model = make_tiny(arch_name, VOCAB)
    b = _basis(k)
    assert span_share(model, b) > 0.1
    naive = copy.deepcopy(model)  # writers orthogonal to span(B) itself: the post-norm's gain brings B back
    q = orthonormal_basis(b)
    for bp in inspect_model(naive).blocks:
        for w in bp.writers:
            p = getattr(w.module, w.param)
            p.data -= q.T @ (q @ p.data)  # output axis 0 for a [d, n] matrix and for a bias
    assert span_share(naive, b) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = orthogonalize_(model, b)
    assert summary["post_norms"] == "exact" and summary["k"] == k and summary["exact"]
    assert span_share(model, b) <= TOL, arch_name


def test_layernorm_post_norms_with_a_subspace_centre_the_gain_and_edit_the_bias(tmp_path):
    model = _layernorm_decoder()
    b = _basis(3)
    assert span_share(model, b) > 0.1
    edited = copy.deepcopy(model)
    summary = orthogonalize_(edited, b)
    assert "model.layers.0.post_attention_layernorm.bias" in summary["edited"]
    assert span_share(edited, b) <= TOL
    _gguf_from(model, "gemma2", tmp_path / "ln.gguf", centred=True)
    summary = orthogonalize_gguf(tmp_path / "ln.gguf", b, tmp_path / "ln-out.gguf", progress=False)
    assert "blk.0.post_ffw_norm.bias" in summary["edited"] and summary["k"] == 3
    assert span_share(_load_edited(model, tmp_path / "ln-out.gguf"), b) <= TOL


# ------------------------------------------------------------------------------------------ streamed, GGUF


@pytest.mark.parametrize("arch_name,sharded", [("llama", True), ("qwen2_moe", True), ("starcoder2", False),
                                               ("gemma2", True), ("olmo2", False)])
def test_streamed_subspace_edit_equals_the_in_memory_edit(arch_name, sharded, tmp_path):
    model = make_tiny(arch_name, VOCAB)
    b = _basis(2)
    src = tmp_path / "src"
    model.save_pretrained(src, **({"max_shard_size": "100KB"} if sharded else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = stream_orthogonalize(src, b, tmp_path / "out", progress=False)
    assert summary["k"] == 2
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    in_memory = copy.deepcopy(model)
    orthogonalize_(in_memory, b)
    got, want = dict(streamed.named_parameters()), dict(in_memory.named_parameters())
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6), name
    assert span_share(streamed, b) <= TOL


@pytest.mark.parametrize("arch_name", ["llama", *sorted(POSTNORM_ARCHS)])
def test_f32_gguf_subspace_edit_equals_the_in_memory_edit(arch_name, tmp_path):
    model = make_tiny(arch_name, VOCAB)
    b = _basis(3)
    _gguf_from(model, GGUF_ARCH.get(arch_name, arch_name), tmp_path / "src.gguf")
    summary = orthogonalize_gguf(tmp_path / "src.gguf", b, tmp_path / "out.gguf", progress=False)
    assert summary["k"] == 3 and summary["changed_types"] == {}
    assert summary["post_norms"] == ("exact" if arch_name in POSTNORM_ARCHS else "none")
    edited = _load_edited(model, tmp_path / "out.gguf")
    in_memory = copy.deepcopy(model)
    orthogonalize_(in_memory, b)
    assert torch.allclose(edited.get_input_embeddings().weight, in_memory.get_input_embeddings().weight, atol=1e-6)
    for bp_a, bp_b in zip(inspect_model(edited).blocks, inspect_model(in_memory).blocks, strict=True):
        for wa, wb in zip(bp_a.writers, bp_b.writers, strict=True):
            assert torch.allclose(getattr(wa.module, wa.param), getattr(wb.module, wb.param), atol=1e-6), wa.name
    assert span_share(edited, b) <= TOL
    # the unembedding is kept: a tied model's GGUF gets the unedited embedding as output.weight
    out = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    if "output.weight" in out:
        assert np.array_equal(np.asarray(out["output.weight"].data),
                              model.get_input_embeddings().weight.detach().numpy())


# ------------------------------------------------------------------------------------------ CLI and eval


def test_cli_orthogonalize_and_eval_ablate_take_a_subspace_file(tmp_path, tiny_tokenizer):
    model = make_tiny("llama", len(tiny_tokenizer))
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(src)
    s = Subspace(_basis(2), 1, -1, "tiny")
    s.save(tmp_path / "cone")
    runner = CliRunner()
    res = runner.invoke(app, ["orthogonalize", str(src), str(tmp_path / "out"), "--direction", str(tmp_path / "cone")])
    assert res.exit_code == 0, res.output
    edit = json.loads((tmp_path / "out" / "refdir_edit.json").read_text())
    assert edit["mode"] == "streaming" and edit["k"] == 2
    res = runner.invoke(app, ["orthogonalize", str(src), str(tmp_path / "mem"), "--direction",
                              str(tmp_path / "cone"), "--in-memory", "--dtype", "fp32"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "mem" / "refdir_edit.json").read_text())["k"] == 2
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mem", dtype=torch.float32).eval()
    with ablate(model, s.basis):
        want = _logits(model)
    assert _close(_logits(streamed), want) and _close(_logits(loaded), want)
    # eval: an ablate arm takes the subspace file (the span is ablated); an add arm refuses it, before any work
    arms = [parse_arm(f"ablate:{tmp_path / 'cone'}")]
    loaded_dirs = load_directions(arms, D)
    assert isinstance(loaded_dirs[str(tmp_path / "cone")], Subspace)
    with arm_context(model, arms[0], loaded_dirs[str(tmp_path / "cone")]):
        assert torch.equal(_logits(model), want)
    with pytest.raises(RefdirError, match="is a subspace"):
        load_directions([parse_arm(f"add:{tmp_path / 'cone'}:coeff=2")], D)
    cfg = EvalConfig(model=str(src), arms=[f"ablate:{tmp_path / 'cone'}", f"ckpt:{tmp_path / 'out'}:name=ortho"],
                     n_harmful=2, n_harmless=2, n_text=2, n_pairs=2, text_tokens=24, max_new_tokens=4,
                     ondist_tokens=4, kl_tokens=3, dtype="fp32", batch_size=4)
    arms_out = {a["name"]: a for a in run_eval(cfg, tmp_path / "eval")["arms"]}
    for k in ("text", "pairs", "ondist"):
        assert abs(arms_out["ablation"]["ce"][k] - arms_out["ortho"]["ce"][k]) < 1e-4
    assert arms_out["ablation"]["kl"]["first"] > 1e-4
    with pytest.raises(RefdirError, match="is a subspace"):
        run_eval(EvalConfig(model=str(src), arms=[f"add:{tmp_path / 'cone'}"]), tmp_path / "eval2")
    assert not (tmp_path / "eval2").exists()
