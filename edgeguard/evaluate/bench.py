"""Latency and throughput of one or more artifacts, measured side by side in one run.

For each batch size the timed calls are split into ``rounds``; in every round each runner makes a
block of consecutive calls (after ``rewarm`` untimed ones), and the runner order alternates between
rounds.  Blocks, not call-by-call interleaving: on a small CPU the thread pool one runtime leaves
spinning after a call (ONNX Runtime, OpenMP) slows the other's next call, which biased an
interleaved comparison by up to 20% on 2 cores.  Alternating rounds keep slow drift of a busy
machine from favouring whichever runner went first.  Ratios are against the first runner.
"""

from __future__ import annotations

import hashlib
import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.config import Config, require
from edgeguard.progress import task
from edgeguard.results import Result
from edgeguard.runtime import Runner


@dataclass(frozen=True)
class BenchConfig(Config):
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 5  # untimed calls per runner and batch size, before the first round
    iterations: int = 50  # timed calls per runner and batch size, over all rounds
    rounds: int = 3  # blocks per runner; the order of runners alternates between rounds
    rewarm: int = 2  # untimed calls at the start of every block (after switching runner)
    seed: int = 0

    def __post_init__(self) -> None:
        require(len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes), "batch_sizes must be >= 1")
        require(self.warmup >= 0 and self.iterations >= 1, "warmup must be >= 0 and iterations >= 1")
        require(self.rounds >= 1 and self.rewarm >= 0, "rounds must be >= 1 and rewarm >= 0")


@dataclass(frozen=True)
class BenchRow:
    artifact: str
    backend: str
    precision: str
    batch: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    throughput: float  # images per second at p50
    ratio_p50: float  # p50 of the first runner / p50 of this one (>1: faster than the first)


@dataclass(frozen=True)
class BenchResult(Result):
    rows: tuple[BenchRow, ...]
    config: dict[str, Any]
    machine: dict[str, Any]
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"rows": [r.__dict__ for r in self.rows], "config": self.config, "machine": self.machine}

    def table(self) -> str:
        head = "| artifact | backend | precision | batch | p50 ms | p90 ms | img/s | speed-up vs first |"
        lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            lines.append(
                f"| {r.artifact} | {r.backend} | {r.precision} | {r.batch} | {r.p50_ms:.3f} | {r.p90_ms:.3f} "
                f"| {r.throughput:.0f} | {r.ratio_p50:.2f}x |"
            )
        return "\n".join(lines)

    def summary(self) -> str:
        return self.table()


def machine_info() -> dict[str, Any]:
    import os

    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def bench_runners(runners: list[Runner], cfg: BenchConfig | None = None, *, names: list[str] | None = None) -> BenchResult:
    cfg = cfg or BenchConfig()
    names = names or [str(r.path) for r in runners]
    rng = np.random.default_rng(cfg.seed)
    rows: list[BenchRow] = []
    inputs: dict[str, str] = {}  # batch size -> sha256 of the seeded random batch every runner was timed on
    rounds = min(cfg.rounds, cfg.iterations)
    per_round = [cfg.iterations // rounds + (1 if i < cfg.iterations % rounds else 0) for i in range(rounds)]
    total = len(cfg.batch_sizes) * len(runners) * (cfg.warmup + cfg.iterations + rounds * cfg.rewarm)
    with task("bench", total) as bar:
        for bs in cfg.batch_sizes:
            shape = runners[0].info.input_shape
            x = rng.random((bs, *[d or 32 for d in shape]), dtype=np.float32)
            inputs[str(bs)] = hashlib.sha256(x.tobytes()).hexdigest()
            times: list[list[float]] = [[] for _ in runners]
            for r in runners:
                for _ in range(cfg.warmup):
                    r.predict(x, batch_size=bs)
                    bar.advance()
            for k, n_calls in enumerate(per_round):
                order = list(range(len(runners)))
                if k % 2:
                    order.reverse()
                for i in order:
                    r = runners[i]
                    for _ in range(cfg.rewarm):
                        r.predict(x, batch_size=bs)
                        bar.advance()
                    for _ in range(n_calls):
                        t0 = time.perf_counter()
                        r.predict(x, batch_size=bs)
                        times[i].append((time.perf_counter() - t0) * 1000.0)
                        bar.advance()
            p50_first = float(np.percentile(times[0], 50))
            for i, r in enumerate(runners):
                t = np.asarray(times[i])
                p50 = float(np.percentile(t, 50))
                rows.append(
                    BenchRow(
                        artifact=names[i],
                        backend=r.info.backend,
                        precision=r.info.precision,
                        batch=bs,
                        p50_ms=round(p50, 4),
                        p90_ms=round(float(np.percentile(t, 90)), 4),
                        mean_ms=round(float(t.mean()), 4),
                        throughput=round(bs / (p50 / 1000.0), 3),
                        ratio_p50=round(p50_first / p50, 3),
                    )
                )
    return BenchResult(rows=tuple(rows), config={**cfg.to_dict(), "inputs_sha256": inputs}, machine=machine_info())
