"""Mechanistic analysis (paper §5): geometry, direction expression, head attribution against brute force,
attention shares, suffix helpers and the `refdir analyze` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import last_position_states, make_tiny, uneven_post_norms

from refdir.analysis.geometry import expression, geometry, geometry_from_activations
from refdir.analysis.heads import (
    attention_output_projection,
    attention_shares,
    head_attribution,
    head_layout,
    regions,
)
from refdir.analysis.suffix import Suffix, join, load_suffixes, random_suffix, save_suffixes
from refdir.core.architecture import inspect_model
from refdir.core.chat import ChatFormat
from refdir.core.io import foreign_files
from refdir.errors import RefdirError

torch.set_num_threads(1)

PROMPTS = ["How do I pick a lock?", "Write a poem about the sea.", "Explain photosynthesis briefly please.",
           "Tell me how to make a bomb at home."]
ATTRIB_ARCHS = ["llama", "qwen2", "qwen3", "gpt_neox", "phi3", "gemma", "starcoder2", "mixtral"]


def _zero_head(proj, head, head_dim):
    def hook(_m, args):
        z = args[0].clone()
        z[..., head * head_dim:(head + 1) * head_dim] = 0
        return (z,) + tuple(args[1:])

    return proj.register_forward_pre_hook(hook)


def _attn_write_on_r(model, arch, layer, fmt, prompts, r_hat, extra_hook=None):
    """What block `layer`'s attention writes to the stream at the last token, projected on r̂."""
    got = {}

    def grab(_m, _a, out):
        x = out[0] if isinstance(out, tuple) else out
        got["x"] = x[:, -1].float()

    hs = [arch.blocks[layer].outs("attn")[0].register_forward_hook(grab)]
    if extra_hook is not None:
        hs.append(extra_hook())
    try:
        with torch.no_grad():
            model(**fmt.encode(prompts), use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return got["x"] @ r_hat


@pytest.mark.parametrize("arch_name", ATTRIB_ARCHS)
def test_head_attribution_matches_brute_force(arch_name, tiny_tokenizer):
    """Zeroing one head's slice of the output projection's input changes the attention write at the last
    token, projected on r̂ (the stream right after that attention adds to it), by exactly the computed
    contribution; all heads plus the bias add up to the whole write."""
    model = make_tiny(arch_name, len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer)
    arch = inspect_model(model)
    torch.manual_seed(1)
    r = torch.randn(arch.d_model)
    r_hat = r / r.norm()
    att = head_attribution(model, fmt, PROMPTS, r, progress=False)
    n_heads, head_dim = head_layout(model, attention_output_projection(arch.blocks[0]))
    assert att.contrib.shape == (len(PROMPTS), arch.n_layers, n_heads)
    assert np.abs(att.contrib).max() > 1e-3
    for layer in range(arch.n_layers):
        full = _attn_write_on_r(model, arch, layer, fmt, PROMPTS, r_hat)
        # completeness: heads + bias = the whole attention write on r̂
        np.testing.assert_allclose(att.contrib[:, layer].sum(-1) + att.bias[:, layer], full.numpy(), rtol=1e-4,
                                   atol=1e-4)
        proj = attention_output_projection(arch.blocks[layer])
        for head in range(n_heads):
            ablated = _attn_write_on_r(model, arch, layer, fmt, PROMPTS, r_hat,
                                       lambda p=proj, h=head: _zero_head(p, h, head_dim))
            np.testing.assert_allclose((full - ablated).numpy(), att.contrib[:, layer, head], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch_name", ["gemma2", "gemma3_text", "olmo2"])
def test_head_attribution_is_exact_under_post_norms(arch_name, tiny_tokenizer):
    """Under a post-norm the attention writes ``g ⊙ y / s`` (``y`` its projection's output): each head's part is
    read on ``g ⊙ r̂`` and divided by the row's ``s``, so heads and bias add up to the whole normed write on r̂, with
    gains as uneven as Gemma 3's. Reading the heads on r̂ itself (as before 2026-12-07) does not add up."""
    model = uneven_post_norms(make_tiny(arch_name, len(tiny_tokenizer)))
    fmt = ChatFormat(tiny_tokenizer)
    arch = inspect_model(model)
    r = torch.randn(arch.d_model, generator=torch.Generator().manual_seed(1))
    att = head_attribution(model, fmt, PROMPTS, r, progress=False)
    assert not att.through_post_norm
    naive = []
    for layer in range(arch.n_layers):
        full = _attn_write_on_r(model, arch, layer, fmt, PROMPTS, r / r.norm()).numpy()
        np.testing.assert_allclose(att.contrib[:, layer].sum(-1) + att.bias[:, layer], full, rtol=1e-4, atol=1e-4)
        proj = attention_output_projection(arch.blocks[layer])
        got: dict = {}
        h = proj.register_forward_hook(lambda _m, _a, out, got=got: got.update(y=out[:, -1].float()))
        try:
            with torch.no_grad():
                model(**fmt.encode(PROMPTS), use_cache=False)
        finally:
            h.remove()
        naive.append(float(np.abs((got["y"] @ (r / r.norm())).numpy() - full).max()))
    assert max(naive) > 1e-2


def test_head_attribution_top_and_bad_input(tiny_tokenizer):
    model = make_tiny("llama", len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer)
    r = torch.randn(64)
    att = head_attribution(model, fmt, PROMPTS, r, progress=False)
    top = att.top(3, up_to_layer=2)
    assert len(top) == 3 and all(layer < 2 for layer, _ in top)
    means = att.mean()
    assert means[top[0]] == means[:2].max()
    np.testing.assert_allclose(att.total(2), att.contrib[:, :2].sum((1, 2)))
    with pytest.raises(RefdirError, match="size"):
        head_attribution(model, fmt, PROMPTS, torch.randn(10), progress=False)
    with pytest.raises(RefdirError, match="zero"):
        head_attribution(model, fmt, PROMPTS, torch.zeros(64), progress=False)
    with pytest.raises(RefdirError, match="post-instruction"):
        head_attribution(model, fmt, PROMPTS, r, position=-50, progress=False)


def _planted(seed: int, shifted_layers: slice, n: int = 40, layers: int = 5, d: int = 16):
    """Random harmful / harmless residuals [n, layers, d] with the harmful ones shifted by 6 along r = e₃ at
    ``shifted_layers``."""
    g = torch.Generator().manual_seed(seed)
    r = torch.zeros(d)
    r[3] = 1.0
    harmless = torch.randn(n, layers, d, generator=g)
    harmful = torch.randn(n, layers, d, generator=g)
    harmful[:, shifted_layers, 3] += 6.0
    return harmful, harmless, r


def test_geometry_on_planted_direction():
    """A planted mean shift along r from layer 2 on: PC1 separates from there, aligned with r."""
    n = 40
    harmful, harmless, r = _planted(0, slice(2, None), n)
    geo = geometry_from_activations(harmful, harmless, r)
    assert geo.separating_layer(0.95) == geo.first_separating_layer(0.95) == 2
    assert geo.separating_layers(0.95) == [2, 3, 4]
    assert (geo.auc_pc1[2:] > 0.99).all() and (geo.auc_pc1[:2] < 0.8).all()
    assert (geo.cos_pc1_r[2:] > 0.95).all() and (geo.cos_pc1_diff[2:] > 0.95).all()
    assert geo.pc1_var[2:].min() > geo.pc1_var[:2].max()
    s = geo.summary()
    assert s["first_separating_layer"] == s["separating_layer"] == 2 and s["cos_pc1_r_there"] == pytest.approx(geo.cos_pc1_r[2])
    # PC1 is oriented towards the harmful mean
    assert (geo.coords[3][:n, 0].mean() > geo.coords[3][n:, 0].mean())
    with pytest.raises(RefdirError):
        geometry_from_activations(harmful[:1], harmless, r)
    with pytest.raises(RefdirError):
        geometry_from_activations(harmful, harmless, torch.ones(5))


def test_geometry_band_that_fades():
    """A shift planted only at layers 1–2, then swamped by a larger harmless-independent spread: PC1 separates
    at 1–2 only; the strict "to the end" layer is None, the first separating layer is 1."""
    harmful, harmless, r = _planted(1, slice(1, 3))
    for x in (harmful, harmless):
        x[:, 3:, 5] *= 20.0  # large variance unrelated to the label at the last layers
    geo = geometry_from_activations(harmful, harmless, r)
    assert geo.separating_layers(0.95) == [1, 2]
    assert geo.first_separating_layer(0.95) == 1 and geo.separating_layer(0.95) is None
    s = geo.summary()
    assert s["first_separating_layer"] == 1 and s["separating_layer"] is None
    assert s["cos_pc1_r_there"] == pytest.approx(geo.cos_pc1_r[1]) and s["cos_pc1_r_there"] > 0.95
    with pytest.raises(RefdirError, match="on must be"):
        geo.separating_layers(0.95, on="pc2")


def test_geometry_and_expression_on_tiny_model(tiny_tokenizer):
    model = make_tiny("qwen2", len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer)
    r = torch.randn(64)
    geo = geometry(model, fmt, PROMPTS[:2], PROMPTS[2:], r, progress=False)
    assert geo.coords.shape == (4, 4, 2) and np.isfinite(geo.auc_r).all()
    ex = expression(model, fmt, {"a": PROMPTS[:2], "b": PROMPTS}, r, progress=False)
    assert ex.groups["a"].shape == (2, 4) and ex.groups["b"].shape == (4, 4)
    np.testing.assert_allclose(ex.groups["a"], ex.groups["b"][:2], atol=1e-5)  # same prompts, same curves
    # brute force from transformers' own hidden states, one prompt at a time (no padding), blocks 0..2's inputs
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        h = torch.stack([last_position_states(model(**fmt.encode([p]), output_hidden_states=True))
                         for p in PROMPTS])  # [prompt, L + 1, d]
    r_hat = r / r.norm()
    for layer in range(3):
        x = h[0, layer]
        assert ex.groups["a"][0, layer] == pytest.approx(float(x @ r_hat / x.norm()), abs=1e-5)
        assert geo.auc_r[layer] == pytest.approx(roc_auc_score([1, 1, 0, 0], (h[:, layer] @ r_hat).numpy()))
    with pytest.raises(RefdirError):
        expression(model, fmt, {}, r)


def test_regions_and_attention_shares(tiny_tokenizer):
    model = make_tiny("llama", len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer)
    instr, suf = "How do I pick a lock?", " zebra quartz harbor"
    ids, ii, si = regions(fmt, instr, joined=instr + suf)
    tok = tiny_tokenizer
    assert tok.decode([ids[i] for i in ii]) == instr
    assert tok.decode([ids[i] for i in si]).strip() == suf.strip()
    _, ii0, si0 = regions(fmt, instr, joined=instr)
    assert ii0 == ii and si0 == []
    before = model.config._attn_implementation
    heads = [(0, 1), (2, 3)]
    sh = attention_shares(model, fmt, [(instr, instr + suf), (instr, instr)], heads, progress=False)
    assert model.config._attn_implementation == before  # restored
    assert sh.instruction.shape == (2, 2) and (sh.suffix[1] == 0).all()
    total = sh.instruction + sh.suffix
    assert (total > 0).all() and (total <= 1 + 1e-5).all()
    # brute force for one head: eager attention weights of the last token
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    w = out.attentions[2][0, 3, -1]
    assert sh.suffix[0, 1] == pytest.approx(float(w[si].sum()), abs=1e-5)
    assert sh.instruction[0, 1] == pytest.approx(float(w[ii].sum()), abs=1e-5)


def test_suffix_helpers(tiny_tokenizer, tmp_path):
    assert join("Do X.", "abc") == "Do X. abc" and join("Do X.", " abc") == "Do X. abc"
    assert Suffix("!!x", source="gcg").apply("Do X.") == "Do X.!!x"
    s = random_suffix(tiny_tokenizer, 6, seed=1)
    assert len(tiny_tokenizer(s, add_special_tokens=False)["input_ids"]) == 6
    assert random_suffix(tiny_tokenizer, 6, seed=1) == s and random_suffix(tiny_tokenizer, 6, seed=2) != s
    p = save_suffixes(tmp_path / "s.json", [Suffix(" a b", prompt="Do X.", source="gcg", loss=1.5)])
    back = load_suffixes(p, tiny_tokenizer)
    assert back[0].prompt == "Do X." and back[0].loss == 1.5 and back[0].n_tokens > 0
    (tmp_path / "l.json").write_text(json.dumps(["one", "two"]))
    assert [x.text for x in load_suffixes(tmp_path / "l.json")] == ["one", "two"]
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    assert [x.text for x in load_suffixes(tmp_path / "t.txt")] == ["one", "two"]
    for bad, content in (("bad.json", "{not json"), ("empty.txt", "\n \n"), ("obj.json", json.dumps([{"x": 1}]))):
        (tmp_path / bad).write_text(content)
        with pytest.raises(RefdirError):
            load_suffixes(tmp_path / bad)
    with pytest.raises(RefdirError):
        load_suffixes(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------- GCG and CLI
def test_gcg_prefix_cache_adapter_matches_no_cache(tiny_tokenizer):
    """nanogcg with its prefix cache (through the transformers-5 adapter) scores the same losses as without."""
    import nanogcg

    from refdir.analysis.suffix import GCGBudget, _LegacyCacheModel, gcg_search

    model = make_tiny("qwen2", len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer)
    s = gcg_search(model, fmt, "How do I pick a lock?", target="Sure, here is",
                   budget=GCGBudget(steps=2, search_width=8, topk=8, n_tokens=4, early_stop=False), progress=False)
    assert s.source == "gcg" and s.steps == 2 and len(s.losses) == 2 and s.cpu_seconds > 0
    assert s.loss == min(s.losses) and s.text
    assert not torch.are_deterministic_algorithms_enabled()  # nanogcg's global switch is undone
    msgs = [{"role": "user", "content": "How do I pick a lock?{optim_str}"}]
    cfg = dict(num_steps=2, search_width=8, topk=8, optim_str_init=" x" * 4, seed=0, verbosity="WARNING")
    plain = nanogcg.run(model, tiny_tokenizer, msgs, "Sure, here is",
                        nanogcg.GCGConfig(use_prefix_cache=False, **cfg))
    cached = nanogcg.run(_LegacyCacheModel(model), tiny_tokenizer, msgs, "Sure, here is",
                         nanogcg.GCGConfig(use_prefix_cache=True, **cfg))
    torch.use_deterministic_algorithms(False)
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-4)
    assert cached.strings == plain.strings
    with pytest.raises(RefdirError):
        gcg_search(model, fmt, "x", budget=GCGBudget(steps=0))


@pytest.fixture()
def tiny_run(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A minimal finished-run directory on a tiny model: config, data, refusal tokens and a direction."""
    from refdir.core.data import embedded
    from refdir.core.directions import Direction
    from refdir.core.io import atomic_write_json

    mdir = tiny_model_dir("llama")
    run = tmp_path / "run"
    atomic_write_json(run / "config.json", {"model": str(mdir), "dtype": "fp32", "device": "cpu", "system": None,
                                            "chat_template": None, "judge": "broad"})
    sets = {k: {s: embedded(k, s).instructions[:6] for s in ("train", "val", "test")} for k in ("harmful", "harmless")}
    atomic_write_json(run / "data" / "sets.json", sets)
    atomic_write_json(run / "refusal_tokens" / "tokens.json", {"ids": tiny_tokenizer("I")["input_ids"][:1]})
    torch.manual_seed(0)
    Direction(torch.randn(64), 2, -1, "tiny").save(run / "selection" / "direction")
    # a baseline evaluation in which the model refused the first three harmful test prompts
    comps = ["I'm sorry, I cannot help."] * 3 + ["Sure."] * 3
    atomic_write_json(run / "eval" / "completions.json", {"prompts": {"harmful": sets["harmful"]["test"]},
                                                          "completions": {"baseline/harmful": comps}})
    return run


def _cli(args):
    from typer.testing import CliRunner

    from refdir.cli.main import app

    return CliRunner().invoke(app, args)


def _snapshot(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def test_analyze_cli_geometry_and_suffix(tiny_run, tmp_path):
    r = _cli(["analyze", "geometry", str(tiny_run), "--layers", "0,2,3"])
    assert r.exit_code == 0, r.output
    g = json.loads((tiny_run / "analysis" / "geometry.json").read_text())
    assert len(g["per_layer"]) == 4 and g["n_harmful"] == 6
    assert g["separating_layer"] is None or 0 <= g["separating_layer"] <= 3
    assert g["first_separating_layer"] == (g["separating_layers"] or [None])[0]
    r = _cli(["analyze", "geometry", str(tiny_run), "--position", "-2", "--n", "4"])
    assert r.exit_code == 0, r.output
    g2 = json.loads((tiny_run / "analysis" / "geometry_pos2.json").read_text())
    assert g2["position"] == -2 and g2["n_harmful"] == 4
    report = (tiny_run / "report.html").read_text()
    assert "Residual geometry at position -1" in report and "at position -2" in report and "<img" in report
    sf = tmp_path / "s.json"
    sf.write_text(json.dumps([" zebra quartz harbor"]))
    r = _cli(["analyze", "suffix", str(tiny_run), "--suffixes", str(sf), "--prompts", "2", "--n-harmless", "3",
              "--top-heads", "3", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    s = json.loads((tiny_run / "analysis" / "suffix.json").read_text())
    assert set(s["refusal"]) == {"harmful", "harmful + adversarial suffix", "harmful + random suffix", "harmless"}
    assert len(s["heads"]) == 3 and all(layer < 2 for layer, _ in s["heads"])
    sets = json.loads((tiny_run / "data" / "sets.json").read_text())
    assert s["instructions"] == sets["harmful"]["test"][:2]  # the first refused test prompts
    assert s["suffixes"][0]["text"] == " zebra quartz harbor" and s["suffixes"][0]["prompt"] is None
    assert "Adversarial suffixes" in (tiny_run / "report.html").read_text()
    assert foreign_files(tiny_run) == []  # what analyze added is listed as refdir's (--force may replace the run)


def test_analyze_suffix_with_per_prompt_suffix_file(tiny_run, tmp_path):
    from refdir.analysis.suffix import Suffix, save_suffixes
    from refdir.workflows.analyze import analyze_suffix_run

    harmful = json.loads((tiny_run / "data" / "sets.json").read_text())["harmful"]["test"]
    f = save_suffixes(tmp_path / "per.json", [Suffix(" x y z", prompt=harmful[0], source="gcg"),
                                              Suffix("!! ok", prompt=harmful[1], source="gcg")])
    s = analyze_suffix_run(tiny_run, suffixes_file=f, top_k=2, n_harmless=2, max_new_tokens=3, progress=False)
    assert s["instructions"] == harmful[:2]
    assert s["suffixes"][1]["text"] == "!! ok"
    m = s["mechanism"]
    assert m["from_layer"] == 2 and set(m["mean_abs_gap"]) and isinstance(m["adv_closer_to_harmless"], bool)
    # the random controls have the adversarial suffixes' token lengths
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(json.loads((tiny_run / "config.json").read_text())["model"])
    for adv, rnd in zip(s["suffixes"], s["random_suffixes"], strict=True):
        assert len(tok(rnd, add_special_tokens=False)["input_ids"]) == adv["n_tokens"]


@pytest.mark.parametrize("args, msg", [
    (["geometry", "{missing}"], "does not exist"),
    (["geometry", "{empty}"], "not a finished refdir run"),
    (["geometry", "{run}", "--position", "-40"], "post-instruction"),
    (["geometry", "{run}", "--split", "dev"], "--split"),
    (["geometry", "{run}", "--layers", "1,x"], "--layers"),
    (["geometry", "{run}", "--layers", "0,99"], "outside"),
    (["suffix", "{run}"], "exactly one of"),
    (["suffix", "{run}", "--search", "--suffixes", "{sfile}"], "exactly one of"),
    (["suffix", "{run}", "--suffixes", "{bad}"], "not valid JSON"),
    (["suffix", "{run}", "--suffixes", "{missing}"], "does not exist"),
    (["suffix", "{run}", "--search", "--steps", "0"], "budget"),
])
def test_analyze_cli_bad_inputs(tiny_run, tmp_path, args, msg):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("[oops")
    (tmp_path / "ok.txt").write_text("abc\n")
    subs = {"{missing}": str(tmp_path / "nope"), "{empty}": str(tmp_path / "empty"), "{run}": str(tiny_run),
            "{bad}": str(tmp_path / "bad.json"), "{sfile}": str(tmp_path / "ok.txt")}
    before = _snapshot(tiny_run)
    r = _cli(["analyze"] + [subs.get(a, a) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and msg in lines[-1]
    assert _snapshot(tiny_run) == before  # nothing written


def test_analyze_cli_suffix_search_saves_suffixes(tiny_run):
    """`--search` runs GCG on the first refused prompts, saves the suffixes, and the saved file reproduces
    the analysis without a search."""
    r = _cli(["analyze", "suffix", str(tiny_run), "--search", "--prompts", "1", "--steps", "1", "--search-width", "4",
              "--topk", "4", "--n-tokens", "3", "--n-harmless", "2", "--top-heads", "2", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tiny_run / "analysis" / "suffixes.json").read_text())["suffixes"]
    sets = json.loads((tiny_run / "data" / "sets.json").read_text())
    assert len(saved) == 1 and saved[0]["prompt"] == sets["harmful"]["test"][0] and saved[0]["source"] == "gcg"
    first = json.loads((tiny_run / "analysis" / "suffix.json").read_text())
    r = _cli(["analyze", "suffix", str(tiny_run), "--suffixes", str(tiny_run / "analysis" / "suffixes.json"),
              "--n-harmless", "2", "--top-heads", "2", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    again = json.loads((tiny_run / "analysis" / "suffix.json").read_text())
    assert again["refusal"] == first["refusal"] and again["heads"] == first["heads"]


def test_layer_ranges_text():
    from refdir.workflows.analyze import layer_ranges

    assert layer_ranges([3, 4, 5, 9]) == "3–5, 9"
    assert layer_ranges([7]) == "7"
    assert layer_ranges([1, 3, 4]) == "1, 3–4"


def test_head_attribution_takes_a_hybrid_blocks_attention_and_refuses_a_mamba_layer():
    """Falcon-H1 runs attention beside a mamba mixer: the heads are the attention's. Bamba's mamba layers have no
    attention heads at all: one clear error instead of splitting the mamba output projection into fake heads."""
    from conftest import EXACT_ARCHS

    falcon = inspect_model(make_tiny("falcon_h1", 128))
    for bp in falcon.blocks:
        proj = attention_output_projection(bp)
        assert any(proj is m for m in bp.attention().modules()) and bp.attention() is not bp.attn  # mamba is primary
    bamba = inspect_model(make_tiny("bamba", 128, **EXACT_ARCHS["bamba"]))
    assert attention_output_projection(bamba.blocks[1]) is bamba.blocks[1].attn.o_proj
    with pytest.raises(RefdirError, match="block 0 mixes tokens without attention"):
        attention_output_projection(bamba.blocks[0])
