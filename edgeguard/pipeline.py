"""``edgeguard pipeline --config configs/demo.yaml --out DIR``: every stage in-process, then a report.

The stages call the same library functions as the stage commands (``edgeguard.api``); later
protections add their own stage functions to ``STAGES``.  Outputs in DIR:
``bundle/`` (the owner's PyTorch bundle), ``model.onnx`` (what ships), ``report.md``, ``report.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard import __version__
from edgeguard.api import bench_artifacts, export_bundle, load_data, train_bundle
from edgeguard.config import Config, DataConfig, ModelConfig, load_yaml, require
from edgeguard.errors import BadInput
from edgeguard.evaluate import BenchConfig, accuracy_from, parity_from, predict_dataset
from edgeguard.evaluate.report import write_report
from edgeguard.export import ExportConfig
from edgeguard.progress import log
from edgeguard.runtime import open_runner
from edgeguard.training import TrainConfig


@dataclass(frozen=True)
class EvalConfig(Config):
    split: str = "test"
    min_accuracy: float = 0.0  # the pipeline fails (exit 1) below this accuracy on any artifact
    parity_atol: float = 1e-5  # max |Δprob| allowed between the PyTorch bundle and each exported artifact

    def __post_init__(self) -> None:
        require(self.split in ("train", "test"), "evaluate.split must be train or test")
        require(0.0 <= self.min_accuracy <= 1.0, "evaluate.min_accuracy must lie in [0, 1]")


@dataclass(frozen=True)
class PipelineBenchConfig(Config):
    enabled: bool = True
    batch_sizes: tuple[int, ...] = (1, 64)
    warmup: int = 3
    iterations: int = 30


@dataclass(frozen=True)
class PipelineConfig(Config):
    name: str = "pipeline"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    bench: PipelineBenchConfig = field(default_factory=PipelineBenchConfig)

    device: str = "cpu"

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> PipelineConfig:
        raw = load_yaml(path)
        for section in ("train", "bench"):
            if isinstance(raw.get(section), dict) and "seed" in raw[section]:
                raise BadInput(f"config {path}: set the run's seed once, at the top level (remove {section}.seed)")
            if isinstance(raw.get(section), dict) and "device" in raw[section]:
                raise BadInput(f"config {path}: set the device once, at the top level (remove {section}.device)")
        cfg = cls.from_mapping(raw, what=f"config {path}")
        return cfg.replace(**overrides)  # type: ignore[return-value]

    def train_config(self) -> TrainConfig:
        """The train section with the run's one seed and device."""
        return dataclasses.replace(self.train, seed=self.seed, device=self.device)


@dataclass
class Context:
    cfg: PipelineConfig
    out: Path
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path; "bundle" is the owner's float model
    results: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})


def stage_train(ctx: Context) -> None:
    cfg = ctx.cfg
    res = train_bundle(cfg.data, cfg.model, cfg.train_config(), ctx.out / "bundle")
    ctx.artifacts["bundle"] = res.bundle
    ctx.results["train"] = res.to_json()


def stage_export(ctx: Context) -> None:
    res = export_bundle(ctx.artifacts["bundle"], ctx.out / "model.onnx", ctx.cfg.export)
    ctx.artifacts["onnx"] = res.path
    ctx.results["export"] = res.to_json()


def stage_evaluate(ctx: Context) -> None:
    """Accuracy of every artifact on the evaluation split, and parity of each against the bundle."""
    cfg = ctx.cfg.evaluate
    data = load_data(ctx.cfg.data, cfg.split)
    preds: dict[str, Any] = {}
    acc: dict[str, Any] = {}
    for name, path in ctx.artifacts.items():
        with open_runner(path) as r:
            probs, labels = predict_dataset(r, data)
            res = accuracy_from(
                probs, labels, r.info.classes, dataset=data.info.name, split=data.split,
                artifact=r.info.to_json(), min_accuracy=cfg.min_accuracy,
            )
        preds[name] = probs
        acc[name] = res.to_json()
        ctx.check(f"accuracy {name}", res.passed, f"{res.accuracy:.4f} on {data.info.name}/{data.split} (min {cfg.min_accuracy})")
    parity = {}
    for name in preds:
        if name == "bundle":
            continue
        p = parity_from(preds["bundle"], preds[name], atol=cfg.parity_atol, a="bundle", b=name)
        parity[name] = p.to_json()
        ctx.check(
            f"parity bundle vs {name}", p.passed,
            f"max |Δprob| {p.max_abs_diff:.2e} (tol {cfg.parity_atol:g}), top-1 agreement {p.top1_agreement:.4f} on n={p.n}",
        )
    ctx.results["evaluate"] = {"accuracy": acc, "parity": parity}


def stage_bench(ctx: Context) -> None:
    b = ctx.cfg.bench
    if not b.enabled:
        return
    names = list(ctx.artifacts)
    cfg = BenchConfig(batch_sizes=b.batch_sizes, warmup=b.warmup, iterations=b.iterations, seed=ctx.cfg.seed)
    res = bench_artifacts([ctx.artifacts[n] for n in names], cfg, names=names)
    ctx.results["bench"] = res.to_json()


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("train", stage_train),
    ("export", stage_export),
    ("evaluate", stage_evaluate),
    ("bench", stage_bench),
]


@dataclass(frozen=True)
class PipelineResult:
    out: str
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.report["checks"])

    def to_json(self) -> dict[str, Any]:
        return self.report


RUN_MARKER = ".edgeguard-run"


def prepare_run_dir(out: Path) -> None:
    """A run folder is new, empty, or an earlier run's; stale reports are removed before any work,
    so a failed or interrupted run never leaves an earlier run's PASS beside new artifacts."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_MARKER).exists():
        raise BadInput(f"refusing to write into {out}: it holds files that are not an edgeguard run (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text("edgeguard pipeline run folder\n")
    for stale in ("report.md", "report.json"):
        (out / stale).unlink(missing_ok=True)


def run_pipeline(cfg: PipelineConfig, out: str | Path) -> PipelineResult:
    out = Path(out)
    prepare_run_dir(out)
    ctx = Context(cfg=cfg, out=out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, fn in STAGES:
        log(f"== stage {name}")
        t0 = time.perf_counter()
        fn(ctx)
        timings[name] = round(time.perf_counter() - t0, 3)
    report = {
        "name": cfg.name,
        "edgeguard_version": __version__,
        "config": cfg.to_dict(),
        "artifacts": ctx.artifacts,
        "results": ctx.results,
        "checks": ctx.checks,
        "passed": all(c["passed"] for c in ctx.checks),
        "seconds": {**timings, "total": round(time.perf_counter() - t_all, 3)},
        "versions": _versions(),
    }
    write_report(out, report)
    return PipelineResult(str(out), report)


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
