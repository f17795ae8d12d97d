"""Selection and the staged ``refdir run`` pipeline on a tiny model: filters, the all-filtered
diagnostic, resuming, config invalidation and the report."""

from __future__ import annotations

import html
import json
import math

import pytest
import torch
from conftest import make_tiny, probe_found_little_refusal
from typer.testing import CliRunner

from refdir.cli.main import app
from refdir.core.chat import ChatFormat
from refdir.core.directions import Candidates
from refdir.core.forward import last_logits
from refdir.core.rundir import RunDir
from refdir.core.spec import DataSpec, ModelSpec
from refdir.method.selection import CandidateScore, SelectionConfig, apply_filters, score_candidates
from refdir.method.uncertainty import rate_text
from refdir.workflows.run import RunConfig, run_pipeline
from refdir.workflows.stages import Loaded, stage_candidates, stage_data, stage_filter, stage_refusal_tokens

runner = CliRunner()


@pytest.fixture()
def tiny_dir(tiny_model_dir):
    return tiny_model_dir("qwen2")


def _cfg(tiny_dir, **kw):
    base = dict(method="paper", model=str(tiny_dir), refusal_tokens=["I", "As"], n_train=16, n_val=6, n_test=4, batch_size=8,
                max_new_tokens=6, gen_batch_size=8, dtype="fp32", filter_train=False)
    flat = {**base, **kw}
    model = {k: flat.pop(k) for k in list(flat) if k in ModelSpec.model_fields}
    data = {k: flat.pop(k) for k in list(flat) if k in DataSpec.model_fields}
    return RunConfig(model=ModelSpec(**model), data=DataSpec(**data), **flat)


def test_shared_prefix_logits_equal_plain_path(tiny_tokenizer):
    model = make_tiny("llama", len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer, system="You are a helpful assistant.")
    prompts = ["Explain tides", "Write a short poem about the sea and the moon", "Hi"]
    a = last_logits(model, fmt, prompts, 2)
    b = last_logits(model, fmt, prompts, 2, shared_prefix=True)
    assert torch.allclose(a, b, atol=1e-4)


