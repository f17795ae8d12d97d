"""A second direction for the run's choice: what the chosen edit leaves of refusal, removed in part.

After the search chooses an edit under the KL target, refusals that survive it are carried by directions its own
direction does not cover. The strongest candidate of the selection (the lowest bypass among the fully scored ones:
its full ablation bypasses most, at a KL the selection's filter rejects) is such a direction. Taken off the harmless
principal components at its own position and layer (as the ``pca`` source), made orthogonal to the chosen edit's
direction and removed at a small strength from every writer, it spends part of the KL room the choice leaves under
the target.

Measured on the default model (NOTES.md; development slices, paper harmful_train[:160] / harmless_train[:100], not
the test prompts): the pca direction alone refuses 12 of 160 at first-token KL 0.036; with the strongest candidate
(pos −2, layer 16) off its harmless components at strength 0.2, 6 of 160 at 0.040; at 0.3, 4 of 160 at 0.044; the
same candidate alone at strength 0.6, 9 of 160 at 0.036. The strength is 0.3, lowered where the calibration KL
would pass the target.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from refdir.core.activations import residuals
from refdir.core.chat import ChatFormat
from refdir.core.generation import generate
from refdir.method.refusal_judge import judge

STRENGTH = 0.3  # the second direction's strength (development slices, NOTES.md)
MAX_COS = 0.99  # a second direction closer than this to the chosen one is that direction again, not a second
# the persona source: its layer as a share of the depth (18 of the default model's 24: the development sets, NOTES.md),
# the fewest disclaimers that make a contrast, and the tokens generated to read them
PERSONA_LAYER_FRAC = 0.75
PERSONA_MIN = 4
PERSONA_TOKENS = 24


def strongest(table: list[dict], exclude: Collection[tuple[int, int]] = ()) -> dict | None:
    """The fully scored selection row with the lowest bypass (``exclude``: the (position, layer) pairs left out,
    the chosen edit's own candidates: where it is applied and where its direction came from); None when no other
    row was scored."""
    rows = [r for r in table if isinstance(r.get("bypass"), (int, float)) and math.isfinite(r["bypass"])
            and (r["position"], r["layer"]) not in exclude]
    return min(rows, key=lambda r: r["bypass"]) if rows else None


def rescaled(strength: float, k0: float, k: float, aim: float) -> float | None:
    """The strength that brings the calibration KL from ``k`` (measured at ``strength``; ``k0`` without the second
    direction) to ``aim``, taking the added KL to grow as the square of the strength; None when there is no room."""
    if aim <= k0 or k <= k0:
        return None
    return min(1.0, strength * math.sqrt((aim - k0) / (k - k0)))


def persona_contrast(model, fmt: ChatFormat, questions: list[str], harmless: list[str], layer: int,
                     batch_size: int = 32, progress: bool = True) -> tuple[torch.Tensor | None, dict]:
    """The persona direction, raw: at the last post-instruction position (where the first answer token is chosen)
    and ``layer``, the mean residual of the opinion ``questions`` the model answers with a disclaimer or refusal
    (the wide judge on its first ``PERSONA_TOKENS`` greedy tokens: "As an AI language model, I don't have personal
    preferences …") minus that of the ``harmless`` prompts it answers plainly. What the chosen edit leaves of refusal
    on the default model is mostly that preamble, which the refusal direction does not carry (NOTES.md). Returns
    None with the counts and the reason when fewer than ``PERSONA_MIN`` of either kind are found."""
    comps = generate(model, fmt, questions + harmless, max_new_tokens=PERSONA_TOKENS, batch_size=batch_size,
                     progress=progress, desc="persona: base answers", shared_prefix=True)
    flags = judge(comps, "wide").flags
    ai = [x for x, f in zip(questions, flags[: len(questions)], strict=True) if f]
    plain = [x for x, f in zip(harmless, flags[len(questions):], strict=True) if not f]
    info = {"n_questions": len(ai), "of_questions": len(questions), "n_plain": len(plain)}
    if min(len(ai), len(plain)) < PERSONA_MIN:
        return None, {**info, "why": f"{len(ai)} of {len(questions)} opinion questions drew a disclaimer and "
                                     f"{len(plain)} harmless prompts a plain answer; {PERSONA_MIN} of each are needed"}
    i = fmt.n_post - 1
    with torch.no_grad():
        mean_ai, _ = residuals(model, fmt, ai, desc="persona: questions", progress=progress, shared_prefix=True)
        mean_plain, _ = residuals(model, fmt, plain, desc="persona: plain", progress=progress, shared_prefix=True)
    return (mean_ai[i, layer] - mean_plain[i, layer]).float(), info


__all__ = ["MAX_COS", "PERSONA_LAYER_FRAC", "STRENGTH", "persona_contrast", "rescaled", "strongest"]
