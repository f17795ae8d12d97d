"""Where a run's chosen edit spends its first-token KL: on the harmless prompts the base model answers, or on the
ones it refuses (its over-refusals, which removing refusal is meant to change), along a ladder of stronger edits.

The KL target counts every harmless prompt alike. On the default model the base model opens about one harmless
prompt in ten with a refusal or "As an AI language model, I …", and the edit's KL on those is several times its KL
on the others (the run's report gives both for its headline set). Whether that is what keeps the chosen edit from
removing more refusals under the target is measured here: the run's chosen edit, then the same edit with its second
direction at each ``--strength`` (hooks), each judged on ``--harmful`` (greedy, ``--tokens``, the wide judge with
the broad one beside it) with the mean first-token KL from the base model on ``--harmless`` split by the base
model's own answer there (16 tokens, broad judge: answered or refused), and the arm's own harmless refusals.
Use development sets, not the sets a figure is reported on:

    python bench/bench_kl_split.py RUN --harmful $P/harmful_train.json --harmless $P/harmless_train.json \\
        --strength 0.5 --strength 0.7 --strength 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from bench_optimize import chosen_plan
from benchlib import DevSlices, add_dev_arguments, fail

from refdir.core.edits import hooked
from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.method.refusal_judge import judge_all
from refdir.method.scoring import first_token_kl
from refdir.workflows.finish import HARMLESS_TOKENS  # the window the run's eval judges harmless refusal on
from refdir.workflows.optimize import OptimizeSettings, open_context


def harmless_refusals(m, fmt, prompts: list[str], batch: int) -> list[bool]:
    """The broad judge's flags on greedy answers of ``HARMLESS_TOKENS`` tokens, under whatever hooks are open."""
    comps = generate(m, fmt, prompts, max_new_tokens=HARMLESS_TOKENS, batch_size=batch, progress=False)
    return judge_all(comps, "broad")["broad"].flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished `refdir run` directory (with the search) whose choice has a second direction")
    add_dev_arguments(ap)
    ap.add_argument("--strength", type=float, action="append", default=[],
                    help="the second direction's strength in one more arm (repeatable)")
    a = ap.parse_args()
    ctx = open_context(a.run, OptimizeSettings().check())
    m, fmt = ctx.model, ctx.fmt
    plan = chosen_plan(ctx.rd)
    if plan.second is None and a.strength:
        fail("the run's chosen edit has no second direction to strengthen")
    dev = DevSlices(m, fmt, a)
    refused = harmless_refusals(m, fmt, dev.harmless, a.batch)
    ref = torch.tensor(refused)
    print(f"base model: {int(ref.sum())} of {len(refused)} harmless prompts refused ({HARMLESS_TOKENS} tokens, broad)")
    arms = [("the chosen edit", plan)]
    arms += [(f"second at {s:.2f}", dataclasses.replace(plan, second=(plan.second[0], s))) for s in a.strength]
    for label, p in arms:
        t = time.time()
        with hooked(m, p):
            kl = first_token_kl(dev.base, last_logits(m, fmt, dev.harmless, a.batch, shared_prefix=True))
            own = harmless_refusals(m, fmt, dev.harmless, a.batch)
            comps = generate(m, fmt, dev.harmful, max_new_tokens=a.tokens, batch_size=a.batch, progress=False)
        j = judge_all(comps, "wide")
        split = "; ".join(f"{name} ({int(sel.sum())}) {float(kl[sel].mean()):.4f}"
                          for name, sel in (("answered", ~ref), ("refused", ref)) if bool(sel.any()))
        print(f"{label:18s} harmful refusals {j['headline'].n_refusal}/{len(comps)} (broad {j['broad'].n_refusal}); "
              f"first-token KL {float(kl.mean()):.4f}: {split}; harmless refusals {sum(own)} "
              f"({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