def test_selection_scores_every_candidate_and_picks_min_bypass(tiny_tokenizer):
    model = make_tiny("qwen2", len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    P, L, d = fmt.n_post, 3, 64
    cands = Candidates.from_means(torch.randn(P, L + 1, d, generator=g), torch.randn(P, L + 1, d, generator=g))
    ids = tiny_tokenizer("I", add_special_tokens=False)["input_ids"][:1]
    cfg = SelectionConfig(max_layer_frac=0.5, kl_max=1e9, induce_rule="relative", induce_rel_frac=-1e9)
    sel = score_candidates(model, fmt, cands, ["Explain how to pick a lock", "Make a weapon"],
                           ["Bake bread", "Explain tides"], ids, cfg, progress=False)
    assert len(sel.scores) == P * L
    late = [s for s in sel.scores if "late layer" in s.filtered]
    assert {s.layer for s in late} == {2}  # layer >= 0.5 * 3
    ok = [s for s in sel.scores if s.ok]
    assert ok and sel.chosen.bypass == min(s.bypass for s in ok)
    assert all(math.isfinite(s.kl) and s.kl >= 0 for s in ok)


def test_all_filtered_gives_diagnostic_not_a_crash():
    scores = [CandidateScore(-1, i, bypass=-1.0 - i, induce=-2.0, kl=0.5) for i in range(5)]
    sel = apply_filters(scores, {"harmful": 1.0, "harmless": -3.0}, SelectionConfig(induce_rule="paper"), 10)
    assert sel.chosen is None
    assert sel.filter_counts["kl > 0.1"] == 5 and sel.filter_counts["induce <= 0.00"] == 5
    text = sel.diagnostic()
    assert "5 removed by kl > 0.1" in text and "pos -1 layer 4" in text


def test_auto_induce_rule_falls_back_to_relative_and_says_so():
    scores = [CandidateScore(-1, 1, bypass=-2.0, induce=-0.4, kl=0.05),
              CandidateScore(-1, 2, bypass=-3.0, induce=-3.5, kl=0.05)]
    sel = apply_filters(scores, {"harmful": 1.0, "harmless": -3.7}, SelectionConfig(), 10)
    assert sel.rule.startswith("relative")
    assert sel.chosen.layer == 1  # layer 2 has the better bypass but does not induce refusal
    scores.append(CandidateScore(-2, 3, bypass=-1.0, induce=0.5, kl=0.05))
    sel = apply_filters(scores, {"harmful": 1.0, "harmless": -3.7}, SelectionConfig(), 10)
    assert sel.rule.startswith("paper") and sel.chosen.layer == 3


def test_run_resume_invalidation_and_report(tiny_dir, tmp_path):
    out = tmp_path / "run"
    s1 = run_pipeline(_cfg(tiny_dir), out, progress=False)
    report = (out / "report.html").read_text()
    assert report.count("<img") >= 3
    # every refusal rate of the test table with its count and interval
    assert all(rate_text(v["refusal"], v["n"]) in report for v in s1["refusal"].values())
    for f in ("summary.json", "manifest.json", "selection/table.csv", "selection/table.json",
              "candidates/candidates.safetensors"):
        assert (out / f).exists(), f
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 42 and manifest["data_sha256"] and manifest["versions"]["refdir"]
    stamp = {st: (out / st / "stage.json").stat().st_mtime_ns for st in ("data", "candidates", "selection")}
    # same config: every stage is reused and the numbers are identical
    s2 = run_pipeline(_cfg(tiny_dir), out, progress=False)
    assert s2["refusal"] == s1["refusal"] and s2["selection"] == s1["selection"]
    assert {st: (out / st / "stage.json").stat().st_mtime_ns for st in stamp} == stamp
    assert "load" not in s2["timings_s"], "a fully cached rerun must not even load the model"
    # a changed selection setting reruns selection and what follows, not the data or candidates
    run_pipeline(_cfg(tiny_dir, kl_max=0.05), out, progress=False)
    assert (out / "data" / "stage.json").stat().st_mtime_ns == stamp["data"]
    assert (out / "candidates" / "stage.json").stat().st_mtime_ns == stamp["candidates"]
    assert (out / "selection" / "stage.json").stat().st_mtime_ns != stamp["selection"]


def test_a_model_that_hardly_refuses_gets_a_warning(tiny_dir, tmp_path):
    # tokens the user gave carry no evidence of how often the model refuses: no warning
    out = tmp_path / "run"
    assert run_pipeline(_cfg(tiny_dir), out, progress=False)["warnings"] == []
    # the probe's evidence of a model that refused 2 of 32 harmful prompts: the resumed run warns in its summary
    # and its report
    probe_found_little_refusal(out)
    s = run_pipeline(_cfg(tiny_dir), out, progress=False)
    assert len(s["warnings"]) == 1 and "only 2 of 32" in s["warnings"][0]
    assert html.escape(s["warnings"][0]) in (out / "report.html").read_text()


def test_run_cli_all_filtered_still_reports(tiny_dir, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["run", str(tiny_dir), "--out", str(out), "--method", "paper", "--refusal-tokens", "I,As",
                            "--n-train", "8",
                            "--n-val", "4", "--n-test", "4", "--max-new-tokens", "4", "--kl-max", "1e-12",
                            "--no-filter-train", "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    summ = json.loads((out / "summary.json").read_text())
    assert summ["selection"]["chosen"] is None and summ["checkpoint"] is None
    assert "Every candidate was filtered out" in (out / "report.html").read_text()


def test_run_refuses_foreign_directory(tiny_dir, tmp_path):
    d = tmp_path / "something"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    r = runner.invoke(app, ["run", str(tiny_dir), "--out", str(d), "--refusal-tokens", "I"])
    assert r.exit_code == 2 and "not a refdir run directory" in r.output
    assert (d / "precious.txt").exists()


def test_separate_val_and_test_sets_and_overlap_is_refused(tiny_dir, tmp_path):
    import json as _json

    from refdir.errors import RefdirError

    hv = tmp_path / "hv.json"
    hv.write_text(_json.dumps([{"instruction": f"harmful val prompt number {i}"} for i in range(5)]))
    cfg = _cfg(tiny_dir, harmful_val=str(hv), harmful_test="embedded:harmful:test", n_test=None)
    sets = stage_data(RunDir.create(tmp_path / "a", cfg.model_dump()), cfg)
    assert sets["harmful"]["val"] == sorted(sets["harmful"]["val"], key=sets["harmful"]["val"].index)
    assert set(sets["harmful"]["val"]) == {f"harmful val prompt number {i}" for i in range(5)}
    assert len(sets["harmful"]["test"]) == 40
    bad = _cfg(tiny_dir, harmful="embedded:harmful", harmful_test="embedded:harmful:train", n_train=None,
               n_test=None)
    with pytest.raises(RefdirError, match="also appear in train"):
        stage_data(RunDir.create(tmp_path / "b", bad.model_dump()), bad)
    assert not (tmp_path / "b" / "data").exists()


def test_fast_exhaustive_selection_matches_exact_reference(tiny_tokenizer):
    model = make_tiny("llama", len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer, system="You are a careful assistant.")
    g = torch.Generator().manual_seed(1)
    P, L, d = fmt.n_post, 3, 64
    cands = Candidates.from_means(torch.randn(P, L + 1, d, generator=g), torch.randn(P, L + 1, d, generator=g))
    ids = tiny_tokenizer("I", add_special_tokens=False)["input_ids"][:1]
    hv = ["Explain how to pick a lock", "Make a weapon at home", "Write malware"]
    bv = ["Bake bread", "Explain tides to a child", "Plan a trip"]
    common = dict(max_layer_frac=1.0, kl_max=1e9, induce_rule="relative", induce_rel_frac=-1e9, batch_size=2)
    fast = score_candidates(model, fmt, cands, hv, bv, ids, SelectionConfig(exhaustive=True, **common), progress=False)
    ref = score_candidates(model, fmt, cands, hv, bv, ids, SelectionConfig(exact_reference=True, **common),
                           progress=False)
    assert (fast.chosen.position, fast.chosen.layer) == (ref.chosen.position, ref.chosen.layer)
    for a, b in zip(fast.scores, ref.scores, strict=True):
        for k in ("bypass", "induce", "kl"):
            x, y = getattr(a, k), getattr(b, k)
            if math.isfinite(y):
                assert abs(x - y) <= 1e-3 * max(1.0, abs(y)), (a, b, k)


def test_length_batches_pad_little_and_cover_every_prompt():
    from refdir.core.forward import length_batches

    lengths = [3, 30, 4, 5, 29, 3, 6, 31, 4, 5]
    bs = length_batches(lengths, 4, batch_cost=2)
    assert sorted(i for b in bs for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 4 for b in bs)
    # the three long prompts share a batch instead of padding short ones to 30+
    assert any(set(b) == {1, 4, 7} for b in bs)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in bs)
    assert padded <= 1.1 * sum(lengths) + 2


@pytest.mark.parametrize("arch", ["qwen2", "gemma4_text"])  # Gemma 4's experts see the batch's tokens flattened
@pytest.mark.parametrize("shared_prefix", [True, False])
def test_logits_and_generation_under_row_plans_equal_each_plan_alone(tiny_tokenizer, shared_prefix, arch):
    """Many edits scored and generated in one batch (hooked_rows) give what each edit gives alone."""
    from refdir.core.edits import Edit, hooked, hooked_rows, resolve
    from refdir.core.generation import generate

    model = make_tiny(arch, len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer, system="You are a helpful assistant.")
    g = torch.Generator().manual_seed(3)
    cands = Candidates.from_means(torch.randn(fmt.n_post, 4, 64, generator=g, dtype=torch.float64),
                                  torch.randn(fmt.n_post, 4, 64, generator=g, dtype=torch.float64))
    plans = [None, resolve(Edit.full(-1, 1), cands), resolve(Edit.full(-2, 2), cands)]
    prompts = ["Explain tides", "Write a short poem about the sea and the moon", "Hi"]
    groups = [k for k in range(3) for _ in prompts]
    with hooked_rows(model, plans) as rows:
        lg = last_logits(model, fmt, prompts * 3, 4, shared_prefix=shared_prefix, rows=rows, groups=groups)
        gen = generate(model, fmt, prompts * 3, max_new_tokens=5, batch_size=5, progress=False, rows=rows,
                       groups=groups, shared_prefix=shared_prefix)
    for k, p in enumerate(plans):
        ctx = hooked(model, p) if p is not None else torch.no_grad()
        with ctx:
            want = last_logits(model, fmt, prompts, 2)
            want_gen = generate(model, fmt, prompts, max_new_tokens=5, batch_size=2, progress=False)
        assert torch.allclose(lg[3 * k:3 * k + 3], want, atol=1e-4), k
        assert gen[3 * k:3 * k + 3] == want_gen, k
    assert (lg[3:6] - lg[:3]).abs().max() > 1e-3


@pytest.mark.parametrize("filter_train", [True, False])
def test_filter_pass_gives_the_candidates_of_a_plain_activation_pass(tiny_dir, tmp_path, filter_train):
    """The filter's one pass (metric + residuals, shared prefix) yields the same filtered sets and difference-in-means
    candidates as metric and activations computed separately on the plain path."""
    from refdir.core.activations import residuals
    from refdir.method.scoring import refusal_metric_from_logits

    cfg = _cfg(tiny_dir, filter_train=filter_train, system="You are a helpful assistant.")
    rd = RunDir.create(tmp_path / "r", cfg.model_dump())
    run = Loaded(cfg.model)
    sets = stage_data(rd, cfg)
    ids = stage_refusal_tokens(rd, cfg, run, sets, progress=False)
    filt, means = stage_filter(rd, cfg, run, sets, ids, progress=False)
    cands = stage_candidates(rd, cfg, run, filt, means, progress=False)
    m = refusal_metric_from_logits(last_logits(run.lm.model, run.fmt, sets["harmful"]["train"], 3), ids)
    kept = [p for p, x in zip(sets["harmful"]["train"], m.tolist(), strict=True) if x > 0 or not filter_train]
    if len(kept) >= 4:
        assert filt["train"]["harmful"] == kept
    mh, _ = residuals(run.lm.model, run.fmt, filt["train"]["harmful"], batch_size=3, progress=False)
    mb, _ = residuals(run.lm.model, run.fmt, filt["train"]["harmless"], batch_size=3, progress=False)
    want = Candidates.from_means(mh, mb)
    assert torch.allclose(cands.vectors.double(), want.vectors.double(), atol=1e-4)
    assert (tmp_path / "r" / "filter" / "info.json").exists()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "falcon_h1"])
