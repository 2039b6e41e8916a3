"""Latency and throughput of one or more artifacts, measured side by side in one run.

For each batch size the runners are timed round-robin (one call each per iteration) so that drift
on a busy machine hits all of them alike; ratios are against the first runner.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.config import Config, require
from edgeguard.progress import task
from edgeguard.runtime import Runner


@dataclass(frozen=True)
class BenchConfig(Config):
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 5  # untimed calls per runner and batch size
    iterations: int = 50  # timed calls per runner and batch size
    seed: int = 0

    def __post_init__(self) -> None:
        require(len(self.batch_sizes) > 0 and all(b >= 1 for b in self.batch_sizes), "batch_sizes must be >= 1")
        require(self.warmup >= 0 and self.iterations >= 1, "warmup must be >= 0 and iterations >= 1")


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
class BenchResult:
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
    total = len(cfg.batch_sizes) * len(runners) * (cfg.warmup + cfg.iterations)
    with task("bench", total) as bar:
        for bs in cfg.batch_sizes:
            shape = runners[0].info.input_shape
            x = rng.random((bs, *[d or 32 for d in shape]), dtype=np.float32)
            times = [[] for _ in runners]
            for _ in range(cfg.warmup):
                for r in runners:
                    r.predict(x, batch_size=bs)
                    bar.advance()
            for _ in range(cfg.iterations):
                for i, r in enumerate(runners):
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
                        throughput=round(bs / (p50 / 1000.0), 1),
                        ratio_p50=round(p50_first / p50, 3),
                    )
                )
    return BenchResult(rows=tuple(rows), config=cfg.to_dict(), machine=machine_info())
