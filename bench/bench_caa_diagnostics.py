"""Why CAA's multiplier sweep on the embedded model is not monotonic at the negative end: diagnostics on the
embedded A/B test split (README, *Steering vectors*).

Prints, for the vector trained on the behaviour's train split:

- how much of the next-token probability the two answer letters take, and on how many items "(B" leads "(A";
- unsteered P(matching) on the items whose matching answer is A and on those where it is B;
- the multiplier sweep at ``--layer`` (after the instruction, as ``refdir caa sweep``), over all items and per half;
- the vector's split-half cosine at that layer (trained on two halves of the train items);
- the sweep with the vector's letter component removed (the A-matching items' vector minus the B-matching items'),
  and the sweep steering every position instead of the tokens after the instruction.

    python bench/bench_caa_diagnostics.py [--behaviour embedded:refusal] [--layer 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

MULTIPLIERS = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--behaviour", default="embedded:refusal")
    ap.add_argument("--layer", type=int, default=15, help="the layer `refdir caa sweep` picks on the default model")
    ap.add_argument("--model", default="default")
    a = ap.parse_args()
    from refdir.core.chat import ChatFormat
    from refdir.core.models import load_model
    from refdir.steering import caa

    t0 = time.time()
    lm = load_model(a.model)
    m, fmt = lm.model, ChatFormat(lm.tokenizer)
    items = caa.load_behaviour(a.behaviour)
    train, test = caa.split(items, "train"), caa.split(items, "test")
    print(f"{lm.model_id}, {next(m.parameters()).dtype}; {len(train)} train / {len(test)} test items, layer {a.layer}")

    trip = [caa._letter_ids(fmt, it) for it in test]
    logits = caa._last_logits(m, [t[0] for t in trip], fmt.tokenizer.pad_token_id, 16)
    p = torch.softmax(logits.double(), -1)
    ids = {it.letters[0]: t[1] for it, t in zip(test, trip, strict=True)} | \
          {it.letters[1]: t[2] for it, t in zip(test, trip, strict=True)}
    pa, pb = p[:, ids["A"]], p[:, ids["B"]]
    print(f"the letters' share of the next-token probability: {float((pa + pb).mean()):.3f}; "
          f"'(B' leads on {int((pb > pa).sum())} of {len(test)} items")

    halves = {k: [it for it in test if it.letters[0] == k] for k in ("A", "B")}
    sv = caa.train(m, fmt, train, progress=False)
    print("unsteered P(matching): " + ", ".join(
        f"{k}-matching ({len(h)}) {caa.matching_probability(m, fmt, h):.3f}" for k, h in halves.items()))

    def sweep(label: str, vec, item_set, after_instruction: bool = True) -> None:
        res = caa.multiplier_sweep(m, fmt, item_set, vec, a.layer, MULTIPLIERS, after_instruction, progress=False)
        print(f"{label:44s} " + " ".join(f"{x:.3f}" for x in res["p"]), flush=True)

    print(f"{'P(matching) at multipliers':44s} " + " ".join(f"{x:>5g}" for x in MULTIPLIERS))
    sweep("all test items", sv, test)
    for k, h in halves.items():
        sweep(f"{k}-matching items", sv, h)

    half = len(train) // 2
    v1, v2 = (caa.train(m, fmt, s, progress=False).vectors[a.layer].double() for s in (train[:half], train[half:]))
    print(f"split-half cosine at layer {a.layer}: {float(torch.nn.functional.cosine_similarity(v1, v2, 0)):.3f}")

    by_letter = {k: caa.train(m, fmt, [it for it in train if it.letters[0] == k], progress=False).vectors[a.layer]
                 for k in ("A", "B")}
    letter = (by_letter["A"] - by_letter["B"]).double()
    v = sv.vectors[a.layer].double()
    v = v - (v @ letter) / (letter @ letter) * letter
    no_letter = dataclasses.replace(sv, vectors={**sv.vectors, a.layer: v.float()})
    cos = float(torch.nn.functional.cosine_similarity(letter, sv.vectors[a.layer].double(), 0))
    print(f"the letter component's cosine with the vector: {cos:.3f}")
    sweep("letter component removed, all test items", no_letter, test)
    sweep("every position steered, all test items", sv, test, after_instruction=False)
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
