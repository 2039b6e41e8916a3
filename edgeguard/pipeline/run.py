"""Run every stage in order into a run folder and write report.md / report.json."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgeguard import __version__
from edgeguard.evaluate.report import write_report
from edgeguard.fileio import claim_run_dir
from edgeguard.pipeline.config import PipelineConfig
from edgeguard.pipeline.stages import STAGES, Context
from edgeguard.progress import log
from edgeguard.results import ReportResult


@dataclass(frozen=True)
class PipelineResult(ReportResult):
    def summary(self) -> str:
        lines = [f"{'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in self.report["checks"]]
        return "\n".join([*lines, f"report: {Path(self.out) / 'report.md'}"])


RUN_MARKER = ".edgeguard-run"


def run_pipeline(cfg: PipelineConfig, out: str | Path) -> PipelineResult:
    out = Path(out)
    claim_run_dir(out, RUN_MARKER, "edgeguard run", stale=("report.md", "report.json"))
    ctx = Context(cfg=cfg, out=out)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for name, fn in STAGES:
        log(f"== stage {name}")
        t0 = time.perf_counter()
        fn(ctx)
        timings[name] = round(time.perf_counter() - t0, 3)
    config = cfg.to_dict()
    if config["params"]["watermark"]["params"].get("key_seed") is not None:
        config["params"]["watermark"]["params"]["key_seed"] = "<secret: kept in the vault only>"
    report = {
        "name": cfg.name,
        "edgeguard_version": __version__,
        "config": config,
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