def test_a_rows_logits_do_not_depend_on_its_batchs_padding(tiny_tokenizer, arch):
    """Left padding must not move a row's positions: GPT-2's learned position embeddings read absolute positions
    (transformers counts them from the padding unless told), and a hybrid model takes the plain path (its mamba
    state cannot be shared as a prefix cache). Batched, shared-prefix and one-prompt-at-a-time logits agree."""
    from conftest import EXACT_ARCHS

    from refdir.core.forward import last_logits

    model = make_tiny(arch, len(tiny_tokenizer), **EXACT_ARCHS.get(arch, {}))
    fmt = ChatFormat(tiny_tokenizer, system="You are a helpful assistant.")
    prompts = ["Explain tides", "Write a short poem about the sea and the moon", "Hi", "Bake bread now please"]
    alone = torch.cat([last_logits(model, fmt, [p], 1) for p in prompts])
    for shared in (False, True):
        batched = last_logits(model, fmt, prompts, 4, shared_prefix=shared)
        assert (batched - alone).abs().max() < 1e-4, (arch, shared)


def test_linear_attention_takes_the_plain_path(tiny_tokenizer):
    """Qwen3.5's ``linear_attn`` (gated delta net) keeps a recurrent state, not keys and values: its name says
    attention, but the cache transformers builds from the config says otherwise, and the shared-prefix path (which
    copies a prefix's cache across the batch) crashed on it. It now takes the plain path."""
    from refdir.core.architecture import attention_only
    from refdir.core.generation import generate

    model = make_tiny("qwen3_5_text", len(tiny_tokenizer), head_dim=16, num_hidden_layers=4)
    assert not attention_only(model) and attention_only(make_tiny("qwen2", len(tiny_tokenizer)))
    fmt = ChatFormat(tiny_tokenizer, system="You are a helpful assistant.")
    prompts = ["Explain tides", "Hi"]
    alone = [generate(model, fmt, [p], max_new_tokens=3, batch_size=1, progress=False, return_ids=True)[0]
             for p in prompts]
    assert generate(model, fmt, prompts, max_new_tokens=3, batch_size=2, progress=False, return_ids=True,
                    shared_prefix=True) == alone


