"""Verbs that make an artifact: train a bundle, build a defense's context, export (ONNX, a third-party graph
wrapped, a Triton repository)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeguard.bundle import (
    Bundle,
    ModelSpec,
    bundle_data_config,
    check_target,
    load_bundle,
    save_bundle,
    stage_record,
)
from edgeguard.config import DataConfig, ModelConfig
from edgeguard.data import load_data
from edgeguard.defenses import defense_config, make_defense
from edgeguard.defenses.base import DefenseContext
from edgeguard.errors import BadInput
from edgeguard.export import ExportConfig, ExportResult, export_onnx
from edgeguard.export.triton_repo import TritonRepoConfig, TritonRepoResult, write_triton_repo
from edgeguard.export.wrap import WrapConfig, WrapResult, is_foreign_onnx, wrap_onnx
from edgeguard.models import count_parameters, create_model
from edgeguard.results import Result
from edgeguard.runtime import artifact_kind, open_runner
from edgeguard.training import FitResult, TrainConfig, fit

VAL_FRACTION = 0.1  # held out of the training split when early stopping needs a validation set


@dataclass(frozen=True)
class TrainResult(Result):
    bundle: str
    sha256: str
    arch: str
    dataset: str
    parameters: int
    fit: FitResult
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "sha256": self.sha256,
            "arch": self.arch,
            "dataset": self.dataset,
            "parameters": self.parameters,
            **self.fit.to_json(),
        }

    def summary(self) -> str:
        last = self.fit.history[-1]
        return (f"bundle {self.bundle} (sha256 {self.sha256[:12]}): {self.arch} on {self.dataset}, "
                f"{self.fit.epochs} epochs in {self.fit.seconds:.1f} s, final loss {last['loss']:.4f}, "
                f"train accuracy {last.get('train_accuracy', float('nan')):.4f}")


def train_bundle(data: DataConfig, model: ModelConfig, train: TrainConfig, out: str | Path) -> TrainResult:
    """Train ``model.arch`` on ``data`` (train split) and write a bundle to ``out``."""
    check_target(out)
    train_data = load_data(data, "train")
    info = train_data.info
    torch.manual_seed(train.seed)  # model initialisation is part of the seeded run
    net = create_model(
        model.arch, num_classes=info.num_classes, in_channels=info.input_shape[0], mean=info.mean, std=info.std, **model.options
    )
    val = None
    if train.early_stop_patience:
        g = torch.Generator().manual_seed(train.seed)
        order = torch.randperm(len(train_data), generator=g)
        n_val = max(1, int(len(train_data) * VAL_FRACTION))
        val, train_data = train_data.subset(order[:n_val]), train_data.subset(order[n_val:])
    result = fit(net, train_data, train, val_data=val, desc=f"train {model.arch} on {data.name}")
    spec = ModelSpec(model.arch, info.num_classes, info.classes, info.input_shape, info.mean, info.std, dict(model.options))
    stage = stage_record(
        "train",
        train,
        data=data.to_dict(),
        model=model.to_dict(),
        result={k: v for k, v in result.to_json().items() if k != "history"},
        final=result.history[-1] if result.history else {},
    )
    bundle = save_bundle(out, net, spec, stages=[stage], dataset=data.name)
    return TrainResult(str(bundle.path), bundle.sha256, model.arch, data.name, count_parameters(net), result)


def defense_context(bundle: Bundle, *, seed: int = 0, max_train: int | None = None) -> DefenseContext:
    """What a defense may build itself from: the bundle's architecture, training data and undefended outputs."""

    spec = bundle.spec

    def train_images():
        data = load_data(bundle_data_config(bundle), "train")
        if data.info.input_shape != spec.input_shape:
            raise BadInput(f"the bundle's training data has shape {data.info.input_shape}, the model {spec.input_shape}")
        n = len(data) if max_train is None else min(len(data), max_train)
        return data.tensors(0, n)

    def clean_predict(x: torch.Tensor):
        with open_runner(bundle.path) as runner:  # an INT8 bundle answers through its QDQ graph
            return runner.predict(x)

    def model_factory():  # a fresh, unguarded network of the same architecture (surrogates, misinformation models)
        return spec.with_guard(None).build()

    return DefenseContext(num_classes=spec.num_classes, input_shape=tuple(spec.input_shape), train_images=train_images,
                          clean_predict=clean_predict, model_factory=model_factory, seed=seed)


