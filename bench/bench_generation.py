"""Generation speed: the base model vs the base with ablation hooks vs the orthogonalized weights.

Greedy decoding with a fixed number of new tokens (EOS ignored, so every arm does the same work),
at batch size 1 (interactive use, where per-hook overhead shows most) and at a larger batch. Arms are
interleaved over several rounds and the median is reported, to be fair to each under noise. The
orthogonalized arm is an in-memory copy edited with the same code that writes checkpoints.

Then batched greedy generation as the evaluation runs it (``refdir.core.generation.generate``, EOS honoured):
HF ``model.generate`` (finished rows keep being computed) vs the loop that drops finished rows, on embedded test
prompts (harmful: mostly short refusals; harmless: mostly long answers), with the completions checked identical.
``--drop-only`` runs just this part (no run directory needed).

    python bench/bench_generation.py [RUN_DIR] [--tokens 64] [--rounds 3] [--batch 8]
    python bench/bench_generation.py --drop-only [--drop-prompts 40] [--drop-rounds 2] [--drop-shared-prefix]
                                     [--drop-sets harmful,harmless] [--drop-split test|train|val|all]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from pathlib import Path

import torch

from refdir.core.chat import ChatFormat
from refdir.core.data import embedded
from refdir.core.direction_paths import load_direction
from refdir.core.directions import Direction
from refdir.core.generation import generate
from refdir.core.interventions import ablate
from refdir.core.models import cpu_has_native_bf16, load_model
from refdir.core.orthogonalize import orthogonalize_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", default="runs/demo")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--drop-only", action="store_true", help="only the dropping-finished-rows comparison")
    ap.add_argument("--drop-prompts", type=int, default=40, help="prompts per set (one batch) for that comparison")
    ap.add_argument("--drop-rounds", type=int, default=2)
    ap.add_argument("--drop-sets", default="harmful,harmless")
    ap.add_argument("--drop-split", default="test", choices=["train", "val", "test", "all"])
    ap.add_argument("--drop-shared-prefix", action="store_true", help="also with the shared-prefix KV cache")
    a = ap.parse_args()

    d = None if a.drop_only else load_direction(Path(a.run))
    lm = load_model("default", dtype=a.dtype)
    print(f"torch threads {torch.get_num_threads()}, native bf16: {cpu_has_native_bf16()}, dtype {lm.dtype}")
    if d is not None:
        hooks_vs_weights(a, lm, d)
    drop_finished_rows(a, lm)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def hooks_vs_weights(a, lm, d: Direction) -> None:
    fmt = ChatFormat(lm.tokenizer)
    ortho = copy.deepcopy(lm.model)
    orthogonalize_(ortho, d.vector)
    prompts = embedded("harmless", "test").instructions

    def tokens_per_s(model, batch: int, hooked: bool) -> float:
        enc = fmt.encode(prompts[:batch])
        t = time.perf_counter()
        with torch.no_grad():
            if hooked:
                with ablate(model, d.vector):
                    model.generate(**enc, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False,
                                   pad_token_id=lm.tokenizer.pad_token_id)
            else:
                model.generate(**enc, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False,
                               pad_token_id=lm.tokenizer.pad_token_id)
        return batch * a.tokens / (time.perf_counter() - t)

    arms = {"base": (lm.model, False), "ablation hooks": (lm.model, True), "orthogonalized": (ortho, False)}
    for batch in (1, a.batch):
        for m, h in arms.values():  # warm-up
            tokens_per_s(m, batch, h)
        res: dict[str, list[float]] = {k: [] for k in arms}
        for _ in range(a.rounds):
            for name, (m, h) in arms.items():
                res[name].append(tokens_per_s(m, batch, h))
        base = statistics.median(res["base"])
        print(f"batch {batch}, {a.tokens} new tokens, median of {a.rounds} rounds:")
        for name, v in res.items():
            med = statistics.median(v)
            spread = (max(v) - min(v)) / med
            print(f"  {name:15s} {med:7.1f} tok/s  ({base / med - 1:+.1%} time vs base; round spread {spread:.0%})")


def drop_finished_rows(a, lm) -> None:
    """generate() with finished rows dropped vs HF model.generate: wall time, tokens/s (the completions' own tokens,
    up to EOS, the same count for both) and whether the completions are identical."""
    fmt = ChatFormat(lm.tokenizer)
    variants = [False, True] if a.drop_shared_prefix else [False]
    for kind in a.drop_sets.split(","):
        split = None if a.drop_split == "all" else a.drop_split
        prompts = embedded(kind, split).instructions[: a.drop_prompts]
        for sp in variants:
            def run(drop: bool, prompts=prompts, sp=sp):
                t = time.perf_counter()
                out = generate(lm.model, fmt, prompts, max_new_tokens=a.tokens, batch_size=len(prompts),
                               progress=False, return_ids=True, shared_prefix=sp, drop_finished=drop)
                return time.perf_counter() - t, out

            run(True)  # warm-up
            times: dict[bool, list[float]] = {False: [], True: []}
            outs = {}
            for _ in range(a.drop_rounds):
                for drop in (False, True):
                    dt, outs[drop] = run(drop)
                    times[drop].append(dt)
            n_tok = sum(len(ids) for _t, ids in outs[False])
            lens = sorted(len(ids) for _t, ids in outs[False])
            same = [x[0] for x in outs[False]] == [x[0] for x in outs[True]]
            same_ids = [x[1] for x in outs[False]] == [x[1] for x in outs[True]]
            print(f"{kind} {a.drop_split} × {len(prompts)} (one batch), up to {a.tokens} new tokens, shared prefix {sp}, "
                  f"median of {a.drop_rounds} rounds; completion lengths min/median/max "
                  f"{lens[0]}/{lens[len(lens) // 2]}/{lens[-1]}, {n_tok} tokens in all:")
            old, new = statistics.median(times[False]), statistics.median(times[True])
            for name, v in (("model.generate", old), ("drop finished", new)):
                print(f"  {name:15s} {v:7.2f} s  {n_tok / v:7.1f} tok/s")
            print(f"  speed-up {old / new:.2f}x; texts identical: {same}; token ids identical: {same_ids}")
            if not same:
                diff = [i for i, (x, y) in enumerate(zip(outs[False], outs[True], strict=True)) if x[0] != y[0]]
                print(f"  differing prompts: {diff[:10]} ({len(diff)} of {len(prompts)})")


if __name__ == "__main__":
    main()
