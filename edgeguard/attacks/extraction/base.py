"""Model extraction against a deployed artifact: a budgeted black-box oracle, surrogate training, metrics.

Every extraction attack queries the artifact through :class:`QueryOracle`, which wraps the artifact's Runner
exactly as an outside client would see it: probabilities only (one-hot labels in hard-label mode), no
gradients, no cache, and a query budget that is counted at the Runner and can never be exceeded.  When the
artifact is an ONNX graph the oracle can also keep, for the report only, the L1 distance between what it
returned and the same graph's undefended output (``open_runner(path, undefended=True)``).

An attack is a function ``run(oracle, pool, cfg, ctx) -> surrogate`` registered in ``ATTACKS`` with
``family="extraction"``; :func:`edgeguard.attacks.extraction.extract` opens the artifact, runs it, measures the
surrogate (accuracy, fidelity to the victim) and writes the surrogate bundle and a JSON result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeguard.config import Config, require
from edgeguard.errors import CheckFailed
from edgeguard.runtime import Runner
from edgeguard.training import TensorData, TrainConfig, fit


class BudgetExceeded(CheckFailed):
    """An attack asked for more queries than its budget allows (a bug in the attack, never silent)."""


class QueryOracle:
    """Budgeted black-box access to a Runner: ``query(x)`` returns float32 probabilities (or one-hot labels)."""

    def __init__(self, runner: Runner, budget: int, *, hard_label: bool = False, clean: Runner | None = None,
                 batch_size: int = 256):
        self.runner = runner
        self.budget = int(budget)
        self.hard_label = hard_label
        self.clean = clean
        self.batch_size = batch_size
        self.used = 0
        self.seconds = 0.0  # wall time spent answering queries (the Runner, and the undefended view when kept)
        self._l1_sum = 0.0
        self._l1_n = 0

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    @property
    def num_classes(self) -> int:
        return self.runner.info.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.runner.info.input_shape)

    def query(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Probabilities for images ``x`` (float 0-1 or uint8, NCHW); each image costs one query."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        n = len(arr)
        if n > self.remaining:
            raise BudgetExceeded(f"the attack asked for {n} queries with {self.remaining} of {self.budget} left")
        if n == 0:
            return torch.zeros(0, self.num_classes)
        arr = np.clip(arr, 0.0, 1.0).astype(np.float32) if arr.dtype != np.uint8 else arr
        t0 = time.perf_counter()
        q = self.runner.predict(arr, batch_size=self.batch_size)
        self.used += n
        if self.clean is not None:
            p = self.clean.predict(arr, batch_size=self.batch_size)
            self._l1_sum += float(np.abs(q.astype(np.float64) - p).sum())
            self._l1_n += n
        self.seconds += time.perf_counter() - t0
        out = torch.from_numpy(q)
        if self.hard_label:
            out = torch.nn.functional.one_hot(out.argmax(1), self.num_classes).float()
        return out

    @property
    def l1_mean(self) -> float | None:
        """Mean L1 distance between returned and undefended vectors over every query (None without a clean view)."""
        return self._l1_sum / self._l1_n if self._l1_n else None


@dataclass(frozen=True)
class ExtractionConfig(Config):
    """Settings every extraction attack shares; each method adds its own fields."""

    budget: int = 5000  # queries to the deployed artifact, counted at the Runner
    query_set: str = "synthetic"  # dataset registry name of the attacker's query pool (ignored by data-free attacks)
    query_options: dict = field(default_factory=dict)
    query_root: str | None = None
    surrogate: str = "smallcnn"  # architecture of the attacker's model
    surrogate_options: dict = field(default_factory=dict)
    epochs: int = 20  # surrogate training epochs (per round for multi-round attacks)
    lr: float = 0.05
    batch_size: int = 64
    augment: str = "none"  # training augmentation of the surrogate (none, shift, crop_flip)
    hard_label: bool = False  # the API returns only the top-1 label (one-hot)
    seed: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.budget, int) and self.budget > 0, f"the query budget must be a positive integer (got {self.budget})")
        require(self.epochs >= 1 and self.lr > 0 and self.batch_size >= 1, "epochs, lr and batch_size must be positive")
        require(self.augment in ("none", "shift", "crop_flip"), f"augment must be none, shift or crop_flip (got {self.augment!r})")
        require(0 <= self.seed < 2**31, f"seed must lie in [0, 2^31) (got {self.seed})")


@dataclass
class ExtractionContext:
    """What the attacker knows: the API's input shape and class count, and how to build its own model."""

    num_classes: int
    input_shape: tuple[int, int, int]
    make_surrogate: Callable[[], nn.Module]
    quiet: bool | None = None
    log: dict[str, Any] = field(default_factory=dict)  # per-attack details for the result (rounds, losses, ...)


def train_surrogate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ExtractionConfig, *, epochs: int | None = None,
                    loss=None, extra=None, desc: str = "surrogate", quiet: bool | None = None) -> nn.Module:
    """Train the surrogate on (image, returned vector) pairs with the one training loop (soft-label CE)."""

    fit(model, TensorData(x, y), TrainConfig(epochs=epochs or cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                             augment=cfg.augment, seed=cfg.seed),
        loss=loss, extra=extra, desc=desc, quiet=quiet, channels_last=True)
    return model.eval()


def query_all(oracle: QueryOracle, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Query ``x`` in chunks (each image once)."""
    return torch.cat([oracle.query(x[s : s + batch]) for s in range(0, len(x), batch)]) if len(x) else \
        torch.zeros(0, oracle.num_classes)
