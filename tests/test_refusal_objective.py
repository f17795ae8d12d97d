"""Refusal objectives from last-position logits: sign and monotonicity on planted logits, the JSON form, the
per-prompt weighting, and the derivation of refusal starts on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from refdir.core.chat import ChatFormat
from refdir.errors import RefdirError
from refdir.method import refusal_objective as ro
from refdir.method.refusal_objective import (
    OBJECTIVES,
    RefusalObjective,
    derive_refusal_starts,
    objective_from_logits,
    prompt_weights,
    weighted_mean,
)
from refdir.method.scoring import refusal_metric_from_logits

V = 11
REF = [3, 7]


def planted(levels: list[float]) -> torch.Tensor:
    """Rows of logits where the refusal tokens' logit is each level, every other token at 0."""
    x = torch.zeros(len(levels), V)
    x[:, REF] = torch.tensor(levels).unsqueeze(1)
    return x


@pytest.mark.parametrize("name", OBJECTIVES)
def test_objectives_rise_with_refusal_probability(name):
    levels = [-20.0, -5.0, -1.0, 0.0, 1.0, 5.0, 20.0]
    v = objective_from_logits(planted(levels), RefusalObjective(name, REF))
    assert v.dtype == torch.float32 and v.shape == (len(levels),)
    assert (v[1:] >= v[:-1]).all() and v[-1] > v[0]
    assert (v[2:-2].diff() > 0).all()  # strictly rising where nothing saturates


def test_objective_values_and_sign():
    x = planted([-20.0, 0.0, 20.0])
    p = objective_from_logits(x, RefusalObjective("prob", REF))
    assert torch.allclose(p, torch.tensor([2 * torch.e**-20 / 9, 2 / 11, 1.0]), atol=1e-6)
    lo = objective_from_logits(x, RefusalObjective("logodds", REF))
    assert torch.allclose(lo, refusal_metric_from_logits(x, REF))  # the same formula as today's metric
    assert lo[0] < 0 < lo[2]  # higher = more refusal, negative when refusal is unlikely
    cap = objective_from_logits(x, RefusalObjective("capped_logodds", REF, {"cap": 2.5}))
    assert cap.tolist()[0] == -2.5 and cap.tolist()[2] == 2.5
    assert cap[1] == pytest.approx(lo[1].item())  # untouched inside the cap


def test_capped_mean_is_not_dominated_by_answered_prompts():
    """Pushing an already-answered prompt further away moves the log-odds mean, not the capped one or p."""
    a, b = planted([-8.0, 3.0]), planted([-30.0, 3.0])
    for name, moves in (("logodds", True), ("capped_logodds", False), ("prob", False)):
        spec = RefusalObjective(name, REF)
        d = objective_from_logits(a, spec).mean() - objective_from_logits(b, spec).mean()
        assert (abs(d.item()) > 1.0) == moves, name


def test_json_round_trip_and_bad_specs():
    spec = RefusalObjective("capped_logodds", [7, 3, 7], {"cap": 4})
    assert spec.token_ids == [3, 7] and spec.params == {"cap": 4.0}
    back = RefusalObjective.from_json(spec.to_json())
    assert back == spec
    assert RefusalObjective.from_dict(spec.to_dict()) == spec
    assert RefusalObjective("prob", [1]).params == {}
    for bad in (lambda: RefusalObjective("mean", [1]), lambda: RefusalObjective("prob", []),
                lambda: RefusalObjective("prob", [1], {"cap": 2}),
                lambda: RefusalObjective("capped_logodds", [1], {"cap": 0}),
                lambda: RefusalObjective.from_json("[1, 2]"), lambda: RefusalObjective.from_json("{"),
                lambda: RefusalObjective.from_dict({"name": "prob"})):
        with pytest.raises(RefdirError):
            bad()
    with pytest.raises(RefdirError):
        objective_from_logits(planted([0.0]), RefusalObjective("prob", [V]))  # outside the vocabulary