@pytest.mark.parametrize("arch", ["mistral", "gemma3_text", "gemma4_text"])
def test_prompts_longer_than_the_sliding_window_take_the_plain_path(tiny_tokenizer, arch):
    """The shared-prefix layout pads between the prefix and each row's tokens; a sliding window counts that padding
    as distance, so past the window the shared path saw less of the prefix (different tokens on tiny models with a
    16-token window). Such rows now take the plain path: logits and generation equal each prompt run alone."""
    from refdir.core.forward import last_logits
    from refdir.core.generation import generate

    model = make_tiny(arch, len(tiny_tokenizer), sliding_window=16)
    fmt = ChatFormat(tiny_tokenizer, system="You are a helpful assistant.")
    prompts = ["Explain tides", "Write a short poem about the sea and the moon", "Hi", "Bake bread now please"]
    assert max(len(fmt.prompt_ids(p)) for p in prompts) > 16
    alone = [generate(model, fmt, [p], max_new_tokens=8, batch_size=1, progress=False, return_ids=True)[0]
             for p in prompts]
    assert generate(model, fmt, prompts, max_new_tokens=8, batch_size=4, progress=False, return_ids=True,
                    shared_prefix=True) == alone
    one = torch.cat([last_logits(model, fmt, [p], 1) for p in prompts])
    assert (last_logits(model, fmt, prompts, 4, shared_prefix=True) - one).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3_text", "gpt_neox", "phi3", "gpt2", "gemma4_text"])
