"""Library functions behind the CLI commands; ``pipeline`` calls the same ones in-process.

Each returns a result object with ``to_json()`` and ``passed``.  None of them prints results:
the CLI renders them, progress goes to stderr.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edgeguard.bundle import (
    VAULT,
    Bundle,
    ModelSpec,
    Vault,
    bundle_data_config,
    check_target,
    is_bundle,
    load_bundle,
    save_bundle,
    stage_record,
)
from edgeguard.config import DataConfig, ModelConfig
from edgeguard.data import default_ood, load_data
from edgeguard.defenses import defense_config, make_defense
from edgeguard.defenses.base import DefenseContext
from edgeguard.errors import BadInput
from edgeguard.evaluate import AccuracyResult, BenchConfig, BenchResult, bench_runners, evaluate_accuracy
from edgeguard.evaluate.defense import DefenseMeasurement, measure_defense
from edgeguard.export import ExportConfig, ExportResult, export_onnx
from edgeguard.export.triton_repo import TritonRepoConfig, TritonRepoResult, write_triton_repo
from edgeguard.export.wrap import WrapConfig, WrapResult, is_foreign_onnx, wrap_onnx, wrapped_original
from edgeguard.importing import ImportResult, import_model, parse_classes  # noqa: F401  (edgeguard.api.import_model)
from edgeguard.models import count_parameters, create_model
from edgeguard.protect.fragile import FragileStore, verify_store
from edgeguard.protect.watermark import VAULT_RECORD, verify_watermark
from edgeguard.runtime import artifact_kind, open_runner
from edgeguard.training import FitResult, TrainConfig, fit

VAL_FRACTION = 0.1  # held out of the training split when early stopping needs a validation set


@dataclass(frozen=True)
class TrainResult:
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


def artifact_data(artifact: str | Path) -> DataConfig:
    """The dataset to evaluate an artifact on when none is named: a bundle's own training data, else digits."""
    return bundle_data_config(load_bundle(artifact, verify=False)) if is_bundle(artifact) else DataConfig()


def evaluate_artifact(
    artifact: str | Path,
    data: DataConfig,
    *,
    split: str = "test",
    min_accuracy: float | None = None,
    device: str | None = None,
    batch_size: int = 256,
) -> AccuracyResult:
    with open_runner(artifact, device=device) as runner:
        return evaluate_accuracy(runner, load_data(data, split), batch_size=batch_size, min_accuracy=min_accuracy)


def evaluate_defense(
    artifact: str | Path,
    data: DataConfig,
    *,
    split: str = "test",
    ood: DataConfig | None = None,
    bench: BenchConfig | None = None,
    device: str | None = None,
):
    """Defense measurements of a defended artifact against its own undefended view (see evaluate.defense)."""

    with open_runner(artifact, device=device) as defended, open_runner(artifact, device=device, undefended=True) as clean:
        if defended.info.defense == "none":
            raise BadInput(f"{artifact} has no output defense to measure")
        record = defended.info.defense_record
        ood_cfg = ood or default_ood(defended.info.input_shape)
        ood_data = load_data(ood_cfg, "test")
        return measure_defense(defended, clean, load_data(data, split), ood_data, bench=bench,
                               params=dict(record.params), placement=record.placement)


@dataclass(frozen=True)
class EvaluationResult:
    """``edgeguard evaluate``: accuracy of an artifact, plus the defense measurements when it carries a defense."""

    accuracy: AccuracyResult
    defense: DefenseMeasurement | None = None

    @property
    def passed(self) -> bool:
        return self.accuracy.passed

    def to_json(self) -> dict[str, Any]:
        out = self.accuracy.to_json()
        if self.defense is not None:
            out["defense_measurements"] = self.defense.to_json()
        return out

    def summary(self) -> str:
        a, art = self.accuracy, self.accuracy.artifact
        line = (f"accuracy {a.accuracy:.4f} ({a.correct}/{a.n}) on {a.dataset}/{a.split}: "
                f"{art['path']} [{art['backend']} {art['precision']}, defense {art['defense']}]")
        return line + ("\n" + self.defense.summary() if self.defense is not None else "")


def evaluate(
    artifact: str | Path,
    data: DataConfig,
    *,
    split: str = "test",
    min_accuracy: float | None = None,
    ood: DataConfig | None = None,
    latency: bool = True,
    device: str | None = None,
    seed: int = 0,
) -> EvaluationResult:
    """Accuracy of ``artifact`` on ``data``; for a defended artifact also the defense against its undefended view
    (agreement, L1 on the split and on ``ood``, and, with ``latency``, the overhead at batch 1 and 64)."""
    acc = evaluate_artifact(artifact, data, split=split, min_accuracy=min_accuracy, device=device)
    if acc.artifact["defense"] == "none" or artifact_kind(artifact) != ".onnx":  # only a graph has an undefended view
        return EvaluationResult(acc)
    bench = BenchConfig(batch_sizes=(1, 64), warmup=5, iterations=60, seed=seed) if latency else None
    return EvaluationResult(acc, evaluate_defense(artifact, data, split=split, ood=ood, bench=bench, device=device))


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


@dataclass(frozen=True)
class ArtifactDescription:
    info: dict[str, Any]
    details: dict[str, Any]
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"info": self.info, **self.details}


