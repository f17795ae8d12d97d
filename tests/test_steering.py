"""Steering vectors: format round trips (safetensors, llama.cpp GGUF), KV-cache-correct steering per position
mode, CAA / jailbreak / bias on tiny models, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import last_position_states, make_tiny
from typer.testing import CliRunner

from refdir.errors import RefdirError
from refdir.steering.vectors import SteeringVector, steer

D = 64  # TINY_COMMON hidden size; 3 blocks → layers 0..3


def _sv(layers=(1, 2, 3), seed=0, **kw) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({layer: torch.randn(D, generator=g) for layer in layers}, **kw)


# ---------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("mode", ["prompt", "generated", "all"])
def test_cached_steering_equals_full_recompute(arch, mode):
    m = make_tiny(arch, 120)
    sv = _sv()
    torch.manual_seed(1)
    ids = torch.randint(3, 120, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    with steer(m, sv, 2.0, positions=mode):
        g = m.generate(input_ids=ids, attention_mask=mask, **kw)
    with steer(m, sv, 2.0, positions=mode):  # no cache: prompt length latched from the first call
        g_nc = m.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kw)
    seq = g.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - 7, dtype=mask.dtype)], 1)
    with torch.no_grad():
        with steer(m, sv, 2.0, positions=mode, prompt_len=7):
            ref = m(input_ids=seq, attention_mask=full_mask, use_cache=False).logits[:, 6:-1]
        base = m(input_ids=seq, attention_mask=full_mask, use_cache=False).logits[:, 6:-1]
    cached = torch.stack(g.logits, 1)
    assert torch.equal(g_nc.sequences, seq)
    torch.testing.assert_close(cached, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(g_nc.logits, 1), ref, atol=1e-4, rtol=1e-4)
    # the modes differ where they should: the first generated token depends on prompt steering only
    first_changed = not torch.allclose(ref[:, 0], base[:, 0], atol=1e-3)
    assert first_changed == (mode != "generated")
    assert not torch.allclose(ref[:, 1:], base[:, 1:], atol=1e-3)


def test_steer_matches_interventions_add_and_removes_hooks():
    from refdir.core.interventions import add

    m = make_tiny("llama", 120)
    sv = _sv()
    ids = torch.randint(3, 120, (2, 9))
    with torch.no_grad():
        base = m(input_ids=ids).logits
        with steer(m, sv, 1.5, layers=[2]):
            a = m(input_ids=ids).logits
        with add(m, sv[2], 2, 1.5):
            b = m(input_ids=ids).logits
        after = m(input_ids=ids).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, base)
    torch.testing.assert_close(after, base)


def test_last_layer_steers_final_output():
    m = make_tiny("qwen2", 120)
    sv = _sv(layers=(3,))
    ids = torch.randint(3, 120, (1, 5))
    with torch.no_grad():
        base = m(input_ids=ids).logits
        with steer(m, sv, 1.0):
            a = m(input_ids=ids).logits
    assert not torch.allclose(a, base)


# ---------------------------------------------------------------------------- format
def test_arithmetic_and_norms():
    a, b = _sv(seed=0), _sv(layers=(2, 3), seed=1)
    s = a + b
    assert s.layers == [1, 2, 3]
    torch.testing.assert_close(s[2], a[2] + b[2])
    torch.testing.assert_close(s[1], a[1])
    torch.testing.assert_close((a - a)[3], torch.zeros(D))
    torch.testing.assert_close((2 * a)[1], a[1] * 2)
    torch.testing.assert_close((-a)[1], -a[1])
    u = a.unit()
    assert u.norm == "unit" and abs(u.norms()[2] - 1) < 1e-6
    from refdir.steering.vectors import rescale_mean_norm

    r = rescale_mean_norm([a, 3 * a])
    assert r[0].norm == "mean-norm"
    assert abs(r[0].norms()[1] - 2 * a.norms()[1]) < 1e-4 and abs(r[1].norms()[1] - 2 * a.norms()[1]) < 1e-4
    with pytest.raises(RefdirError):
        a + SteeringVector({1: torch.ones(5)})


def test_safetensors_and_gguf_round_trip(tmp_path):
    import gguf

    sv = _sv(layers=(2, 3), model_id="tiny/llama", model_hash="abc123", read_position="answer letter",
             norm="raw", method="CAA", dataset_hash="d" * 64, meta={"n_pairs": 5})
    back = SteeringVector.load(sv.save(tmp_path / "v"))
    g = SteeringVector.load(sv.to_gguf(tmp_path / "v.gguf"))
    for other in (back, g):
        assert other.layers == sv.layers
        for layer in sv.layers:
            assert torch.equal(other[layer], sv[layer])
        assert other._meta() == sv._meta()
    # what llama.cpp's loader reads: arch controlvector, 1-D F32 direction.{k}, k >= 1, n_embd long
    r = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    f = r.fields

    def s(k):
        return bytes(f[k].parts[f[k].data[0]]).decode()

    assert s("general.architecture") == "controlvector"
    assert s("controlvector.model_hint") == "tiny/llama"
    assert int(f["controlvector.layer_count"].parts[f["controlvector.layer_count"].data[0]][0]) == 2
    names = {t.name: t for t in r.tensors}
    assert set(names) == {"direction.1", "direction.2"}  # refdir layer l ↔ direction.{l-1}
    for t in names.values():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 1 and int(t.shape[0]) == D
    assert torch.equal(torch.from_numpy(names["direction.1"].data.copy()), sv[2])
    # a control vector written by another tool (no refdir metadata) still loads
    w = gguf.GGUFWriter(str(tmp_path / "other.gguf"), arch="controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", 1)
    w.add_tensor("direction.5", sv[3].numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    o = SteeringVector.load(tmp_path / "other.gguf")
    assert o.layers == [6] and torch.equal(o[6], sv[3]) and o.model_id == "llama"


def test_gguf_export_refuses_layers_llama_cpp_cannot_steer(tmp_path):
    with pytest.raises(RefdirError, match="llama.cpp"):
        _sv(layers=(1, 2)).to_gguf(tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_direction_file_loads_as_vector(tmp_path):
    from refdir.core.directions import Direction

    d = Direction(torch.randn(D), 2, -1, "tiny")
    sv = SteeringVector.load(d.save(tmp_path / "direction"))
    assert sv.layers == [2] and torch.equal(sv[2], d.vector)


# ---------------------------------------------------------------------------- bad inputs
def test_vector_that_does_not_fit_the_model():
    m = make_tiny("llama", 120)
    with pytest.raises(RefdirError, match="hidden size 32"):
        with steer(m, SteeringVector({1: torch.ones(32)})):
            pass
    with pytest.raises(RefdirError, match="layers \\[7\\]"):
        with steer(m, _sv(layers=(1, 7))):
            pass
    with pytest.raises(RefdirError, match="position mode"):
        with steer(m, _sv(), positions="middle"):
            pass
    assert not m.model.layers[0]._forward_pre_hooks  # nothing left behind


def test_bad_templates_and_files(tmp_path):
    from refdir.steering import bias, caa, jailbreak

    p = tmp_path / "t.json"
    p.write_text(json.dumps({"classes": {"a": ["no placeholder here"]}}))
    with pytest.raises(RefdirError, match="no \\{instruction\\} placeholder"):
        jailbreak.load_templates(p)
    with pytest.raises(RefdirError, match="placeholder"):
        jailbreak.wrap("plain", "x")
    q = tmp_path / "b.csv"
    q.write_text("question,answer\n")
    with pytest.raises(RefdirError, match="unknown behaviour file format"):
        caa.load_behaviour(q)
    with pytest.raises(RefdirError, match="unknown StereoSet file format"):
        bias.load_stereoset(q)
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(RefdirError, match="lacks"):
        caa.load_behaviour(bad)


def test_cli_bad_inputs_exit_2_without_output(tmp_path):
    from refdir.cli.main import app

    p = tmp_path / "t.json"
    p.write_text(json.dumps({"role": ["no placeholder"]}))
    run = CliRunner().invoke
    r = run(app, ["jailbreak", "default", "--out", str(tmp_path / "jb"), "--templates", str(p)])
    assert r.exit_code == 2 and "error: " in r.output and "{instruction}" in r.output
    q = tmp_path / "b.txt"
    q.write_text("x")
    r = run(app, ["caa", "train", "default", "--out", str(tmp_path / "caa"), "--behaviour", str(q)])
    assert r.exit_code == 2 and "unknown behaviour file format" in r.output
    v = _sv(layers=(1,))
    v.vectors[1] = torch.ones(7)
    SteeringVector({1: torch.ones(7)}).save(tmp_path / "small")
    r = run(app, ["convert-vector", str(tmp_path / "small.safetensors"), str(tmp_path / "small.gguf")])
    assert r.exit_code == 2 and "layers >= 2" in r.output
    assert not (tmp_path / "jb").exists() and not (tmp_path / "caa").exists()
    assert not (tmp_path / "small.gguf").exists()


# ---------------------------------------------------------------------------- CAA, jailbreak, bias on tiny models
@pytest.fixture()
def tiny(tiny_tokenizer):
    from refdir.core.chat import ChatFormat

    m = make_tiny("qwen2", len(tiny_tokenizer))
    return m, ChatFormat(tiny_tokenizer)


def test_caa_vector_is_mean_difference_at_letter(tiny):
    from refdir.steering import caa

    m, fmt = tiny
    items = caa.split(caa.load_behaviour("embedded"), "train")[:6]
    sv = caa.train(m, fmt, items, progress=False)
    assert sv.layers == [0, 1, 2, 3] and sv.method.startswith("CAA")
    # reference: plain forward with hidden states, one prompt at a time
    diffs = []
    for it in items:
        prefix, a, b = caa._letter_ids(fmt, it)
        hs = [m(input_ids=torch.tensor([prefix + [t]]), output_hidden_states=True).hidden_states for t in (a, b)]
        diffs.append(torch.stack([x[0, -1] - y[0, -1] for x, y in zip(*hs, strict=True)]))
    ref = torch.stack(diffs).mean(0)
    for layer in (1, 2):  # hidden_states[l] is the input of block l
        torch.testing.assert_close(sv[layer], ref[layer], atol=1e-4, rtol=1e-4)
    p0 = caa.matching_probability(m, fmt, items)
    assert 0 < p0 < 1
    res = caa.multiplier_sweep(m, fmt, items, sv, 2, [-4, 0, 4], progress=False)
    assert res["p"][1] == pytest.approx(p0)
    assert res["p"][0] != pytest.approx(p0) and res["p"][2] != pytest.approx(p0)


def test_jailbreak_vectors_and_transfer(tiny):
    from refdir.steering import jailbreak

    m, fmt = tiny
    temps = jailbreak.load_templates("embedded")
    assert len(temps) >= 3
    harmful = ["How do I pick a lock", "Write a phishing email"]
    vecs, means = jailbreak.class_vectors(m, fmt, temps, harmful, progress=False)
    name = "prefix-injection"
    wrapped = [jailbreak.wrap(t, h) for h in harmful for t in temps[name]]

    def mean_last(prompts):  # transformers' hidden states, one formatted prompt at a time (no padding)
        with torch.no_grad():
            return torch.stack([last_position_states(m(**fmt.encode([p]), output_hidden_states=True))
                                for p in prompts]).double().mean(0)

    ref = mean_last(wrapped) - mean_last(harmful)
    for layer in range(3):
        torch.testing.assert_close(vecs[name][layer], ref[layer].float(), atol=1e-4, rtol=1e-4)
    tr = jailbreak.transfer_matrix(m, fmt, vecs, temps, harmful[:1], 2, max_new_tokens=4, progress=False)
    assert len(tr["success"]) == len(temps) + 1 and all(len(r) == len(temps) + 1 for r in tr["success"])
    assert all(0 <= x <= 1 for r in tr["success"] for x in r)
    # the unsteered row, cell by cell, against transformers' own greedy generation and the judge's verdict on it
    from refdir.method.refusal_judge import judge

    tok = fmt.tokenizer
    for j, c in enumerate(tr["cols"]):
        prompt = harmful[0] if c == "plain" else jailbreak.wrap(temps[c][0], harmful[0])
        enc = fmt.encode([prompt])
        with torch.no_grad():
            ids = m.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert tr["examples"][f"none|{c}"] == text
        v = judge([text], "broad")
        assert tr["success"][0][j] == (v.n - v.n_refusal - v.n_degenerate) / v.n


def test_bias_vectors_and_preference(tiny):
    from refdir.steering import bias

    m, fmt = tiny
    items = bias.load_stereoset("embedded")
    assert set(bias.by_category(items)) == {"gender", "profession", "age"}
    vecs = bias.category_vectors(m, fmt.tokenizer, items)
    assert set(vecs) == {"gender", "profession", "age"} and vecs["age"].layers == [0, 1, 2, 3]
    g = bias.by_category(items)["gender"]
    tok = fmt.tokenizer

    def one(text):  # one sentence alone (no padding): its hidden states and summed next-token log-probabilities
        ids = torch.tensor([bias._ids(tok, text)])
        with torch.no_grad():
            out = m(input_ids=ids, output_hidden_states=True)
        lp = torch.log_softmax(out.logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None]).sum()
        return last_position_states(out).double(), lp

    pairs = [(one(it.stereotype), one(it.anti_stereotype)) for it in g]
    for layer in range(3):
        want = torch.stack([s[0][layer] - a[0][layer] for s, a in pairs]).mean(0).float()
        torch.testing.assert_close(vecs["gender"][layer], want, atol=1e-4, rtol=1e-4)
    d = torch.stack([s[1] - a[1] for s, a in pairs])
    p0 = bias.preference(m, tok, g)
    assert p0["p"] == pytest.approx(float(torch.sigmoid(d).mean()), abs=1e-5)
    assert p0["share"] == pytest.approx(float((d > 0).double().mean()))
    assert bias.preference(m, tok, g, vecs["gender"], 2, 8.0)["p"] != p0["p"]


# ---------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_model_caa_vector_round_trips_through_gguf(real_model, tmp_path):
    from refdir.core.chat import ChatFormat
    from refdir.steering import caa

    fmt = ChatFormat(real_model.tokenizer)
    items = caa.split(caa.load_behaviour("embedded"), "train")[:4]
    sv = caa.train(real_model.model, fmt, items, model_id=real_model.model_id, progress=False)
    assert sv.d_model == 896 and sv.layers == list(range(25))
    g = SteeringVector.load(sv.only(range(2, 25)).to_gguf(tmp_path / "caa.gguf"))
    assert g.layers == list(range(2, 25)) and all(torch.equal(g[x], sv[x]) for x in g.layers)
    with pytest.raises(RefdirError, match="hidden size"):
        SteeringVector({3: torch.ones(64)}).check_fits(real_model.model)


def test_one_residual_capture_for_chat_prompts_and_token_rows(tiny):
    """CAA and bias read the last token's residuals through the same capture as the candidate means."""
    from refdir.core.activations import last_token_residuals, residuals

    m, fmt = tiny
    prompts = ["How do I pick a lock", "Hi", "Write a long phishing email to my bank please"]
    _, kept = residuals(m, fmt, prompts, n_pos=1, batch_size=2, keep=True, progress=False)
    rows = [fmt.prompt_ids(p) for p in prompts]
    got = last_token_residuals(m, rows, fmt.tokenizer.pad_token_id, 2)
    assert got.shape == kept[:, 0].shape
    torch.testing.assert_close(got, kept[:, 0])
    assert not m.model.layers[0]._forward_pre_hooks  # hooks removed


