"""The Wilson interval printed beside every refusal rate: equal to scipy's, sensible at the edges, and the text
the reports show."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from refdir.method.uncertainty import count, count_text, mcnemar, rate_text, wilson


@pytest.mark.parametrize("n", [1, 7, 39, 40, 100, 520])
def test_wilson_equals_scipys_for_every_count(n):
    for k in range(n + 1):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson(k, n)
        assert lo == pytest.approx(ci.low, abs=1e-12) and hi == pytest.approx(ci.high, abs=1e-12), (k, n)
        assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_edges_and_width():
    assert all(math.isnan(x) for x in wilson(0, 0))
    with pytest.raises(ValueError):
        wilson(5, 4)
    assert wilson(0, 39)[0] == 0.0 and wilson(39, 39)[1] == 1.0
    # more prompts, a narrower interval; a higher confidence, a wider one
    w = [hi - lo for lo, hi in (wilson(n // 5, n) for n in (39, 100, 1000))]
    assert w[0] > w[1] > w[2]
    assert wilson(8, 39, 0.99)[1] > wilson(8, 39)[1] > wilson(8, 39, 0.8)[1]


def test_rate_text_gives_the_share_its_count_and_interval():
    assert count(8 / 39, 39) == 8
    assert rate_text(8 / 39, 39) == "0.205 (8/39; 0.11–0.36)"
    assert rate_text(0.0, 40) == "0.000 (0/40; 0.00–0.09)"
    assert count_text(2, 39) == "2/39 (0.01–0.17)" and count_text(0, 0) == "0/0"
    assert rate_text(float("nan"), 39) == rate_text(None, 39) == rate_text(0.5, 0) == "n/a"


def test_mcnemar_counts_the_discordant_prompts_and_equals_scipys_binomial_test():
    a = [True] * 6 + [False] * 30 + [True, False, True]
    b = [True] * 2 + [False] * 34 + [True, True, False]
    only_a, only_b, p = mcnemar(a, b)
    assert (only_a, only_b) == (5, 1)
    assert p == pytest.approx(binomtest(1, 6, 0.5).pvalue, abs=1e-12)
    for x in range(9):
        for y in range(9):
            fa, fb = [True] * x + [False] * y, [False] * x + [True] * y
            want = binomtest(min(x, y), x + y, 0.5).pvalue if x + y else 1.0
            assert mcnemar(fa, fb) == (x, y, pytest.approx(want, abs=1e-12))
    assert mcnemar(a, a) == (0, 0, 1.0)  # identical arms: nothing to tell them apart
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])
