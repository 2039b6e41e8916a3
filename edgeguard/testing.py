"""Shared assertions for tests and benchmarks (as torchao ships torchao.testing)."""

from __future__ import annotations

import numpy as np

from edgeguard.runtime.parity import parity_from


def assert_parity(reference: np.ndarray, candidate: np.ndarray, *, atol: float = 1e-5) -> None:
    """Probabilities agree within ``atol`` everywhere and the top-1 class is identical on every row."""
    res = parity_from(np.asarray(reference), np.asarray(candidate), atol=atol)
    assert res.passed, (
        f"parity lost: max |Δprob| {res.max_abs_diff:.3e} (atol {atol:g}), top-1 agreement {res.top1_agreement:.4f} on n={res.n}"
    )


def assert_probabilities(p: np.ndarray, *, atol: float = 1e-5) -> None:
    """Rows are non-negative and sum to 1."""
    p = np.asarray(p)
    assert p.ndim == 2 and np.all(p >= 0), "probabilities must be a non-negative (N, K) array"
    np.testing.assert_allclose(p.sum(1), 1.0, atol=atol)
