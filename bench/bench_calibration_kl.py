"""Where the run's calibration KL comes from: the first-token KL(base ‖ plain ablation) of the run's direction on
the harmless prompts its pick is calibrated on (the first ``CALIBRATION_PROMPTS`` harmless train prompts) and on
its harmless test split, split by whether the base model refuses the prompt (the run's judge, ``HARMLESS_TOKENS``
greedy tokens). A prompt the base model over-refuses is one the edit is meant to change, so its share of the KL
says whether the target binds on intended changes or on the harmless prompts themselves.

    python bench/bench_calibration_kl.py RUN
"""

from __future__ import annotations

import argparse

import torch

from refdir.core.forward import last_logits
from refdir.core.generation import generate
from refdir.core.interventions import ablate
from refdir.core.rundir import RunDir
from refdir.method.refusal_judge import judge
from refdir.method.scoring import first_token_kl
from refdir.workflows.finish import HARMLESS_TOKENS
from refdir.workflows.optimize import OptimizeSettings, open_context
from refdir.workflows.search import CALIBRATION_PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a finished `refdir run` directory")
    ap.add_argument("--batch", type=int, default=20)
    a = ap.parse_args()
    ctx = open_context(a.run, OptimizeSettings().check())
    m, fmt = ctx.model, ctx.fmt
    rd = RunDir(a.run)
    sets, judge_kind = rd.sets(), rd.config().get("judge", "broad")
    for split, n in (("train", CALIBRATION_PROMPTS), ("test", None)):
        prompts = sets["harmless"][split][:n]
        base = torch.log_softmax(last_logits(m, fmt, prompts, a.batch, shared_prefix=True).double(), -1)
        outs = generate(m, fmt, prompts, max_new_tokens=HARMLESS_TOKENS, batch_size=a.batch, progress=False)
        refused = torch.tensor(judge(outs, judge_kind).flags)
        with ablate(m, ctx.direction.vector):
            kl = first_token_kl(base, last_logits(m, fmt, prompts, a.batch, shared_prefix=True))
        print(f"harmless {split} ({len(prompts)} prompts, {judge_kind} judge): the base model refuses "
              f"{int(refused.sum())}; KL of the plain ablation: all {kl.mean():.4f}, without the refused "
              f"{kl[~refused].mean():.4f}, the refused ones' share of the sum "
              f"{float(kl[refused].sum() / kl.sum()):.2f}", flush=True)


if __name__ == "__main__":
    main()
