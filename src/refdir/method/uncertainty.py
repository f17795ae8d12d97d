"""How far a refusal rate measured on a few dozen prompts can be trusted: the Wilson score interval of a share,
and the exact McNemar test of two arms judged on the same prompts.

A held-out set of 39 harmful prompts puts one refusal at 0.026 of the rate, and 8 of 39 (0.205) is compatible with
anything from about 0.11 to 0.36 at 95 %. The run, search and eval reports print the interval beside their
refusal rates, so that a reader can tell a difference between arms from sampling noise. Wilson's interval (not
the normal one) stays inside [0, 1] and keeps its coverage for the small counts and rates near 0 that an edited
model produces.

Two arms generated on the same prompts are compared pair by pair: only the prompts one arm refuses and the other
does not carry information about which refuses less, and under "no difference" each such prompt is a fair coin.

Both closed forms are a few lines, so they are written here instead of importing scipy (an extra): reports of
every run print them, not only of runs that installed the search extra. ``tests/test_uncertainty.py`` checks both
against scipy's ``binomtest``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

CONFIDENCE = 0.95


def count(share: float, n: int) -> int:
    """The number of prompts behind a share of ``n`` (the judges report shares of all completions)."""
    return round(share * n)


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The two-sided Wilson score interval of ``k`` successes in ``n`` trials; (nan, nan) when ``n`` is 0."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes of {n} trials")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    z2 = z * z
    centre = (k + z2 / 2) / (n + z2)
    half = z / (n + z2) * math.sqrt(k * (n - k) / n + z2 / 4)
    # at k = 0 and k = n the bound is 0 and 1 exactly; rounding would leave it a hair inside
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def _interval_text(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{lo:.2f}–{hi:.2f}"


def count_text(k: int, n: int) -> str:
    """A count with its interval, e.g. ``8/39 (0.11–0.36)``."""
    return f"{k}/{n} ({_interval_text(k, n)})" if n else f"{k}/{n}"


def rate_text(share: float | None, n: int, digits: int = 3) -> str:
    """``share`` with its count and interval, e.g. ``0.205 (8/39; 0.11–0.36)``; "n/a" without prompts."""
    if not n or share is None or not math.isfinite(share):
        return "n/a"
    k = count(share, n)
    return f"{share:.{digits}f} ({k}/{n}; {_interval_text(k, n)})"


def mcnemar(a: list[bool], b: list[bool]) -> tuple[int, int, float]:
    """Two arms' refusal flags on the same prompts: how many only ``a`` refuses, how many only ``b`` refuses, and
    the exact two-sided McNemar p-value (a binomial test at 1/2 of those discordant prompts; 1 when there are
    none)."""
    if len(a) != len(b):
        raise ValueError(f"paired flags of different lengths: {len(a)} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    m = only_a + only_b
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2**m
    return only_a, only_b, min(1.0, 2 * tail)
