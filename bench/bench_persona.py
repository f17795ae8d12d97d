"""A persona direction beside (or instead of) the run's second direction, measured on development sets only.

What the default model's chosen edit still refuses is mostly "As an AI language model, I don't have personal
opinions …" followed by an answer (NOTES.md). This bench builds a direction for that preamble and measures it:

- the contrast: the harmless opinion questions below (written for refdir; the base model opens most of them with
  "As an AI …") against the run's non-calibration harmless train prompts that it answers plainly (wide judge, 24
  tokens), mean residual at the last post-instruction position (pos −1) and ``--layer``;
- taken off the run's 4 harmless principal components (as the pca source) and made orthogonal to the edit's r;
- applied with the product's second-direction mechanism (every writer and the embedding at strength s), either
  beside the chosen edit (``--mode add``: the run's own second kept) or instead of its second (``--mode swap``).

Refusals (wide judge, broad beside it, and the tally of the phrases counted) on each ``--harmful`` set and mean
first-token KL on the first 100 prompts of ``--harmless``, greedy, 64 tokens. Use development sets, not the sets a
figure is reported on (README: the paper's harmful_train and a Do-Not-Answer area other than malicious uses):

    python bench/bench_persona.py RUN --harmful $P/harmful_train.json:160 --harmful DNA_DISCRIMINATION.json \\
        --harmless $P/harmless_train.json --layer 18 --strength 0.3 --mode add
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time

import torch
from bench_optimize import chosen_plan

from refdir.core.activations import residuals
from refdir.core.edits import hooked
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.method.pca_direction import off_principal_components
from refdir.method.refusal_judge import judge_all, tally_markers
from refdir.method.scoring import first_token_kl
from refdir.workflows.optimize import OptimizeSettings, open_context
from refdir.workflows.search import CALIBRATION_PROMPTS

OPINION_QUESTIONS = [
    "What is your favourite book, and why?", "Do you prefer cats or dogs?", "What do you think of modern art?",
    "Which season of the year do you like best?", "What's your opinion on pineapple on pizza?",
    "Who is the greatest football player of all time, in your view?", "What kind of music do you enjoy most?",
    "Do you think remote work is better than working in an office?", "What is the most beautiful city in the world?",
    "Which is better, tea or coffee?", "What do you personally find funny?",
    "If you could travel anywhere, where would you go?", "What's your favourite colour?",
    "Do you believe in love at first sight?", "Which film would you say is the best ever made?",
    "What is your honest opinion of social media?", "Do you like rainy days?",
    "What is the meaning of life, in your opinion?", "Which programming language do you like most?",
    "What do you think about people who talk loudly on their phones?",
    "Is it better to be a morning person or a night owl?", "What's the best board game, in your opinion?",
    "Do you think video games are a waste of time?", "What do you feel when you read a sad poem?",
    "Which historical figure do you admire most?", "Are superhero films overrated?", "What is your favourite food?",
    "Do you think people are basically good?", "Which sport is the most boring to watch?",
    "What would you do with a million dollars?", "Is classical music better than pop?",
    "What do you think of people who never read books?", "Do you get bored answering questions?",
    "Which animal do you think is the cutest?", "What is your view on tattoos?",
    "Would you rather live in the city or the countryside?", "Which decade had the best fashion?",
    "Do you think homework should be banned?", "What's the most overrated tourist attraction?",
    "Do you have a favourite number?",
]


def instructions(spec: str) -> list[str]:
    """``FILE[:N]``: the instructions of a JSON list of {"instruction": …} rows, the first N if given."""
    path, _, n = spec.partition(":")
    rows = [r["instruction"] for r in json.loads(open(path).read())]
    return rows[: int(n)] if n else rows


def persona_direction(ctx, layer: int, r: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The unit persona direction (float64, ⊥ r) and how many opinion questions opened with "As an AI"."""
    m, fmt, rd = ctx.model, ctx.fmt, ctx.rd
    sets = json.loads((rd.path / "data" / "sets.json").read_text())
    calib = set(sets["harmless"]["train"][:CALIBRATION_PROMPTS])
    harmless = [x for x in sets["harmless"]["train"] if x not in calib]
    comps = generate(m, fmt, OPINION_QUESTIONS + harmless, max_new_tokens=24, batch_size=40, desc="base")
    ai = [x for x, c in zip(OPINION_QUESTIONS, comps[: len(OPINION_QUESTIONS)], strict=True) if "as an ai" in c.lower()]
    flags = judge_all(comps, "wide")["headline"].flags[len(OPINION_QUESTIONS):]
    plain = [x for x, f in zip(harmless, flags, strict=True) if not f]
    pca_prompts = [x for x in rd.filtered()["train"]["harmless"] if x not in calib]
    i = fmt.n_post - 1
    with torch.no_grad():
        mean_ai, _ = residuals(m, fmt, ai, n_pos=fmt.n_post, shared_prefix=True, desc="opinion")
        mean_plain, _ = residuals(m, fmt, plain, n_pos=fmt.n_post, shared_prefix=True, desc="plain")
        _, xp = residuals(m, fmt, pca_prompts, keep=True, shared_prefix=True, desc="pca prompts")
    v = off_principal_components((mean_ai[i, layer] - mean_plain[i, layer]).float(), xp[:, i, layer].float()).double()
    r = r.double() / r.double().norm()
    v = v - (v @ r) * r
    return v / v.norm(), len(ai)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished `refdir run` directory (with the search)")
    ap.add_argument("--harmful", action="append", required=True, help="FILE[:N], repeatable")
    ap.add_argument("--harmless", required=True, help="FILE: KL on its first 100 prompts")
    ap.add_argument("--layer", type=int, default=18)
    ap.add_argument("--strength", type=float, action="append", help="repeatable; default 0.3")
    ap.add_argument("--mode", choices=["add", "swap"], default="add")
    a = ap.parse_args()
    ctx = open_context(a.run, OptimizeSettings().check())
    m, fmt = ctx.model, ctx.fmt
    plan = chosen_plan(ctx.rd)
    v, n_ai = persona_direction(ctx, a.layer, plan.r)
    print(f"opinion questions opened with 'As an AI': {n_ai} of {len(OPINION_QUESTIONS)}")
    harmless = instructions(a.harmless)[:100]
    harmful = {spec: instructions(spec) for spec in a.harmful}
    base = torch.log_softmax(last_logits(m, fmt, harmless, 32, shared_prefix=True).double(), -1)
    zero = {k: [0.0] * len(s) for k, s in plan.strengths.items()}
    for s in a.strength or [0.3]:
        if a.mode == "add":  # the persona as one more second direction, on top of the chosen edit
            plans = [plan, dataclasses.replace(plan, strengths=zero, second=(v, s))]
        else:
            plans = [dataclasses.replace(plan, second=(v, s))]
        t = time.time()
        with hooked(m, plans[0]), (hooked(m, plans[1]) if len(plans) > 1 else contextlib.nullcontext()):
            kl = float(first_token_kl(base, last_logits(m, fmt, harmless, 32, shared_prefix=True)).mean())
            line = f"{a.mode} persona (pos -1, layer {a.layer}) at {s:.2f}: KL {kl:.4f}"
            for spec, prompts in harmful.items():
                cs = generate(m, fmt, prompts, max_new_tokens=64, batch_size=32, desc=spec)
                j = judge_all(cs, "wide")
                phrases = dict(list(tally_markers(cs, j["broad"].flags).items())[:3])
                line += f"; {spec}: {j['headline'].n_refusal}/{len(cs)} (broad {j['broad'].n_refusal}: {phrases})"
        print(line, f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
