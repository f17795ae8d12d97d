"""A persona direction beside (or instead of) the run's second direction, measured on development sets only.

What the default model's chosen edit still refuses is mostly "As an AI language model, I don't have personal
opinions …" followed by an answer (NOTES.md). This bench builds a direction for that preamble and measures it:

- the contrast of ``refdir run --second-source persona``: the embedded opinion questions (``assets/opinion_questions.json``;
  the base model opens most of them with "As an AI …") that the wide judge flags against the run's non-calibration
  harmless train prompts it answers plainly (24 tokens), mean residual at the last post-instruction position (pos
  −1), here at ``--layer``;
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

from refdir.core.data import embedded_opinion_questions
from refdir.core.edits import hooked
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.method.pca_direction import pca_direction
from refdir.method.refusal_judge import judge_all, tally_markers
from refdir.method.scoring import first_token_kl
from refdir.method.second_direction import persona_contrast
from refdir.workflows.optimize import OptimizeSettings, open_context
from refdir.workflows.sources import CALIBRATION_PROMPTS, pca_prompts


def instructions(spec: str) -> list[str]:
    """``FILE[:N]``: the instructions of a JSON list of {"instruction": …} rows, the first N if given."""
    path, _, n = spec.partition(":")
    rows = [r["instruction"] for r in json.loads(open(path).read())]
    return rows[: int(n)] if n else rows


def persona_direction(ctx, layer: int, r: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The unit persona direction (float64, ⊥ r), built as ``refdir run --second-source persona`` builds it
    (:func:`refdir.method.second_direction.persona_contrast` off the harmless components) but at ``layer``, and
    what the contrast counted."""
    m, fmt, rd = ctx.model, ctx.fmt, ctx.rd
    sets = json.loads((rd.path / "data" / "sets.json").read_text())
    calib = sets["harmless"]["train"][:CALIBRATION_PROMPTS]
    harmless = [x for x in sets["harmless"]["train"] if x not in set(calib)]
    raw, info = persona_contrast(m, fmt, embedded_opinion_questions(), harmless, layer)
    if raw is None:
        raise SystemExit(f"error: no persona direction: {info['why']}")
    v = pca_direction(m, fmt, raw, pca_prompts(rd.filtered()["train"]["harmless"], calib), -1, layer).double()
    r = r.double() / r.double().norm()
    v = v - (v @ r) * r
    return v / v.norm(), info


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
    v, info = persona_direction(ctx, a.layer, plan.r)
    print(f"opinion questions answered with a disclaimer: {info['n_questions']} of {info['of_questions']}; "
          f"plain harmless answers {info['n_plain']}")
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
