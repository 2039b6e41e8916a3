"""The library functions behind the CLI verbs that are not a package's own entry point (train, export, evaluate,
describe, bench, verify).  Users import them from the front door, :mod:`edgeguard.api`; the pipeline and the grid
(which sit below it) import them from here."""

from __future__ import annotations

from edgeguard.verbs.check import (
    ArtifactDescription,
    EvaluationResult,
    VerifyResult,
    VerifyResults,
    artifact_data,
    bench_artifacts,
    describe_artifact,
    evaluate,
    evaluate_artifact,
    evaluate_defense,
    verify_artifact,
    verify_artifacts,
)
from edgeguard.verbs.make import (
    TrainResult,
    defense_context,
    export_bundle,
    export_triton_repo,
    train_bundle,
    wrap_third_party,
)

__all__ = [
    "ArtifactDescription", "EvaluationResult", "TrainResult", "VerifyResult", "VerifyResults", "artifact_data",
    "bench_artifacts", "defense_context", "describe_artifact", "evaluate", "evaluate_artifact", "evaluate_defense",
    "export_bundle", "export_triton_repo", "train_bundle", "verify_artifact", "verify_artifacts", "wrap_third_party",
]
