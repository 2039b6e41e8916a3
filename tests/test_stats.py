"""The binomial decision rule of watermark verification (spec W4)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeguard.stats import binomial_tail, chernoff_bound, decision_threshold


@pytest.mark.parametrize(
    "n, k, alpha, m_star",
    [(100, 10, 0.05, 16), (100, 10, 1e-3, 21), (100, 10, 1e-6, 28), (100, 10, 1e-9, 33), (50, 10, 1e-3, 14),
     (20, 10, 1e-3, 8), (10, 10, 1e-3, 6), (100, 100, 1e-3, 6), (100, 2, 1e-3, 66)],
)
def test_thresholds_match_the_spec_table(n, k, alpha, m_star):
    assert decision_threshold(n, 1 / k, alpha) == m_star
    assert binomial_tail(m_star, n, 1 / k) <= alpha < binomial_tail(m_star - 1, n, 1 / k)


def test_reference_p_values():
    for m, ref in ((20, 1.98e-3), (25, 1.31e-5), (30, 2.45e-8), (50, 5.83e-24)):
        assert binomial_tail(m, 100, 0.1) == pytest.approx(ref, rel=0.01)
    assert binomial_tail(0, 100, 0.1) == 1.0 and binomial_tail(101, 100, 0.1) == 0.0
    assert binomial_tail(100, 100, 0.1) == pytest.approx(1e-100, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(2, 100), data=st.data())
def test_chernoff_bounds_the_exact_tail_and_tail_is_monotone(n, k, data):
    p = 1 / k
    m = data.draw(st.integers(math.ceil(n * p), n))
    exact = binomial_tail(m, n, p)
    assert exact <= chernoff_bound(m, n, p) * (1 + 1e-9)
    assert binomial_tail(m + 1, n, p) <= exact
