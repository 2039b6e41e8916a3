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
