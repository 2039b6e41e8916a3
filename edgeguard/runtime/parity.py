"""Parity of two artifacts' outputs: max |Δprob| and top-1 agreement (export self-checks, quantization, tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.errors import BadInput
from edgeguard.results import Result
from edgeguard.runtime.base import Runner


@dataclass(frozen=True)
class ParityResult(Result):
    n: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    atol: float
    a: str
    b: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol and self.top1_agreement == 1.0

def parity_from(pa: np.ndarray, pb: np.ndarray, *, atol: float, a: str = "a", b: str = "b") -> ParityResult:
    if pa.shape != pb.shape:
        raise BadInput(f"cannot compare outputs of shapes {pa.shape} and {pb.shape}")
    d = np.abs(pa.astype(np.float64) - pb.astype(np.float64))
    return ParityResult(
        n=len(pa),
        max_abs_diff=float(d.max()) if d.size else 0.0,
        mean_abs_diff=float(d.mean()) if d.size else 0.0,
        top1_agreement=float(np.mean(pa.argmax(1) == pb.argmax(1))) if len(pa) else 1.0,
        atol=atol,
        a=a,
        b=b,
    )


def compare_runners(a: Runner, b: Runner, x: Any, *, atol: float = 1e-5) -> ParityResult:
    """Max |Δprob| and top-1 agreement of two artifacts on the same inputs."""
    return parity_from(a.predict(x), b.predict(x), atol=atol, a=str(a.path), b=str(b.path))
