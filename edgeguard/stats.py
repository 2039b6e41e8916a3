"""Statistics for verification verdicts: the exact binomial tail and its decision threshold.

Under H0 ("this model was trained without the key") every trigger of a random-label key matches
with probability exactly 1/k, so the number of matches M ~ Binomial(n, 1/k).  The verdict compares
the integer M with the integer threshold m* -- never floating-point accuracies (the SAP off-by-one).
"""

from __future__ import annotations

import math


def _log_pmf(j: int, n: int, p: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * math.log(p) + (n - j) * math.log1p(-p)


def binomial_tail(m: int, n: int, p: float) -> float:
    """P[M >= m] for M ~ Binomial(n, p), summed exactly in log space (relative error ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError("p must lie strictly between 0 and 1")
    if m <= 0:
        return 1.0
    if m > n:
        return 0.0
    logs = [_log_pmf(j, n, p) for j in range(m, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def decision_threshold(n: int, p: float, alpha: float) -> int:
    """m*: the smallest m with P[M >= m] <= alpha (n + 1 if even n matches are not significant)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError("alpha must lie strictly between 0 and 1")
    for m in range(n + 1):
        if binomial_tail(m, n, p) <= alpha:
            return m
    return n + 1


def chernoff_bound(m: int, n: int, p: float) -> float:
    """exp(-n D(m/n || p)), an upper bound on P[M >= m] for m/n >= p."""
    q = m / n
    if q <= p:
        return 1.0
    if q >= 1.0:
        return p**n
    d = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    return math.exp(-n * d)


# --- intervals and paired comparisons over seeds (the grid's verdict table) -------------------------------------


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided Student-t confidence interval ``(mean, lo, hi)``; with one value, ``(v, v, v)``."""
    from scipy import stats as st  # scikit-learn's own dependency, always installed

    n = len(values)
    if n == 0:
        raise ValueError("an interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def welch_interval(a: list[float], b: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Difference of means ``mean(a) - mean(b)`` with its two-sided Welch interval ``(diff, lo, hi)``: two
    independent samples, variances not assumed equal (Welch-Satterthwaite degrees of freedom)."""
    from scipy import stats as st

    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Welch interval needs at least two values per sample")
    ma, mb = math.fsum(a) / len(a), math.fsum(b) / len(b)
    va = math.fsum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = math.fsum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, ma - mb, ma - mb
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(st.t.ppf(0.5 + confidence / 2, df)) * se
    return ma - mb, ma - mb - half, ma - mb + half


def paired_comparison(treated: list[float], control: list[float], confidence: float = 0.95) -> dict[str, float | int]:
    """Paired comparison of ``treated`` against ``control`` at equal seeds (same victim, same attack seed).

    Returns the mean difference (treated - control) with its t interval, the two-sided paired t-test p-value, and
    the exact two-sided sign-flip permutation p-value (all 2^n sign patterns of the differences; n <= 20), which
    needs no normality.  Identical samples give p = 1.
    """
    from scipy import stats as st

    if len(treated) != len(control) or not treated:
        raise ValueError("paired samples must be non-empty and of equal length")
    d = [a - b for a, b in zip(treated, control, strict=True)]
    n = len(d)
    mean, lo, hi = t_interval(d, confidence)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    if n < 2 or sd == 0.0:
        t_p = 1.0 if mean == 0.0 else 0.0
    else:
        t_p = float(2 * st.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    if n > 20:
        raise ValueError("the exact permutation test enumerates 2^n patterns; use at most 20 pairs")
    observed = abs(math.fsum(d))
    extreme = 0
    for mask in range(1 << n):
        s = math.fsum(-v if mask >> i & 1 else v for i, v in enumerate(d))
        extreme += abs(s) >= observed - 1e-12
    return {"n": n, "mean_diff": mean, "lo": lo, "hi": hi, "t_p": t_p, "perm_p": extreme / (1 << n)}
