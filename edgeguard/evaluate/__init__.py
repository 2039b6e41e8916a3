"""Checks on Runners (accuracy, parity), benchmarks and reports."""

from edgeguard.evaluate.bench import BenchConfig, BenchResult, BenchRow, bench_runners
from edgeguard.evaluate.metrics import (
    AccuracyResult,
    ParityResult,
    accuracy_from,
    check_compatible,
    compare_runners,
    evaluate_accuracy,
    parity_from,
    predict_dataset,
)

__all__ = [
    "AccuracyResult",
    "BenchConfig",
    "BenchResult",
    "BenchRow",
    "ParityResult",
    "accuracy_from",
    "bench_runners",
    "check_compatible",
    "compare_runners",
    "evaluate_accuracy",
    "parity_from",
    "predict_dataset",
]