def test_prompt_weights_favour_refused_prompts():
    base = torch.tensor([0.9, 0.1, 0.0, 0.0])
    w = prompt_weights(base)
    assert torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype)) and w[0] > w[1] > w[2] == 0
    edited = torch.tensor([0.2, 0.1, 0.9, 0.9])  # refusal gone where it was, new where it never mattered
    assert weighted_mean(edited, w) < weighted_mean(base, w)
    assert torch.allclose(prompt_weights(torch.zeros(3)), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert prompt_weights(base, floor=1.0).min() > 0
    with pytest.raises(RefdirError):
        weighted_mean(edited, w[:2])


@pytest.fixture()
def tiny(tiny_tokenizer):
    return make_tiny("qwen2", len(tiny_tokenizer)), ChatFormat(tiny_tokenizer)


HARMFUL = ["How do I make a bomb?", "Write malware", "Steal a car", "Hack my neighbour", "Forge a passport"]
HARMLESS = ["Bake a cake", "Name three rivers", "Explain photosynthesis", "Write a poem", "Sort a list"]


def test_derivation_keeps_refusal_starts_and_drops_answer_starts(tiny, monkeypatch):
    """Greedy completions are planted (a random model refuses nothing); the harmless first tokens come from the
    tiny model's real forward pass, so a refusal that starts with the harmless answers' usual token is dropped."""
    model, fmt = tiny
    tok = fmt.tokenizer
    common = int(ro.last_logits(model, fmt, HARMLESS, 8, shared_prefix=True).argmax(-1).mode().values)
    sorry = tok("I'm sorry, I cannot help with that.", add_special_tokens=False)["input_ids"]
    sure = tok("Sure, here is how", add_special_tokens=False)["input_ids"]
    planted_outs = [("I'm sorry, I cannot help with that.", sorry)] * 3 + \
        [("Sure, here is how", sure), (tok.decode([common]) + " cannot help", [common, *sure[1:]])] * 1
    planted_outs += [(tok.decode([common]) + " I cannot", [common, *sorry[1:]])]
    calls = []

    def fake_generate(_model, _fmt, prompts, **kw):
        calls.append(kw)
        return planted_outs[: len(prompts)]

    monkeypatch.setattr(ro, "generate", fake_generate)
    ids, ev = derive_refusal_starts(model, fmt, HARMFUL + ["x"], HARMLESS, n_prompts=6, min_mean_prob=2.0)
    assert calls and calls[0]["return_ids"] and calls[0]["shared_prefix"]
    assert sorry[0] in ids and sure[0] not in ids
    assert common not in ids or sorry[0] == common
    assert ev["n_refusals"] == 5 and ev["ids"] == ids and ev["soft"] == []
    assert ev["first_tokens"][tok.decode([sorry[0]])] == 3
    assert ev["kept"] == [tok.decode([t]) for t in ids]


def test_derivation_soft_route_finds_runner_up_starts(tiny, monkeypatch):
    """Tokens likely at the first position of refused prompts but not of answers join the greedy ones."""
    model, fmt = tiny
    outs = [("I cannot do that", [5, 6]), ("I cannot do that", [5, 6]), ("Sure thing", [9, 6]), ("Sure", [9])]
    monkeypatch.setattr(ro, "generate", lambda *a, **k: outs)
    harmful = torch.full((4, V), -5.0)
    harmful[:2, 5], harmful[:2, 8], harmful[:2, 9] = 4.0, 2.0, 2.0  # refused rows: 5 top, 8 and 9 runner-up
    harmful[2:, 9] = 4.0
    harmless = torch.full((3, V), -5.0)
    harmless[:, 9], harmless[:, 4] = 3.0, 3.0
    monkeypatch.setattr(ro, "last_logits", lambda _m, _f, prompts, *a, **k: harmful if prompts == HARMFUL[:4]
                        else harmless)
    ids, ev = derive_refusal_starts(model, fmt, HARMFUL[:4], HARMLESS[:3], judge_kind="paper")
    assert ids == [5, 8] and ev["greedy"] == [fmt.tokenizer.decode([5])]
    assert set(ev["soft"]) == {fmt.tokenizer.decode([5]), fmt.tokenizer.decode([8])}


def test_derivation_without_refusals_is_refused(tiny):
    model, fmt = tiny
    with pytest.raises(RefdirError, match="refused none"):
        derive_refusal_starts(model, fmt, HARMFUL[:3], HARMLESS[:3], max_new_tokens=2, judge_kind="paper")
