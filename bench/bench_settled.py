"""Stopping a row once its refusal verdict is settled: the same verdicts, fewer tokens.

Greedy generation as the run's evaluation does it (one batch, shared prefix, the default model), once with every
row running to its window and once with ``decided=refusal_settled`` (a row ends at the first token where a paper
refusal phrase and three distinct words are among its complete words). Prints the wall time and the generated
row-tokens of each, and whether the three judges (paper, broad, wide) flag the same completions and count the same
degenerate ones. Without a run, the unedited model; with ``--run RUN_DIR``, also the run's chosen edit (hooks),
as the evaluation's arms.

    python bench/bench_settled.py [--harmful FILE.json] [--tokens 64] [--dtype fp32] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import fail

from refdir.core.chat import ChatFormat
from refdir.core.data import embedded
from refdir.core.edits import Edit, hooked, resolve
from refdir.core.generation import generate
from refdir.core.models import load_model
from refdir.core.rundir import RunDir
from refdir.errors import RefdirError
from refdir.method.refusal_judge import judge_all, refusal_settled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--harmful", help="a JSON list of prompts (or of records with 'instruction'); "
                                      "default: the embedded harmful test split")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--run", help="a run directory: its chosen edit is measured too")
    a = ap.parse_args()
    if a.harmful:
        try:
            rec = json.loads(Path(a.harmful).read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read {a.harmful}: {e}")
        prompts = [r["instruction"] if isinstance(r, dict) else r for r in rec]
    else:
        prompts = embedded("harmful", "test").instructions
    choice = None
    if a.run:
        try:
            rd = RunDir(a.run)
            summ = json.loads((Path(a.run) / "summary.json").read_text())
            choice = resolve(Edit.from_dict(summ["choice"]["edit"]), rd.candidates_with_sources())
        except (OSError, ValueError, KeyError, RefdirError) as e:
            fail(f"cannot read the run's chosen edit: {e}")
    lm = load_model("default", dtype=a.dtype)
    fmt = ChatFormat(lm.tokenizer)
    print(f"{len(prompts)} prompts, up to {a.tokens} new tokens, dtype {lm.dtype}")
    arms = {"base": None} | ({"chosen": choice} if choice is not None else {})
    for name, plan in arms.items():
        outs, secs = {}, {}
        for stop in (False, True):
            t = time.perf_counter()
            if plan is None:
                outs[stop] = _gen(lm.model, fmt, prompts, a.tokens, stop)
            else:
                with hooked(lm.model, plan):
                    outs[stop] = _gen(lm.model, fmt, prompts, a.tokens, stop)
            secs[stop] = time.perf_counter() - t
        n = {k: sum(len(ids) for _t, ids in v) for k, v in outs.items()}
        same = True
        for kind in ("paper", "broad", "wide"):
            j = [judge_all([t for t, _ids in outs[k]], kind) for k in (False, True)]
            same &= all(j[0][x].flags == j[1][x].flags and j[0][x].n_degenerate == j[1][x].n_degenerate for x in j[0])
        refused = sum(judge_all([t for t, _ in outs[False]])["headline"].flags)
        print(f"{name}: to the window {secs[False]:.1f} s, {n[False]} row-tokens; settled stop {secs[True]:.1f} s, "
              f"{n[True]} row-tokens ({1 - n[True] / max(1, n[False]):.1%} fewer); {refused} refusals (broad); "
              f"every judge's flags and degenerate counts equal: {same}")


def _gen(model, fmt, prompts, tokens, stop):
    return generate(model, fmt, prompts, max_new_tokens=tokens, batch_size=len(prompts), progress=False,
                    return_ids=True, shared_prefix=True, decided=refusal_settled if stop else None)


if __name__ == "__main__":
    main()
