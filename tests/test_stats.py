"""The binomial decision rule of watermark verification (docs/watermark.md)."""

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


# --- intervals and paired comparisons (issue 18): checked against scipy on fixed tables ------------------------

FIDELITY_NONE = [0.52, 0.20, 0.89, 0.37, 0.53]  # five seeds, undefended (figures of the kind the issue quotes)
FIDELITY_DEF = [0.31, 0.18, 0.62, 0.30, 0.50]  # the same seeds with a defense


def test_t_interval_matches_scipy():
    import numpy as np
    from scipy import stats as st

    from edgeguard.stats import t_interval

    for values in (FIDELITY_NONE, [0.5, 0.5, 0.5], [0.1, 0.9]):
        mean, lo, hi = t_interval(values)
        want = st.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=st.sem(values)) if np.std(values) else (0.5, 0.5)
        assert mean == pytest.approx(np.mean(values)) and (lo, hi) == pytest.approx(want, abs=1e-12)
    assert t_interval([0.4]) == (0.4, 0.4, 0.4)


def test_welch_interval_matches_scipy():
    from scipy import stats as st

    from edgeguard.stats import welch_interval

    for a, b in ((FIDELITY_NONE, FIDELITY_DEF), ([0.8, 0.81, 0.79], [0.7, 0.75, 0.72, 0.74])):
        diff, lo, hi = welch_interval(a, b)
        want = st.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        assert diff == pytest.approx(sum(a) / len(a) - sum(b) / len(b)) and (lo, hi) == pytest.approx(tuple(want), abs=1e-12)
    assert welch_interval([0.5, 0.5], [0.4, 0.4]) == pytest.approx((0.1, 0.1, 0.1))
    with pytest.raises(ValueError):
        welch_interval([0.5], [0.4, 0.3])


def test_paired_comparison_matches_scipy():
    import numpy as np
    from scipy import stats as st

    from edgeguard.stats import paired_comparison

    r = paired_comparison(FIDELITY_DEF, FIDELITY_NONE)
    d = np.subtract(FIDELITY_DEF, FIDELITY_NONE)
    assert r["n"] == 5 and r["mean_diff"] == pytest.approx(d.mean())
    assert r["t_p"] == pytest.approx(st.ttest_rel(FIDELITY_DEF, FIDELITY_NONE).pvalue, rel=1e-10)
    perm = st.permutation_test((FIDELITY_DEF, FIDELITY_NONE), lambda a, b, axis: np.mean(a - b, axis=axis),
                               permutation_type="samples", n_resamples=np.inf, vectorized=True)
    assert r["perm_p"] == pytest.approx(perm.pvalue, abs=1e-12) and r["perm_p"] == 2 / 32  # every pair moved down
    ci = st.ttest_rel(FIDELITY_DEF, FIDELITY_NONE).confidence_interval(0.95)
    assert (r["lo"], r["hi"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert r["lo"] < 0 < r["hi"] and r["t_p"] > 0.05  # five seeds, every one lower, still not significant
    same = paired_comparison(FIDELITY_NONE, FIDELITY_NONE)
    assert same["t_p"] == 1.0 and same["perm_p"] == 1.0 and same["mean_diff"] == 0.0
    with pytest.raises(ValueError):
        paired_comparison([0.1, 0.2], [0.1])
