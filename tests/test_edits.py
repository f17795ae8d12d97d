"""Edits: strength kernels, variants, and hooks ≡ weights on tiny random decoders (fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import VLM_ARCHS, make_tiny, make_tiny_vlm

from refdir.core.architecture import inspect_model
from refdir.core.directions import Candidates
from refdir.core.edits import (
    VARIANTS,
    Component,
    Edit,
    Kernel,
    Plan,
    Second,
    apply_weights_,
    component_writers,
    hook_variants,
    hooked,
    hooked_rows,
    interpolate,
    resolve,
)
from refdir.core.interventions import ablate
from refdir.errors import RefdirError

VOCAB = 128
# pre-norm architectures with plain linears (biases in starcoder2 / gpt_neox / phi3-style fused projections)
LINEAR_ARCHS = ["llama", "qwen2", "gemma", "phi3", "starcoder2", "gpt_neox", "cohere", "gpt2", "falcon_h1", "bamba",
                "nanochat"]
MOE_ARCHS = ["qwen2_moe", "mixtral", "granitemoehybrid", "jamba", "deepseek_v3"]


def _cands(n_layers: int, d: int, seed: int = 5) -> Candidates:
    g = torch.Generator().manual_seed(seed)
    mh = torch.randn(3, n_layers + 1, d, generator=g, dtype=torch.float64)
    mb = torch.randn(3, n_layers + 1, d, generator=g, dtype=torch.float64) + 0.5
    return Candidates.from_means(mh, mb)


def _inputs(seed=1, batch=2, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _edit(variant_attn: str, variant_mlp: str, embedding: bool = True) -> Edit:
    return Edit(-1, 1.4, Component(Kernel(0.9, 1.0, 1.5, 0.3), variant_attn),
                Component(Kernel(0.7, 0.2, 2.0, 0.1), variant_mlp), embedding)


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _with_second(cands: Candidates, seed: int = 11) -> Candidates:
    return cands.with_optimized("second", torch.randn(cands.vectors.shape[-1], generator=torch.Generator().manual_seed(seed)))


def _hooks_vs_weights(arch_name: str, edit: Edit, make=make_tiny) -> None:
    model = make(arch_name, VOCAB)
    arch = inspect_model(model)
    plan = resolve(edit, _with_second(_cands(arch.n_layers, arch.d_model)))
    ids, mask = _inputs()
    base = _logits(model, ids, mask)
    with hooked(model, plan):
        hook_out = _logits(model, ids, mask)
    assert (hook_out - base).abs().max() > 1e-3, "the edit must change a random model's output"
    assert (_logits(model, ids, mask) - base).abs().max() == 0, "hooks must be removed on exit"
    apply_weights_(model, plan)
    w_out = _logits(model, ids, mask)
    scale = max(1.0, float(base.abs().max()) / 10)
    assert (hook_out - w_out).abs().max() <= 1e-4 * scale, f"{arch_name} {edit.describe()}: hooks != weights"


@pytest.mark.parametrize("arch_name", LINEAR_ARCHS)
@pytest.mark.parametrize("variant", ["plain", "projected", "norm"])
def test_hooks_equal_weights_for_each_variant(arch_name, variant):
    _hooks_vs_weights(arch_name, _edit(variant, variant))


@pytest.mark.parametrize("arch_name", list(VLM_ARCHS))
def test_hooks_equal_weights_on_the_text_path_of_vision_language_models(arch_name):
    """Vision-language checkpoints (the image encoder's own block lists beside the decoder's): every variant edits
    the decoder, as hooks and as weights alike."""
    _hooks_vs_weights(arch_name, _edit("norm", "projected"), make_tiny_vlm)
    _hooks_vs_weights(arch_name, _edit("plain", "plain"), make_tiny_vlm)


@pytest.mark.parametrize("arch_name", MOE_ARCHS)
def test_hooks_equal_weights_on_mixture_of_experts(arch_name):
    _hooks_vs_weights(arch_name, _edit("norm", "projected", embedding=False))
    _hooks_vs_weights(arch_name, _edit("plain", "plain"))


def test_mixed_variants_and_no_embedding():
    _hooks_vs_weights("llama", _edit("projected", "norm", embedding=False))


def _second(edit: Edit, strength: float = 0.4) -> Edit:
    edit.second = Second("second", strength)
    return edit


@pytest.mark.parametrize("arch_name", LINEAR_ARCHS + ["qwen2_moe"])
def test_hooks_equal_weights_with_a_second_direction(arch_name):
    """The second direction is removed after the edit itself, from every writer (also where the kernel is 0) and
    the embedding; hooks and weights agree on every architecture, with each variant."""
    variants = ("projected", "plain") if arch_name == "qwen2_moe" else ("norm", "projected")
    _hooks_vs_weights(arch_name, _second(_edit(*variants)))
    _hooks_vs_weights(arch_name, _second(_edit("plain", "plain", embedding=False), 1.0))


@pytest.mark.parametrize("arch_name", ["gemma2", "gemma3_text", "olmo2", "gemma4_text"])
def test_hooks_equal_weights_under_post_norms(arch_name):
    """Post-norm blocks: the hooks edit what the writers write, before the norm, along gain ⊙ d, so the weights
    compute the same (they computed something else when the hooks edited the norm's output: the norm rescales)."""
    variants = hook_variants(inspect_model(make_tiny(arch_name, VOCAB)))  # Gemma 4's fused experts: no norm
    for v in variants:
        _hooks_vs_weights(arch_name, _edit(v, v))
    _hooks_vs_weights(arch_name, _second(_edit(variants[-1], "projected")))


def test_second_direction_is_orthogonal_to_the_first_and_removed_at_its_strength():
    model = make_tiny("llama", VOCAB)
    arch = inspect_model(model)
    cands = _with_second(_cands(arch.n_layers, arch.d_model))
    edit = _second(Edit.full(-1, 1.0), 0.3)
    plan = resolve(edit, cands)
    u, s = plan.second
    assert s == 0.3 and abs(float(u @ plan.r)) < 1e-12 and abs(float(u.norm()) - 1) < 1e-12
    bp = arch.blocks[1]
    w = next(w for w in component_writers(bp, "mlp"))
    W0 = getattr(w.module, w.param).detach().double().clone()
    apply_weights_(model, plan)
    W1 = getattr(w.module, w.param).detach().double()
    r, axis = plan.r, w.out_axis
    part = lambda W, v: (W.movedim(axis, -1) @ v)  # noqa: E731
    assert part(W1, r).abs().max() < 1e-5  # full strength along r
    assert torch.allclose(part(W1, u), 0.7 * part(W0, u), atol=1e-5)  # loses 0.3 of its part along u
    assert Edit.from_dict(edit.to_dict()) == edit and "+ second 0.30 everywhere" in edit.describe()
    assert "second" not in Edit.full(-1, 1.0).to_dict()
    with pytest.raises(RefdirError, match="not among"):
        resolve(edit, _cands(arch.n_layers, arch.d_model))
    with pytest.raises(RefdirError, match="strength"):
        resolve(_second(Edit.full(-1, 1.0), 1.5), cands)
    with pytest.raises(RefdirError, match="parallel"):
        resolve(_second(Edit.full(-1, 1.0)), cands.with_optimized("second", cands.get(-1, 1).vector * 3))


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "gpt_neox", "qwen2_moe"])
def test_full_edit_is_the_plain_ablation(arch_name):
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    cands = _cands(arch.n_layers, arch.d_model)
    plan = resolve(Edit.full(-2, 2), cands)
    r = cands.get(-2, 2).vector
    assert torch.allclose(plan.r.float(), r / r.norm(), atol=1e-6)
    ids, mask = _inputs()
    with ablate(model, r):
        ab = _logits(model, ids, mask)
    with hooked(model, plan):
        ed = _logits(model, ids, mask)
    with hooked(model, Plan.full(r, arch.n_layers)):
        ed2 = _logits(model, ids, mask)
    assert (ab - ed).abs().max() <= 1e-4 and (ab - ed2).abs().max() <= 1e-4


