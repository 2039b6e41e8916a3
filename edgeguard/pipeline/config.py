"""The pipeline's config: one section per stage, each a typed config of the library it drives."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgeguard.attacks import MODES
from edgeguard.attacks.extraction import method_config
from edgeguard.config import Config, DataConfig, ModelConfig, load_yaml, require
from edgeguard.defenses import DefenseSpec
from edgeguard.errors import BadInput
from edgeguard.evaluate.bench import BenchConfig
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
class LibrarySection(Config):
    """A pipeline section around library configs (``LIBRARY``), the way ``QatConfig(base=PtqConfig)`` wraps one:
    the section's own keys (``enabled``, ...) plus every field of its library configs, flat in the YAML, kept in
    ``library`` and turned into the library config with ``from_mapping`` (so an unknown or ill-typed key fails at
    load time, and a new library field is settable from YAML with no edit here).  A library field reads like the
    section's own (``cfg.watermark.alpha``); ``DEFAULTS`` are the section's defaults where they differ from the
    library's.  ``seed`` is the run's, set once at the top level."""

    LIBRARY: ClassVar[tuple[type[Config], ...]] = ()
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    library: dict = field(default_factory=dict)

    @classmethod
    def library_fields(cls) -> dict[str, type[Config]]:
        out: dict[str, type[Config]] = {}
        for lib in cls.LIBRARY:
            for f in dataclasses.fields(lib):
                if f.name != "seed" and not _is_config_field(lib, f.name):
                    out.setdefault(f.name, lib)
        return out

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None, *, what: str | None = None) -> Config:
        params = dict(params or {})
        what = what or cls.__name__
        if "seed" in params:
            raise BadInput(f"{what}: set the run's seed once, at the top level (remove {what.split()[-1]}.seed)")
        own = {f.name for f in dataclasses.fields(cls)} - {"library"}
        lib = dict(params.pop("library", None) or {})
        lib.update({k: params.pop(k) for k in [k for k in params if k not in own]})
        known = cls.library_fields()
        unknown = sorted(set(lib) - set(known))
        if unknown:
            raise BadInput(f"{what}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(own | set(known)))}")
        params["library"] = lib
        return super().from_mapping(params, what=what)

    def __post_init__(self) -> None:
        built = {lib: self.library_config(lib, 0) for lib in self.LIBRARY}  # validates every key here, at load
        fields = type(self).library_fields()
        coerced = {k: getattr(built[fields[k]], k) for k in self.library}  # YAML lists -> the library's tuples
        object.__setattr__(self, "library", coerced)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in type(self).library_fields():
            raise AttributeError(f"{type(self).__name__} has no setting {name!r}")
        values = {**self.DEFAULTS, **(self.__dict__.get("library") or {})}
        if name in values:
            return values[name]
        f = next(f for f in dataclasses.fields(type(self).library_fields()[name]) if f.name == name)
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]

    def library_config(self, lib: type[Config], seed: int, **extra: Any) -> Any:
        names = {f.name for f in dataclasses.fields(lib)}
        values = {k: v for k, v in {**self.DEFAULTS, **self.library}.items() if k in names}
        if "seed" in names:
            values["seed"] = seed
        return lib.from_mapping({**values, **extra}, what=type(self).__name__)

    def params(self) -> dict[str, Any]:
        out = super().params()
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in out.pop("library").items()})
        return out


def _is_config_field(cls: type, name: str) -> bool:
    import typing

    hint = typing.get_type_hints(cls).get(name)
    return isinstance(hint, type) and issubclass(hint, Config)


@dataclass(frozen=True)
class PipelineBenchConfig(LibrarySection):
    """The bench stage: every shipped artifact timed side by side (``BenchConfig``'s fields)."""

    LIBRARY = (BenchConfig,)
    DEFAULTS = {"warmup": 3, "iterations": 30}
    enabled: bool = True


@dataclass(frozen=True)
class PipelineWatermarkConfig(LibrarySection):
    """The watermark stage: embed into the trained bundle, verify on every artifact (``WatermarkConfig``'s fields)."""

    LIBRARY = (WatermarkConfig,)
    enabled: bool = False
    key_seed: int | None = None  # None: a random secret key (recorded only in the vault)

    def to_watermark_config(self, seed: int):
        return self.library_config(WatermarkConfig, seed)


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
class PipelineMagicGuardConfig(LibrarySection):
    """The magicguard stage: insert the guard into the (watermarked) bundle, then fine-tune the guarded bundle and its
    stripped copy under each recipe and report accuracy over steps; the guarded bundle is what later stages ship.
    ``MagicGuardConfig``'s fields."""

    LIBRARY = (MagicGuardConfig,)
    enabled: bool = False
    destruction: DestructionConfig = field(default_factory=DestructionConfig)

    def to_magicguard_config(self, seed: int):
        return self.library_config(MagicGuardConfig, seed)


@dataclass(frozen=True)
class PipelineFragileConfig(LibrarySection):
    """The fragile stage: generate triggers against the shipped FP32 ONNX, enrol them on it (and the same triggers on
    the INT8 ONNX), re-verify, then tamper: one epoch of last-layer fine-tuning, and a tiny weight perturbation, each
    re-exported and verified against the original enrolment.  ``FragileConfig``'s fields, plus the tamper checks."""

    LIBRARY = (FragileConfig,)
    enabled: bool = False
    verifications: int = 20  # repeated verifications of the enrolled artifact (false alarms)
    finetune_epochs: int = 1
    finetune_lr: float = 1e-3  # the paper's SGD lr
    weight_noise: float = 1e-3  # Gaussian noise, times each weight tensor's std (docs/fragile.md, informational)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.verifications >= 1 and self.finetune_epochs >= 1, "fragile.verifications and finetune_epochs must be >= 1")
        require(self.weight_noise >= 0, "fragile.weight_noise must be >= 0")

    def to_fragile_config(self, seed: int):
        return self.library_config(FragileConfig, seed)


@dataclass(frozen=True)
class PipelineQuantizeConfig(LibrarySection):
    """The quantize stage: the protected bundle to INT8 (PTQ or QAT), shipped as a second ONNX file.  ``PtqConfig``'s
    fields, and ``QatConfig``'s for ``mode: qat``."""

    LIBRARY = (PtqConfig, QatConfig)
    enabled: bool = False
    mode: str = "ptq"
    max_accuracy_drop: float = 0.01  # the pipeline fails if INT8 loses more accuracy than this

    def __post_init__(self) -> None:
        require(self.mode in ("ptq", "qat"), "quantize.mode must be ptq or qat")
        super().__post_init__()
        self.to_quantize_config(0)

    def to_quantize_config(self, seed: int):
        base = self.library_config(PtqConfig, seed)
        return base if self.mode == "ptq" else self.library_config(QatConfig, seed, base=base)


@dataclass(frozen=True)
class PipelineExportConfig(LibrarySection):
    """The export stage: ``ExportConfig``'s fields, and the output defenses to ship and compare (one ONNX file
    each)."""

    LIBRARY = (ExportConfig,)
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
        super().__post_init__()  # validates opset and batch bounds
        require(self.defense_latency_iterations >= 1, "export.defense_latency_iterations must be >= 1")

    def params(self) -> dict[str, Any]:
        out = super().params()
        out["defense"] = [{"name": sp.name, "params": dict(sp.params)} for sp in self.defense]
        return out

    def export_config(self) -> ExportConfig:
        return self.library_config(ExportConfig, 0)  # type: ignore[return-value]


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