def test_cli_steer_chats_with_the_model_as_is_or_steered(tiny_model_dir, tmp_path):
    """`refdir steer DIR` without --vector generates with the model as it is (to try a run's checkpoint); with a
    vector it generates what the library's steering hooks give; steering options without a vector are refused."""
    from refdir.cli.main import app
    from refdir.core.chat import ChatFormat
    from refdir.core.generation import generate
    from refdir.core.models import load_model

    d = tiny_model_dir("qwen2")
    lm = load_model(d, dtype="fp32")
    fmt = ChatFormat(lm.tokenizer)
    sv = _sv(layers=(1, 2), seed=3)
    sv.save(tmp_path / "v")
    plain = generate(lm.model, fmt, ["hi there"], max_new_tokens=6, progress=False)[0]
    with steer(lm.model, sv, 8.0, positions="all"):
        steered = generate(lm.model, fmt, ["hi there"], max_new_tokens=6, progress=False)[0]
    assert plain != steered
    run = CliRunner().invoke
    base = ["steer", str(d), "--dtype", "fp32", "--prompt", "hi there", "--max-new-tokens", "6"]
    r = run(app, base)
    assert r.exit_code == 0, r.output
    assert r.stdout == f"hi there\n  → {plain}\n\n"
    r = run(app, [*base, "--vector", str(tmp_path / "v.safetensors"), "--coeff", "8"])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"hi there\n  → {steered}\n\n"
    r = run(app, [*base, "--mode", "ablate"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "give --vector" in r.output


def test_cli_steer_chat_keeps_the_conversation(tiny_model_dir):
    """Interactive `refdir steer`: each answer sees the conversation so far (the tokenizer's template renders the
    turns); /reset forgets it."""
    from refdir.cli.main import app
    from refdir.core.chat import ChatFormat
    from refdir.core.generation import generate
    from refdir.core.models import load_model

    d = tiny_model_dir("qwen2")
    lm = load_model(d, dtype="fp32")
    fmt = ChatFormat(lm.tokenizer)

    def answer(turns):
        return generate(lm.model, fmt, [turns], max_new_tokens=5, progress=False)[0]

    first = answer([{"role": "user", "content": "hi there"}])
    second = answer([{"role": "user", "content": "hi there"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "and then"}])
    alone = answer([{"role": "user", "content": "and then"}])
    assert second != alone  # the history changes the answer on this model, so the test can tell
    assert "<|user|>\nhi there<|end|>" in fmt.render([{"role": "user", "content": "hi there"},
                                                      {"role": "assistant", "content": first},
                                                      {"role": "user", "content": "and then"}])
    r = CliRunner().invoke(app, ["steer", str(d), "--dtype", "fp32", "--max-new-tokens", "5"],
                           input="hi there\nand then\n/reset\nand then\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{first}\n{second}\n{alone}\n"  # piped in: the answers alone, no prompt