def test_strength_removes_that_share_of_the_component_along_r():
    model = make_tiny("llama", VOCAB)
    arch = inspect_model(model)
    cands = _cands(arch.n_layers, arch.d_model)
    s = 0.3
    edit = Edit(-1, 1.0, Component(Kernel(s, 0.0, 0.5, 0.0)), Component(Kernel(0.0)), embedding=False)
    plan = resolve(edit, cands)
    assert plan.strengths["attn"] == [s, 0.0, 0.0] and plan.strengths["mlp"] == [0.0, 0.0, 0.0]
    seen = []
    h = arch.blocks[0].attn.register_forward_hook(lambda _m, _a, out: seen.append(out[0].detach().clone()))
    ids, mask = _inputs()
    try:
        _logits(model, ids, mask)
        with hooked(model, plan, arch):
            # registered after the edit's hook: sees the edited output
            h2 = arch.blocks[0].attn.register_forward_hook(lambda _m, _a, out: seen.append(out[0].detach().clone()))
            _logits(model, ids, mask)
            h2.remove()
    finally:
        h.remove()
    assert len(seen) == 3, len(seen)
    base, _unedited_again, edited = seen
    r = plan.r.float()
    assert torch.allclose(edited @ r, (1 - s) * (base @ r), atol=1e-5)
    perp = base - (base @ r).unsqueeze(-1) * r
    assert torch.allclose(edited - (edited @ r).unsqueeze(-1) * r, perp, atol=1e-5)


