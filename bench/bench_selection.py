"""Selection: the fast exhaustive path against the plain reference path, same process, fp32.

The reference is the paper's algorithm as written: hooks on every block input and attention /
MLP output, left-padded batches, logits at every position. The fast path shares the template's
common prefix through a repeated KV cache and computes logits at the last position only.

    python bench/bench_selection.py [--run runs/demo] [--positions -1] [--layers 10:16] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from refdir.core.chat import ChatFormat
from refdir.core.directions import Candidates
from refdir.core.models import load_model
from refdir.method.selection import SelectionConfig, score_candidates

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "paper_splits"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--positions", default="-1")
    ap.add_argument("--layers", default="10:16")
    ap.add_argument("--dtype", default="fp32")
    a = ap.parse_args()
    run = Path(a.run)
    c = Candidates.load(run / "candidates")
    pos = [int(p) for p in a.positions.split(",")]
    lo, hi = (int(x) for x in a.layers.split(":"))
    keep = [c.positions.index(p) for p in pos]
    sub = Candidates(c.vectors[keep], c.harmful_mean[keep], c.harmless_mean[keep], pos, c.model_id)
    ids = json.loads((run / "refusal_tokens" / "tokens.json").read_text())["ids"]
    if SPLITS.exists():
        hv = [r["instruction"] for r in json.loads((SPLITS / "harmful_val.json").read_text())][:32]
        bv = [r["instruction"] for r in json.loads((SPLITS / "harmless_val.json").read_text())][:32]
        src = "paper splits val 32 + 32"
    else:
        sets = json.loads((run / "data" / "sets.json").read_text())
        hv, bv, src = sets["harmful"]["val"][:32], sets["harmless"]["val"][:32], "embedded val"
    lm = load_model("default", dtype=a.dtype)
    fmt = ChatFormat(lm.tokenizer)
    common = dict(max_layer_frac=1.0, min_layer=lo, kl_max=0.1, induce_rule="relative")
    n = len(pos) * (hi - lo)
    # restrict layers by masking the candidates above `hi` as late layers
    common["max_layer_frac"] = (hi - 1 + 0.5) / sub.n_layers
    t = time.time()
    fast = score_candidates(lm.model, fmt, sub, hv, bv, ids, SelectionConfig(exhaustive=True, **common))
    t_fast = time.time() - t
    t = time.time()
    ref = score_candidates(lm.model, fmt, sub, hv, bv, ids, SelectionConfig(exact_reference=True, **common))
    t_ref = time.time() - t
    rel = 0.0
    for x, y in zip(fast.scores, ref.scores, strict=True):
        for k in ("bypass", "induce", "kl"):
            u, v = getattr(x, k), getattr(y, k)
            if math.isfinite(v):
                rel = max(rel, abs(u - v) / max(abs(v), 1e-3))
    win = lambda s: (s.chosen.position, s.chosen.layer) if s.chosen else None  # noqa: E731
    print(f"{n} candidates ({src}, {a.dtype}): fast {t_fast:.1f} s, reference {t_ref:.1f} s, "
          f"speed-up {t_ref / t_fast:.2f}x; winners fast {win(fast)} reference {win(ref)}; "
          f"max relative score difference {rel:.2e}")


if __name__ == "__main__":
    main()
