"""The front door: every verb the CLI runs, as a library function, with its config classes.

``from edgeguard.api import ...`` is the supported way in; the CLI imports only this module (and
:mod:`edgeguard.errors`), so each command is option parsing, one call here and printing the result.  Each verb
returns a result with ``to_json()``, ``passed`` and, where the CLI prints one, ``summary()``; none prints results
(progress goes to stderr).

=================  ==========================================================================================
verb               function (config)
=================  ==========================================================================================
train              :func:`train_bundle` (``DataConfig``, ``ModelConfig``, ``TrainConfig``)
import             :func:`import_model`
protect watermark  :func:`embed_watermark` (``WatermarkConfig``)
protect magicguard :func:`protect_magicguard` (``MagicGuardConfig``)
protect fragile    :func:`protect_fragile` (``FragileConfig``, ``EnrolConfig``)
quantize           :func:`quantize_bundle` (``PtqConfig``, ``QatConfig``)
export             :func:`export_bundle` (``ExportConfig``), :func:`wrap_third_party` (``WrapConfig``),
                   :func:`export_triton_repo` (``TritonRepoConfig``)
build-engine       :func:`build_engine` (``EngineConfig``)
evaluate           :func:`evaluate`, :func:`evaluate_artifact`, :func:`evaluate_defense`
evaluate grid      :func:`run_grid` (``GridConfig``)
attack finetune    :func:`finetune_attack` (``FinetuneConfig``)
attack extract     :func:`extract` (:func:`method_config`)
verify             :func:`verify_artifacts`, :func:`verify_artifact`
bench              :func:`bench_artifacts` (``BenchConfig``)
golden / check     :func:`record_golden` (``GoldenConfig``), :func:`check_golden`
info               :func:`describe_artifact`
serve              :func:`serve` (``ServeConfig``)
pipeline           :func:`run_pipeline` (``PipelineConfig``)
=================  ==========================================================================================
"""

from __future__ import annotations

from edgeguard.attacks import ATTACKS, MODES, FinetuneConfig, finetune_attack
from edgeguard.attacks.extraction import extract, method_config
from edgeguard.config import DataConfig, ModelConfig
from edgeguard.data import DATASETS
from edgeguard.defenses import DEFENSES
from edgeguard.evaluate import BenchConfig
from edgeguard.evaluate.golden import GoldenConfig, check_golden, record_golden
from edgeguard.export import ExportConfig
from edgeguard.export.tensorrt import EngineConfig, build_engine
from edgeguard.export.triton_repo import TritonRepoConfig
from edgeguard.export.wrap import WrapConfig
from edgeguard.fileio import atomic_write_json
from edgeguard.grid import GridConfig, run_grid
from edgeguard.importing import ImportResult, import_model, parse_classes
from edgeguard.models import MODELS
from edgeguard.pipeline import PipelineConfig, run_pipeline
from edgeguard.protect import WatermarkConfig, embed_watermark
from edgeguard.protect.fragile import EnrolConfig, FragileConfig, protect_fragile
from edgeguard.protect.magicguard import MagicGuardConfig, protect_magicguard
from edgeguard.quantize import PtqConfig, QatConfig, quantize_bundle
from edgeguard.runtime import is_remote, open_runner, remote_settings
from edgeguard.serve import ServeConfig, serve
from edgeguard.training import TrainConfig
from edgeguard.verbs import (
    ArtifactDescription,
    EvaluationResult,
    TrainResult,
    VerifyResult,
    VerifyResults,
    artifact_data,
    bench_artifacts,
    defense_context,
    describe_artifact,
    evaluate,
    evaluate_artifact,
    evaluate_defense,
    export_bundle,
    export_triton_repo,
    train_bundle,
    verify_artifact,
    verify_artifacts,
    wrap_third_party,
)


def registry_names(kind: str) -> list[str]:
    """The names a CLI choice offers: ``model``, ``defense``, ``dataset`` or ``extraction`` (attack methods)."""
    if kind == "extraction":
        return ATTACKS.names(family="extraction")
    return {"model": MODELS, "defense": DEFENSES, "dataset": DATASETS}[kind].names()


__all__ = [
    "ATTACKS", "DATASETS", "DEFENSES", "MODELS", "MODES", "ArtifactDescription", "BenchConfig", "DataConfig",
    "EngineConfig", "EnrolConfig", "EvaluationResult", "ExportConfig", "FinetuneConfig", "FragileConfig",
    "GoldenConfig", "GridConfig", "ImportResult", "MagicGuardConfig", "ModelConfig", "PipelineConfig", "PtqConfig",
    "QatConfig", "ServeConfig", "TrainConfig", "TrainResult", "TritonRepoConfig", "VerifyResult", "VerifyResults",
    "WatermarkConfig", "WrapConfig", "artifact_data", "atomic_write_json", "bench_artifacts", "build_engine",
    "check_golden", "defense_context", "describe_artifact", "embed_watermark", "evaluate", "evaluate_artifact",
    "evaluate_defense", "export_bundle", "export_triton_repo", "extract", "finetune_attack", "import_model",
    "is_remote", "method_config", "open_runner", "parse_classes", "protect_fragile", "protect_magicguard",
    "quantize_bundle", "record_golden", "registry_names", "remote_settings", "run_grid", "run_pipeline", "serve",
    "train_bundle", "verify_artifact", "verify_artifacts", "wrap_third_party",
]
