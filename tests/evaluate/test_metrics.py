"""Accuracy and parity computations, and the benchmark's side-by-side ratios."""

from __future__ import annotations

import numpy as np
import pytest

from edgeguard.data import load_dataset
from edgeguard.errors import BadInput
from edgeguard.evaluate import BenchConfig, accuracy_from, bench_runners, evaluate_accuracy, parity_from
from edgeguard.runtime import open_runner


def test_accuracy_from_counts_per_class():
    probs = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    res = accuracy_from(probs, np.array([0, 1, 1, 0]), ("a", "b", "c"), dataset="t", split="test", min_accuracy=0.8)
    assert (res.correct, res.n, res.accuracy) == (3, 4, 0.75)
    assert res.per_class == {"a": 1.0, "b": 0.5}
    assert not res.passed


def test_parity_detects_a_flip_and_a_small_drift():
    a = np.array([[0.6, 0.4], [0.2, 0.8]], np.float32)
    assert parity_from(a, a, atol=0).passed
    drift = parity_from(a, a + np.float32(2e-5), atol=1e-5)
    assert not drift.passed and drift.top1_agreement == 1.0
    flip = parity_from(a, a[:, ::-1].copy(), atol=1.0)
    assert not flip.passed and flip.top1_agreement == 0.0


def test_wrong_class_count_or_shape_is_one_sentence(tiny_onnx):
    with open_runner(tiny_onnx) as r:
        with pytest.raises(BadInput, match="has 4 classes but"):
            evaluate_accuracy(r, load_dataset("synthetic", "test", n=8, channels=1, num_classes=4))
        with pytest.raises(BadInput, match=r"images are \(3, 32, 32\)"):
            evaluate_accuracy(r, load_dataset("synthetic", "test", n=8))


def test_bench_rows_and_ratios(tiny_bundle, tiny_onnx):
    with open_runner(tiny_bundle) as a, open_runner(tiny_onnx) as b:
        res = bench_runners([a, b], BenchConfig(batch_sizes=(1, 4), warmup=1, iterations=5))
    assert [(r.batch, r.backend) for r in res.rows] == [(1, "torch"), (1, "onnxruntime"), (4, "torch"), (4, "onnxruntime")]
    for r in res.rows:
        assert 0 < r.p50_ms <= r.p90_ms
        assert r.throughput == pytest.approx(r.batch / (r.p50_ms / 1000), rel=1e-3)
    first = [r for r in res.rows if r.backend == "torch"]
    assert all(r.ratio_p50 == 1.0 for r in first)
    assert "| artifact |" in res.table()