def export_bundle(
    bundle: str | Path,
    out: str | Path,
    cfg: ExportConfig | None = None,
    *,
    defense: str = "none",
    defense_params: Mapping[str, Any] | None = None,
    wrap: WrapConfig | None = None,
    data: DataConfig | None = None,
    seed: int = 0,
) -> ExportResult | WrapResult:
    """Export a bundle to ONNX with the named defense (built from the bundle when it needs a model or data); a
    third-party ``.onnx`` is wrapped instead (:func:`wrap_third_party`, ``wrap`` its settings)."""

    kind = artifact_kind(bundle)
    if kind == ".onnx":
        if cfg is not None and cfg != ExportConfig():
            raise BadInput("--opset / --max-batch apply to bundles; a third-party graph keeps its own opset")
        return wrap_third_party(bundle, out, wrap, defense=defense, defense_params=defense_params, data=data,
                                seed=seed)
    if kind != "bundle":
        raise BadInput(f"export takes a bundle folder or a third-party .onnx, not {bundle}")
    if wrap is not None:
        raise BadInput("--outputs / --mean / --std / --layout describe a third-party .onnx; a bundle records its own")
    defense_config(defense, defense_params)  # a bad name or parameter fails before any work
    b = load_bundle(bundle)
    module = make_defense(defense, defense_params, defense_context(b, seed=seed))
    return export_onnx(b, out, cfg, defense=module)


def wrap_third_party(
    source: str | Path,
    out: str | Path,
    cfg: WrapConfig | None = None,
    *,
    defense: str = "none",
    defense_params: Mapping[str, Any] | None = None,
    data: DataConfig | None = None,
    seed: int = 0,
) -> WrapResult:
    """Wrap someone else's ONNX classifier as an edgeguard artifact (raw [0, 1] images in, probabilities out, the
    defense fused after the softmax, the original nodes and initializers byte-identical inside).  ``data``: the
    owner's data, for defenses that build themselves from training images."""
    if artifact_kind(source) != ".onnx":
        raise BadInput(f"{source} is not an .onnx file")
    if not is_foreign_onnx(source):
        raise BadInput(f"{source} is already an edgeguard artifact; export its bundle with the defense instead")
    defense_config(defense, defense_params)
    cfg = (cfg or WrapConfig()).replace(seed=seed)

    def build(num_classes, input_shape, clean_predict):
        def train_images():
            if data is None:
                raise BadInput(f"the {defense} defense builds itself from training images: give --dataset")
            d = load_data(data, "train")
            if tuple(d.info.input_shape) != tuple(input_shape):
                raise BadInput(f"the dataset's images have shape {d.info.input_shape}, the graph takes {input_shape}")
            return d.tensors()

        ctx = DefenseContext(num_classes=num_classes, input_shape=tuple(input_shape), train_images=train_images,
                             clean_predict=lambda x: clean_predict(torch.as_tensor(x)), seed=seed)
        return make_defense(defense, defense_params, ctx)

    return wrap_onnx(source, out, cfg, defense=build)


def export_triton_repo(
    artifact: str | Path,
    repo: str | Path,
    cfg: TritonRepoConfig | None = None,
    *,
    defense: str = "none",
    defense_params: Mapping[str, Any] | None = None,
    export: ExportConfig | None = None,
    wrap: WrapConfig | None = None,
    data: DataConfig | None = None,
    seed: int = 0,
) -> TritonRepoResult:
    """A Triton model repository from a bundle (exported here, the defense fused) or from an exported ``.onnx`` /
    built engine / INT8 bundle as it is (then ``defense`` must be ``none``: the artifact already carries its own)."""

    cfg = cfg or TritonRepoConfig()
    kind = artifact_kind(artifact)
    if kind == ".onnx" and is_foreign_onnx(artifact):  # someone else's graph: wrapped, so it serves like ours
        if (Path(repo) / cfg.name).exists():
            raise BadInput(f"{Path(repo) / cfg.name} already exists; remove it or pick another --name")
        with tempfile.TemporaryDirectory(prefix="edgeguard-repo-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            wrap_third_party(artifact, onnx_path, wrap, defense=defense, defense_params=defense_params, data=data,
                             seed=seed)
            return write_triton_repo(onnx_path, repo, cfg)
    if wrap is not None:
        raise BadInput("--outputs / --mean / --std / --layout describe a third-party .onnx")
    if kind != "bundle" and defense != "none":
        raise BadInput(f"--defense applies when exporting a bundle; {artifact} is already exported with its own")
    if kind == "bundle" and (defense != "none" or not load_bundle(artifact, verify=False).quantized):
        if (Path(repo) / cfg.name).exists():
            raise BadInput(f"{Path(repo) / cfg.name} already exists; remove it or pick another --name")
        with tempfile.TemporaryDirectory(prefix="edgeguard-repo-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export_bundle(artifact, onnx_path, export, defense=defense, defense_params=defense_params, seed=seed)
            return write_triton_repo(onnx_path, repo, cfg)
    return write_triton_repo(artifact, repo, cfg)