@pytest.mark.parametrize("arch_name", ["llama", "starcoder2", "mixtral"])
def test_norm_preserving_keeps_every_write_vector_norm(arch_name):
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    edit = Edit(-1, 2.0, Component(Kernel(1.0), "norm"), Component(Kernel(0.6), "norm"), embedding=False)
    plan = resolve(edit, _cands(arch.n_layers, arch.d_model))
    before = {}
    for bp in arch.blocks:
        for c in ("attn", "mlp"):
            for w in component_writers(bp, c):
                p = getattr(w.module, w.param)
                if p.dim() > 1 and not w.param.endswith("_bias"):
                    before[w.name] = (p.detach().clone(), w.out_axis, p)
    assert before
    apply_weights_(model, plan)
    worst = 0.0
    for name, (old, axis, p) in before.items():
        n0 = old.movedim(axis, -1).norm(dim=-1)
        n1 = p.detach().movedim(axis, -1).norm(dim=-1)
        worst = max(worst, float(((n1 - n0).abs() / n0).max()))
        assert not torch.equal(old, p.detach()), f"{name} was not edited"
    assert worst <= 1e-5
    # and the r̂ part is gone at full strength on attention
    r = plan.directions["attn"].float()
    for bp in arch.blocks:
        for w in component_writers(bp, "attn"):
            p = getattr(w.module, w.param)
            if p.dim() == 2:
                assert float((r @ p.detach()).abs().max()) <= 1e-5


def test_projected_direction_is_orthogonal_to_the_harmless_mean():
    cands = _cands(4, 32)
    for layer in (1.0, 2.5, 3.75):
        edit = Edit(-3, layer, Component(Kernel(1.0), "projected"), Component(Kernel(1.0), "plain"))
        plan = resolve(edit, cands)
        lo, w = int(layer), layer - int(layer)
        m = (1 - w) * cands.harmless_mean[0, lo].double() + w * cands.harmless_mean[0, min(lo + 1, 4)].double()
        rp = plan.directions["attn"]
        assert abs(float(rp @ m)) <= 1e-10 * float(m.norm())
        assert abs(float(rp.norm()) - 1) < 1e-12
        assert abs(float(plan.directions["mlp"] @ m)) > 1e-3 * float(m.norm())  # plain is not


def test_float_layer_interpolates_adjacent_candidates():
    cands = _cands(4, 16)
    v = cands.vectors.double()
    a, b = v[1, 2] / v[1, 2].norm(), v[1, 3] / v[1, 3].norm()
    assert torch.allclose(interpolate(cands.vectors, 1, 2.0), a)
    mid = interpolate(cands.vectors, 1, 2.5)
    assert torch.allclose(mid, (a + b) / (a + b).norm())
    assert float(mid @ a) > 0.0 and float(mid @ b) > 0.0


def test_kernel_shape_and_roundtrip():
    k = Kernel(peak=0.8, center=5.0, width=2.0, floor=0.2)
    assert k.strengths(9) == pytest.approx([0, 0, 0, 0.2, 0.5, 0.8, 0.5, 0.2, 0])
    assert Kernel(1.0).strengths(3) == [1.0, 1.0, 1.0]
    e = _edit("norm", "projected", embedding=False)
    assert Edit.from_dict(e.to_dict()) == e