def describe_artifact(path: str | Path) -> ArtifactDescription:
    """What an artifact is: the Runner's info plus the manifest (bundle) or the graph summary (ONNX)."""
    kind = artifact_kind(path)
    details: dict[str, Any] = {"kind": kind.lstrip(".")}
    if kind == "bundle":
        b = load_bundle(path)
        details["manifest"] = b.manifest
        details["vault_entries"] = b.vault.names()
    elif kind == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise BadInput(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
        ops: dict[str, int] = {}
        for n in proto.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        details["onnx"] = {
            "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "ir_version": proto.ir_version,
            "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            "nodes": len(proto.graph.node),
            "ops": dict(sorted(ops.items())),
            "metadata": {p.key: p.value for p in proto.metadata_props},
            "bytes": Path(path).stat().st_size,
        }
        if "edgeguard.wrapped" in details["onnx"]["metadata"]:
            details["wrapped"] = wrapped_original(proto)
    with open_runner(path) as runner:
        info = runner.info.to_json()
        if kind == ".onnx" and not getattr(runner, "metadata", None):
            details["third_party"] = {"outputs": runner.outputs_detected, "why": runner.outputs_reason,
                                      "normalization": "unknown (not recorded in the graph)"}
    return ArtifactDescription(info=info, details=details)


def bench_artifacts(
    paths: list[str | Path], cfg: BenchConfig | None = None, *, device: str | None = None, names: list[str] | None = None
) -> BenchResult:
    if not paths:
        raise BadInput("bench needs at least one artifact")
    runners = []
    try:
        for p in paths:
            runners.append(open_runner(p, device=device))
        shapes = {r.info.input_shape for r in runners}
        if len(shapes) > 1:
            raise BadInput(f"artifacts take different input shapes {sorted(map(str, shapes))}; bench them separately")
        return bench_runners(runners, cfg, names=names)
    finally:
        for r in runners:
            r.close()


@dataclass(frozen=True)
class VerifyResult:
    watermark: Any  # WatermarkVerification, or None when the vault holds no watermark
    fragile: Any = None  # FragileVerification, or None when the vault holds no fragile enrolment
    clean: AccuracyResult | None = None

    @property
    def passed(self) -> bool:
        return all(part.passed for part in (self.watermark, self.fragile) if part is not None)

    def summary(self) -> str:
        """One line: the artifact, then each verdict the vault allowed, then the clean accuracy if measured."""
        parts = []
        w = self.watermark
        if w is not None:
            parts.append(f"watermark {w.verdict.upper()}: {w.matches}/{w.n} triggers match (p-value {w.p_value:.3g}, "
                         f"threshold {w.m_star} at alpha {w.alpha:g}, chance 1/{w.k})")
        if self.fragile is not None:
            parts.append(self.fragile.summary())
        art = (w or self.fragile).artifact
        line = f"{art['path']} [{art['backend']} {art['precision']}]: " + "; ".join(parts)
        if self.clean is not None:
            c = self.clean
            line += f"; clean accuracy {c.accuracy:.4f} ({c.correct}/{c.n}) on {c.dataset}/{c.split}"
        return line

    def to_json(self) -> dict[str, Any]:
        first = self.watermark if self.watermark is not None else self.fragile
        out: dict[str, Any] = {"artifact": first.artifact, "passed": self.passed}
        if self.watermark is not None:
            out["watermark"] = self.watermark.to_json()
        if self.fragile is not None:
            out["fragile"] = self.fragile.to_json()
        if self.clean is not None:
            out["clean"] = self.clean.to_json()
        return out


def verify_artifact(
    artifact: str | Path,
    vault: str | Path | None = None,
    *,
    alpha: float | None = None,
    data: DataConfig | None = None,
    split: str = "test",
    device: str | None = None,
) -> VerifyResult:
    """Watermark verdict and fragile-trigger verdict of an artifact against an owner vault (a bundle defaults to its
    own); each part runs when the vault holds it (``VAULT/vault.json`` watermark, ``VAULT/fragile``)."""

    if vault is None:
        if artifact_kind(artifact) != "bundle":
            raise BadInput(f"verifying {artifact} needs the owner's vault: pass --vault BUNDLE/vault")
        vault = Path(artifact) / VAULT
    if not Path(vault).is_dir():
        raise BadInput(f"vault {vault} does not exist")
    owner = Vault(vault)
    fragile = FragileStore.find(vault)
    has_watermark = VAULT_RECORD in owner
    if not has_watermark and fragile is None:
        raise BadInput(f"vault {vault} holds neither a watermark nor a fragile enrolment")
    with open_runner(artifact, device=device) as runner:
        wm = verify_watermark(runner, owner, alpha=alpha) if has_watermark else None
        fr = verify_store(runner, fragile) if fragile is not None else None
        clean = evaluate_accuracy(runner, load_data(data, split)) if data is not None else None
    return VerifyResult(wm, fr, clean)


@dataclass(frozen=True)
class VerifyResults:
    results: tuple[VerifyResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.results)

    def to_json(self) -> dict[str, Any]:
        if len(self.results) == 1:
            return self.results[0].to_json()
        return {"results": [r.to_json() for r in self.results], "passed": self.passed}


def verify_artifacts(artifacts: list[str | Path], vault: str | Path | None = None, **kw: Any) -> VerifyResults:
    """``verify_artifact`` for several artifacts (e.g. FP32 and INT8 side by side) with one vault."""
    if vault is None and len(artifacts) > 1:
        vault = Path(artifacts[0]) / "vault" if artifact_kind(artifacts[0]) == "bundle" else None
    if len(artifacts) > 1:  # one claim over several artifacts: Bonferroni (spec 5.1)
        base = kw.pop("alpha", None)
        if base is None and vault is not None and Path(vault).is_dir():
            base = Vault(vault).get_json("watermark").get("alpha", 1e-3) if "watermark" in Vault(vault) else 1e-3
        # the fragile verdict is exact (no significance level), so only the watermark's alpha is corrected
        kw["alpha"] = (base or 1e-3) / len(artifacts)
    return VerifyResults(tuple(verify_artifact(a, vault, **kw) for a in artifacts))
