"""Checks that are functions of a Runner: accuracy on a dataset and parity between two runners.

Each returns a frozen result with ``to_json()`` and ``passed``; the CLI turns ``passed=False`` into
exit code 1.  Predictions always come from ``runner.predict`` -- the artifact that ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeguard.data import ImageDataset
from edgeguard.errors import BadInput
from edgeguard.results import Result
from edgeguard.runtime import Runner
from edgeguard.runtime.parity import ParityResult, compare_runners, parity_from  # noqa: F401  (part of evaluate)


def check_compatible(runner: Runner, data: ImageDataset) -> None:
    """One clear sentence when a dataset cannot be fed to an artifact (shape or class count)."""
    info = runner.info
    if info.num_classes != data.num_classes:
        raise BadInput(
            f"dataset {data.info.name!r} has {data.num_classes} classes but {runner.path} outputs {info.num_classes}"
        )
    want = info.input_shape
    got = data.info.input_shape
    if any(w is not None and w != g for w, g in zip(want, got, strict=True)):
        raise BadInput(f"dataset {data.info.name!r} images are {got} but {runner.path} takes {tuple(want)}")


def predict_dataset(runner: Runner, data: ImageDataset, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), labels (N,)) for a whole dataset, in dataset order."""
    check_compatible(runner, data)
    runner.expect(len(data), batch=batch_size)
    probs, labels = [], []
    for s in range(0, len(data), batch_size):
        x, y = data.tensors(s, s + batch_size)
        probs.append(runner.predict(x.numpy(), batch_size=batch_size))
        labels.append(y.numpy())
    if not probs:
        return np.zeros((0, runner.info.num_classes), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(probs), np.concatenate(labels)


@dataclass(frozen=True)
class AccuracyResult(Result):
    accuracy: float
    n: int
    correct: int
    per_class: dict[str, float]
    dataset: str
    split: str
    artifact: dict[str, Any] = field(default_factory=dict)
    min_accuracy: float | None = None

    @property
    def passed(self) -> bool:
        return self.min_accuracy is None or self.accuracy >= self.min_accuracy

def accuracy_from(
    probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], *, dataset: str, split: str, **kw: Any
) -> AccuracyResult:
    pred = probs.argmax(1)
    ok = pred == labels
    per_class = {c: round(float(ok[labels == i].mean()), 6) for i, c in enumerate(classes) if np.any(labels == i)}
    n = len(labels)
    return AccuracyResult(
        accuracy=round(float(ok.mean()) if n else 0.0, 6),
        n=n,
        correct=int(ok.sum()),
        per_class=per_class,
        dataset=dataset,
        split=split,
        **kw,
    )


def evaluate_accuracy(
    runner: Runner, data: ImageDataset, *, batch_size: int = 256, min_accuracy: float | None = None
) -> AccuracyResult:
    probs, labels = predict_dataset(runner, data, batch_size=batch_size)
    return accuracy_from(
        probs,
        labels,
        runner.info.classes,
        dataset=data.info.name,
        split=data.split,
        artifact=runner.info.to_json(),
        min_accuracy=min_accuracy,
    )