def test_an_optimized_direction_is_used_at_every_layer_and_round_trips():
    cands = _cands(4, 16)
    r = torch.randn(16, generator=torch.Generator().manual_seed(5))
    with_rdo = cands.with_optimized("rdo", r)
    assert cands.optimized == {} and set(with_rdo.optimized) == {"rdo"}  # a copy; the original unchanged
    for layer in (1.0, 2.5):
        plan = resolve(Edit(-2, layer, Component(Kernel(1.0), "plain"), Component(Kernel(1.0), "projected"),
                            direction="rdo"), with_rdo)
        u = r.double() / r.double().norm()
        assert torch.allclose(plan.r, u) and torch.allclose(plan.directions["attn"], u)
        m = _interp(cands.harmless_mean, cands.positions.index(-2), layer)  # projected: against the harmless mean at (position, layer)
        assert abs(float(plan.directions["mlp"] @ m)) <= 1e-10 * float(m.norm())
    e = Edit.full(-2, 3.0, "rdo")
    assert Edit.from_dict(e.to_dict()) == e and "rdo" in e.describe()
    # its position and layer only say which harmless mean a projected variant uses, and describe says just that
    assert "layer" not in e.describe()
    proj = Edit(-2, 1.0, Component(Kernel(1.0), "plain"), Component(Kernel(1.0), "projected"), direction="rdo")
    assert proj.describe().startswith("rdo (harmless mean at pos -2 layer 1.00)")
    assert "direction" not in Edit.full(-2, 3.0).to_dict()  # edits saved before optimized directions read the same
    with pytest.raises(RefdirError, match="lack"):
        resolve(e, cands)
    with pytest.raises(RefdirError, match="d_model"):
        cands.with_optimized("rdo", torch.ones(8))


def _interp(t, pi, layer):
    lo, w = int(layer), layer - int(layer)
    return (1 - w) * t[pi, lo].double() + w * t[pi, min(lo + 1, t.shape[1] - 1)].double()


@pytest.mark.parametrize("bad", [
    dict(attn=Component(Kernel(1.0), "sideways")),
    dict(attn=Component(Kernel(1.5))),
    dict(mlp=Component(Kernel(1.0, 0.0, -1.0))),
    dict(layer=9.0),
    dict(position=-7),
])
def test_bad_edits_are_refused(bad):
    cands = _cands(4, 16)
    kw = dict(position=-1, layer=1.0) | bad
    with pytest.raises(RefdirError):
        resolve(Edit(**kw), cands)


def test_wrong_model_size_is_refused():
    model = make_tiny("llama", VOCAB)
    plan = resolve(Edit.full(-1, 1), _cands(3, 32))
    with pytest.raises(RefdirError, match="d_model"):
        with hooked(model, plan):
            pass
    with pytest.raises(RefdirError, match="d_model"):
        apply_weights_(model, plan)


# ------------------------------------------------------------------ several plans in one batch (hooked_rows)


def _three_plans(arch):
    cands = _cands(arch.n_layers, arch.d_model)
    return [None, resolve(_edit("norm", "projected"), cands), resolve(_edit("plain", "norm", embedding=False), cands)]


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "gpt_neox", "gemma2", "qwen2_moe"])
def test_row_plans_equal_each_plan_hooked_alone(arch_name):
    """Rows of one batch under different plans compute what each plan computes alone (None: the base model)."""
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    plans = _three_plans(arch)
    if arch_name == "qwen2_moe":  # routed experts are fused tensors: norm-preserving hooks need plain linears
        plans = [None, resolve(_edit("projected", "plain"), _cands(arch.n_layers, arch.d_model)), plans[2]]
        plans[2].variants["mlp"] = "plain"
    ids, mask = _inputs(batch=4)
    groups = [2, 0, 1, 2]
    alone = []
    for b, k in enumerate(groups):
        if plans[k] is None:
            alone.append(_logits(model, ids[b:b + 1], mask[b:b + 1]))
        else:
            with hooked(model, plans[k], arch):
                alone.append(_logits(model, ids[b:b + 1], mask[b:b + 1]))
    alone = torch.cat(alone)
    with hooked_rows(model, plans, arch) as rows:
        rows.use(groups)
        together = _logits(model, ids, mask)
    assert (alone[1] - _logits(model, ids[1:2], mask[1:2])[0]).abs().max() == 0, "row of the base model changed"
    valid = mask.bool()
    assert (together - alone)[valid].abs().max() <= 1e-4, arch_name
    assert (_logits(model, ids, mask) - together).abs().max() > 1e-3, "the plans must change some rows"


