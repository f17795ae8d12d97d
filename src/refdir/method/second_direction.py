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

STRENGTH = 0.3  # the second direction's strength (development slices, NOTES.md)
MAX_COS = 0.99  # a second direction closer than this to the chosen one is that direction again, not a second


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


__all__ = ["MAX_COS", "STRENGTH", "rescaled", "strongest"]
