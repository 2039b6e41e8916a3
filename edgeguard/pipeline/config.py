"""The pipeline's config: one section per stage, each a typed config of the library it drives."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeguard.attacks import MODES
from edgeguard.attacks.extraction import method_config
from edgeguard.config import Config, DataConfig, ModelConfig, load_yaml, require
from edgeguard.defenses import DefenseSpec
from edgeguard.errors import BadInput
from edgeguard.evaluate.destruction import DestructionConfig
from edgeguard.export import ExportConfig
from edgeguard.protect import WatermarkConfig
from edgeguard.protect.fragile import FragileConfig
from edgeguard.protect.magicguard import MagicGuardConfig
from edgeguard.quantize import PtqConfig, QatConfig
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
class PipelineWatermarkConfig(Config):
    """The watermark stage: embed into the trained bundle, verify on every artifact."""

    enabled: bool = False
    mode: str = "pretrained"
    n_triggers: int = 100
    trigger_batch: int = 16
    epochs: int = 20
    lr: float = 0.01
    alpha: float = 1e-3
    trigger_dir: str | None = None
    labels: str | None = None
    key_seed: int | None = None  # None: a random secret key (recorded only in the vault)

    def to_watermark_config(self, seed: int):
        return WatermarkConfig(
            mode=self.mode, n_triggers=self.n_triggers, trigger_batch=self.trigger_batch, epochs=self.epochs,
            lr=self.lr, alpha=self.alpha, trigger_dir=self.trigger_dir, labels=self.labels, seed=seed,
        )


@dataclass(frozen=True)
class PipelineAttacksConfig(Config):
    """Removal attacks run on the watermarked bundle; each result is exported and checked as ONNX."""

    modes: tuple[str, ...] = ()
    epochs: int = 20
    lr: float = 0.01
    data_fraction: float = 1.0

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        require(not bad, f"unknown attack mode {bad[0] if bad else ''!r}; known: {', '.join(MODES)}")


@dataclass(frozen=True)
class PipelineMagicGuardConfig(Config):
    """The magicguard stage: insert the guard into the (watermarked) bundle, then fine-tune the guarded bundle and its
    stripped copy under each recipe and report accuracy over steps; the guarded bundle is what later stages ship."""

    enabled: bool = False
    a: float = 0.01
    w: float = 1e4
    site: str = "logits"
    ratio: float = 1.0
    variant: str = "sine"
    destruction: DestructionConfig = field(default_factory=DestructionConfig)

    def __post_init__(self) -> None:
        self.to_magicguard_config(0)  # validates a, w, ratio, variant at load time

    def to_magicguard_config(self, seed: int):
        return MagicGuardConfig(a=self.a, w=self.w, site=self.site, ratio=self.ratio, variant=self.variant, seed=seed)


@dataclass(frozen=True)
class PipelineFragileConfig(Config):
    """The fragile stage: generate triggers against the shipped FP32 ONNX, enrol them on it (and the same triggers on
    the INT8 ONNX), re-verify, then tamper: one epoch of last-layer fine-tuning, and a tiny weight perturbation, each
    re-exported and verified against the original enrolment."""

    enabled: bool = False
    n: int = 100
    steps: int = 300
    margin: float = 0.2
    verifications: int = 20  # repeated verifications of the enrolled artifact (false alarms)
    finetune_epochs: int = 1
    finetune_lr: float = 1e-3  # the paper's SGD lr
    weight_noise: float = 1e-3  # Gaussian noise, times each weight tensor's std (spec F10, informational)

    def __post_init__(self) -> None:
        self.to_fragile_config(0)
        require(self.verifications >= 1 and self.finetune_epochs >= 1, "fragile.verifications and finetune_epochs must be >= 1")
        require(self.weight_noise >= 0, "fragile.weight_noise must be >= 0")

    def to_fragile_config(self, seed: int):
        return FragileConfig(n=self.n, steps=self.steps, margin=self.margin, seed=seed)


@dataclass(frozen=True)
class PipelineQuantizeConfig(Config):
    """The quantize stage: the protected bundle to INT8 (PTQ or QAT), shipped as a second ONNX file."""

    enabled: bool = False
    mode: str = "ptq"
    target: str = "tensorrt"
    calibration: str = "histogram"
    calib_samples: int = 512
    epochs: int = 2  # QAT
    lr: float = 1e-3  # QAT
    max_accuracy_drop: float = 0.01  # the pipeline fails if INT8 loses more accuracy than this

    def __post_init__(self) -> None:
        require(self.mode in ("ptq", "qat"), "quantize.mode must be ptq or qat")
        require(self.target in ("tensorrt", "cpu"), "quantize.target must be tensorrt or cpu")

    def to_quantize_config(self, seed: int):
        base = PtqConfig(target=self.target, calibration=self.calibration, calib_samples=self.calib_samples, seed=seed)
        return base if self.mode == "ptq" else QatConfig(base=base, epochs=self.epochs, lr=self.lr, seed=seed)


@dataclass(frozen=True)
class PipelineExportConfig(Config):
    """The export stage: ONNX options, and the output defenses to ship and compare (one ONNX file each)."""

    opset: int = 20
    max_batch: int = 4096
    check_samples: int = 64
    defense: tuple = ()  # DefenseSpec mappings ({name, params}) or bare names
    defense_int8: bool = True  # also fuse each fusable defense into the INT8 graph when the quantize stage ran
    defense_latency_iterations: int = 40  # timed calls per batch size when comparing a defense with the undefended view

    def __post_init__(self) -> None:
        specs = []
        for d in self.defense:
            if isinstance(d, str):
                d = {"name": d}
            require(isinstance(d, (dict, DefenseSpec)), f"export.defense entries must be a name or {{name, params}}, got {d!r:.60}")
            specs.append(d if isinstance(d, DefenseSpec) else DefenseSpec.from_mapping(d, what="export.defense"))
        names = [sp.name + str(sorted(sp.params.items())) for sp in specs]
        require(len(set(names)) == len(names), "export.defense lists the same defense twice")
        object.__setattr__(self, "defense", tuple(specs))
        self.export_config()  # validates opset and batch bounds
        require(self.defense_latency_iterations >= 1, "export.defense_latency_iterations must be >= 1")

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["defense"] = [{"name": sp.name, "params": dict(sp.params)} for sp in self.defense]
        return out

    def export_config(self) -> ExportConfig:
        return ExportConfig(opset=self.opset, max_batch=self.max_batch, check_samples=self.check_samples)


@dataclass(frozen=True)
class PipelineExtractionConfig(Config):
    """The extraction stage: one attack against the shipped FP32 model with each listed defense."""

    enabled: bool = False
    method: str = "knockoff"
    defenses: tuple = ("none", "heuristic")  # names or {name, params}, exported like export.defense
    options: dict = field(default_factory=dict)  # the attack's options (budget, query_set, epochs, ...)

    def __post_init__(self) -> None:
        specs = []
        for d in self.defenses:
            d = {"name": d} if isinstance(d, str) else d
            require(isinstance(d, (dict, DefenseSpec)), f"extraction.defenses entries must be a name or {{name, params}}, got {d!r:.60}")
            specs.append(d if isinstance(d, DefenseSpec) else DefenseSpec.from_mapping(d, what="extraction.defenses"))
        object.__setattr__(self, "defenses", tuple(specs))
        method_config(self.method, self.options)  # an unknown method or option fails at load time

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["defenses"] = [{"name": sp.name, "params": dict(sp.params)} for sp in self.defenses]
        return out


@dataclass(frozen=True)
class PipelineServeConfig(Config):
    """The serve stage (opt-in, extra ``[serve]``): the shipped FP32 ONNX behind a real Triton Inference Server on
    loopback; the watermark verification and KnockoffNets run through it and are compared with the same checks on
    the file."""

    enabled: bool = False
    protocol: str = "http"  # or grpc
    budget: int = 500  # KnockoffNets queries through the server (Triton's own count is checked against it)
    epochs: int = 5  # surrogate training epochs (both runs)
    max_batch: int = 64

    def __post_init__(self) -> None:
        require(self.protocol in ("http", "grpc"), "serve.protocol must be http or grpc")
        require(self.budget >= 1 and self.epochs >= 1, "serve.budget and serve.epochs must be >= 1")


@dataclass(frozen=True)
class PipelineImportConfig(Config):
    """The import stage (YAML section ``import``): bring your own model instead of training one.  The fields are
    ``edgeguard import``'s options; the model belongs to the run's ``data`` (evaluation, calibration, triggers)."""

    source: str | None = None  # pkg.mod:factory, path/file.py:factory, or a torch.export .pt2 file
    weights: str | None = None  # a state dict (.pt/.pth, loaded weights_only, or .safetensors) for a factory
    factory_args: dict = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # C,H,W; default: the dataset's
    classes: str | None = None  # a count or a names file; default: the dataset's classes
    mean: tuple[float, ...] | None = None  # the normalisation the model expects on [0, 1] inputs
    std: tuple[float, ...] | None = None
    head: str | None = None  # the classifier's attribute path, where it cannot be found

    @property
    def enabled(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class PipelineConfig(Config):
    name: str = "pipeline"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    import_: PipelineImportConfig = field(default_factory=PipelineImportConfig)  # YAML: ``import``
    train: TrainConfig = field(default_factory=TrainConfig)
    export: PipelineExportConfig = field(default_factory=PipelineExportConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    watermark: PipelineWatermarkConfig = field(default_factory=PipelineWatermarkConfig)
    magicguard: PipelineMagicGuardConfig = field(default_factory=PipelineMagicGuardConfig)
    fragile: PipelineFragileConfig = field(default_factory=PipelineFragileConfig)
    quantize: PipelineQuantizeConfig = field(default_factory=PipelineQuantizeConfig)
    attacks: PipelineAttacksConfig = field(default_factory=PipelineAttacksConfig)
    extraction: PipelineExtractionConfig = field(default_factory=PipelineExtractionConfig)
    bench: PipelineBenchConfig = field(default_factory=PipelineBenchConfig)
    serve: PipelineServeConfig = field(default_factory=PipelineServeConfig)

    device: str = "cpu"

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> PipelineConfig:
        raw = load_yaml(path)
        for section in ("train", "bench"):
            if isinstance(raw.get(section), dict) and "seed" in raw[section]:
                raise BadInput(f"config {path}: set the run's seed once, at the top level (remove {section}.seed)")
            if isinstance(raw.get(section), dict) and "device" in raw[section]:
                raise BadInput(f"config {path}: set the device once, at the top level (remove {section}.device)")
        if "import_" in raw:
            raise BadInput(f"config {path}: the section is called import (not import_)")
        if "import" in raw:
            both = [k for k in ("model", "train") if k in raw]
            if both:
                raise BadInput(f"config {path}: a config either trains a model ({' and '.join(both)}) or imports "
                               "one (import), not both: remove one")
            raw["import_"] = raw.pop("import")
            if not isinstance(raw["import_"], dict) or not raw["import_"].get("source"):
                raise BadInput(f"config {path}: import needs a source (pkg.mod:factory, file.py:factory or a .pt2 file)")
        cfg = cls.from_mapping(raw, what=f"config {path}")
        return cfg.replace(**overrides)  # type: ignore[return-value]

    def train_config(self) -> TrainConfig:
        """The train section with the run's one seed and device."""
        return dataclasses.replace(self.train, seed=self.seed, device=self.device)