def test_row_plans_need_an_assignment():
    model = make_tiny("llama", VOCAB)
    arch = inspect_model(model)
    ids, mask = _inputs(batch=2)
    base = _logits(model, ids, mask)
    with hooked_rows(model, _three_plans(arch), arch) as rows:
        with pytest.raises(RefdirError, match="Rows.use"):
            _logits(model, ids, mask)
        rows.use([0, 1, 2])  # three plans for two rows
        with pytest.raises(RefdirError, match="rows"):
            _logits(model, ids, mask)
        with pytest.raises(RefdirError, match="0..2"):
            rows.use([0, 3])
    assert (_logits(model, ids, mask) - base).abs().max() == 0, "hooks must be removed on exit"


@pytest.mark.parametrize("arch_name", ["llama", "gpt2", "qwen2_moe", "mixtral", "granitemoehybrid"])
def test_hook_variants_are_the_ones_hooks_can_apply(arch_name):
    """`hook_variants` (what the search draws) leaves out `norm` exactly where its hooks are refused: on models
    with fused 3-D expert tensors; each variant it lists runs as hooks, the one it leaves out raises."""
    model = make_tiny(arch_name, VOCAB)
    arch = inspect_model(model)
    fused = any(getattr(w.module, w.param).dim() == 3 for bp in arch.blocks for w in bp.writers)
    assert set(hook_variants(arch)) == (set(VARIANTS) - {"norm"} if fused else set(VARIANTS))
    cands = _cands(arch.n_layers, arch.d_model)
    ids, mask = _inputs()
    for v in VARIANTS:
        plan = resolve(_edit(v, v), cands)
        if v in hook_variants(arch):
            with hooked(model, plan):
                _logits(model, ids, mask)
        else:
            with pytest.raises(RefdirError, match="norm-preserving variant as hooks"), hooked(model, plan):
                pass


@pytest.mark.parametrize("shape, axis", [((7,), 0), ((7, 5), 0), ((5, 7), 1), ((3, 7, 4), 1), ((2, 3, 7), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_in_place_in_blocks_equals_the_whole_tensor_at_once(shape, axis, dtype, monkeypatch):
    """``project_along_`` edits a weight a block of vectors at a time (no float64 copy of a whole vocabulary): the
    same numbers as projecting the whole tensor in float64, for every layout; several steps are applied in float64
    and cast once."""
    from refdir.core import projection

    g = torch.Generator().manual_seed(0)
    t = torch.randn(shape, generator=g).to(dtype)
    r1, r2 = torch.randn(7, generator=g), torch.randn(7, generator=g)
    r1, r2 = r1 / r1.norm(), r2 / r2.norm()
    x = t.to(torch.float64).movedim(axis, -1)
    want = projection.project_rows(projection.project_rows(x, r1.double(), 0.7, True), r2.double(), 0.3)
    want = want.movedim(-1, axis).to(dtype)
    monkeypatch.setattr(projection, "BLOCK_ELEMS", 8)  # several blocks even for these small tensors
    got = t.clone()
    projection.project_along_(got, axis, (r1, 0.7, True), (r2, 0.3, False))
    assert torch.equal(got, want)
    one = t.clone()
    projection.project_along_(one, axis, (r1, 0.7, True))
    assert torch.equal(one, projection.project_along(t, r1, axis, 0.7, True))


def test_output_hooks_edit_a_module_that_returns_a_list():
    # some older modules return a list (GPT-1's attention): the hook must edit its hidden state, not pass it by
    from torch import nn

    from refdir.core.hooks import map_output, output_hidden, registered

    class ListOut(nn.Module):
        def forward(self, x):
            return [2 * x, None]

    mod, x = ListOut(), torch.ones(3)
    with registered([mod.register_forward_hook(map_output(lambda t: t + 1))]):
        out = mod(x)
    assert isinstance(out, list) and out[1] is None
    assert torch.equal(output_hidden(out), torch.full((3,), 3.0))