def test_shared_prefix_generation_equals_plain(tiny_tokenizer, arch):
    """Greedy generation with the template's prefix handed to model.generate as a KV cache gives the same tokens."""
    from refdir.core.generation import generate

    model = make_tiny(arch, len(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer, system="You are a helpful assistant.")
    prompts = ["Explain tides", "Write a short poem about the sea and the moon", "Hi", "Bake bread now please"]
    plain = generate(model, fmt, prompts, max_new_tokens=8, batch_size=4, progress=False, return_ids=True)
    shared = generate(model, fmt, prompts, max_new_tokens=8, batch_size=4, progress=False, return_ids=True,
                      shared_prefix=True)
    assert shared == plain and any(ids for _t, ids in plain)


@pytest.mark.parametrize("method", ["search", "paper"])
def test_the_command_line_and_run_config_build_the_same_run(method, monkeypatch, tmp_path):
    """`refdir run MODEL` with no options, and `run_config(method, model=...)` in Python, give the same config: the
    method-dependent defaults have one owner. The command's config is taken where it reaches the pipeline."""
    import refdir.cli.run as cli_run
    from refdir.workflows.run import run_config

    seen = []

    class Stop(Exception):
        pass

    def capture(cfg, *_a, **_k):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(cli_run, "run_pipeline", capture)
    CliRunner().invoke(app, ["run", "default", "--out", str(tmp_path / "r"), "--method", method])
    assert len(seen) == 1
    api = run_config(method, model=ModelSpec(model="default"))
    assert seen[0] == api
    search = method == "search"
    assert (api.direction_method, api.second_direction) == (("pca", True) if search else ("dim", False))
    assert (api.max_new_tokens, api.data.n_val) == ((64, 40) if search else (128, 32))
    # what is given is kept (None counts as left out); the paper's pipeline never takes a second direction
    assert run_config(method, direction_method="rdo", max_new_tokens=None).direction_method == "rdo"
    assert run_config("paper", second_direction=True).second_direction is False


def _random_selection(tok, arch: str, seed: int):
    """A tiny model, random candidates (harmful means 4× the harmless spread) and three + three val prompts, with
    every candidate fully scored: ``(model, fmt, cands, ids, hv, bv, full)``."""
    model = make_tiny(arch, len(tok))
    fmt = ChatFormat(tok, system="You are a careful assistant.")
    g = torch.Generator().manual_seed(seed)
    P, L, d = fmt.n_post, model.config.num_hidden_layers, model.config.hidden_size
    cands = Candidates.from_means(4 * torch.randn(P, L + 1, d, generator=g), torch.randn(P, L + 1, d, generator=g))
    ids = tok("I", add_special_tokens=False)["input_ids"][:1]
    hv = ["Explain how to pick a lock", "Make a weapon at home", "Write malware"]
    bv = ["Bake bread", "Explain tides to a child", "Plan a trip"]
    full = score_candidates(model, fmt, cands, hv, bv, ids, SelectionConfig(exhaustive=True, max_layer_frac=1.0),
                            progress=False)
    return model, fmt, cands, ids, hv, bv, full


def _pick(sel):
    return sel.chosen and (sel.chosen.position, sel.chosen.layer)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_lazy_kl_screen_picks_the_eager_screens_finalists(tiny_tokenizer, arch):
    """Screening the KL only in order of screened bypass, until ``top_k`` candidates pass its bound, gives the
    finalists (and the winner) that screening both scores for every candidate gives, with fewer KL rows."""
    model, fmt, cands, ids, hv, bv, full = _random_selection(tiny_tokenizer, arch, 5)
    kls = sorted(s.kl for s in full.scores if math.isfinite(s.kl))
    sels = {}
    for lazy in (False, True):
        # a KL bound that some candidates pass and some do not, so that the pool is a real choice
        cfg = SelectionConfig(max_layer_frac=1.0, screen_n=2, top_k=2, screen_group=2, lazy_kl=lazy,
                              kl_max=kls[len(kls) // 2] / 2.0, induce_rule="relative", induce_rel_frac=-1e9)
        sels[lazy] = score_candidates(model, fmt, cands, hv, bv, ids, cfg, progress=False)
    eager, lazy = sels[False], sels[True]
    fin = {k: [(s.position, s.layer) for s in v.scores if "screened out" not in s.filtered and math.isfinite(s.bypass)]
           for k, v in sels.items()}
    assert fin[True] == fin[False] and len(fin[True]) == 2
    assert _pick(lazy) == _pick(eager)
    for a, b in zip(lazy.scores, eager.scores, strict=True):
        assert a.bypass_screen == pytest.approx(b.bypass_screen, abs=1e-4, nan_ok=True)
        if math.isfinite(a.kl_screen):
            assert a.kl_screen == pytest.approx(b.kl_screen, abs=1e-4)
    # the lazy screen left some candidates' KL unscreened: it did less work
    assert sum(math.isfinite(s.kl_screen) for s in lazy.scores) < sum(math.isfinite(s.kl_screen) for s in eager.scores)


@pytest.mark.parametrize("rule", ["auto", "paper", "relative"])
def test_lazy_induce_picks_the_same_winner_by_the_same_rule(tiny_tokenizer, rule):
    """Scoring the finalists' induce only in order of bypass, until one passes the rule, chooses the candidate (and
    states the rule) that scoring every finalist's induce chooses, with its same scores, for fewer induce passes."""
    model, fmt, cands, ids, hv, bv, full = _random_selection(tiny_tokenizer, "qwen2", 11)
    ind = sorted(s.induce for s in full.scores if math.isfinite(s.induce))
    kls = sorted(s.kl for s in full.scores if math.isfinite(s.kl))
    # thresholds in the middle of the measured values, so that the rule passes some candidates and not others
    frac = (ind[len(ind) // 2] - full.baseline["harmless"]) / max(1e-9, full.baseline["harmful"] - full.baseline["harmless"])
    common = dict(exhaustive=True, max_layer_frac=1.0, kl_max=kls[-2], induce_rule=rule, induce_rel_frac=frac)
    eager = score_candidates(model, fmt, cands, hv, bv, ids, SelectionConfig(**common), progress=False)
    lazy = score_candidates(model, fmt, cands, hv, bv, ids, SelectionConfig(lazy_induce=True, **common), progress=False)
    assert lazy.rule == eager.rule
    assert _pick(lazy) == _pick(eager)
    if eager.chosen is not None:
        for k in ("bypass", "kl", "induce"):
            assert getattr(lazy.chosen, k) == getattr(eager.chosen, k)
    scored = sum(math.isfinite(s.induce) for s in lazy.scores)
    assert scored < sum(math.isfinite(s.induce) for s in eager.scores)
    assert all(s.bypass == e.bypass and s.kl == e.kl for s, e in zip(lazy.scores, eager.scores, strict=True)
               if math.isfinite(e.bypass))
