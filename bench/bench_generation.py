"""Generation speed: the base model vs the base with ablation hooks vs the orthogonalized weights.

Greedy decoding with a fixed number of new tokens (EOS ignored, so every arm does the same work),
at batch size 1 (interactive use, where per-hook overhead shows most) and at a larger batch. Arms are
interleaved over several rounds and the median is reported, to be fair to each under noise. The
orthogonalized arm is an in-memory copy edited with the same code that writes checkpoints.

    python bench/bench_generation.py [RUN_DIR] [--tokens 64] [--rounds 3] [--batch 8]
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
from refdir.core.directions import Direction
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
    a = ap.parse_args()

    d = Direction.load(Path(a.run) / "selection" / "direction")
    lm = load_model("default", dtype=a.dtype)
    print(f"torch threads {torch.get_num_threads()}, native bf16: {cpu_has_native_bf16()}, dtype {lm.dtype}")
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
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
