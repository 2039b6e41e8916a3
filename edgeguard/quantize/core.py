"""``quantize(model, cfg, data)``: PT2E post-training quantization or QAT to INT8, one verb whose
config type picks the handler; ``quantize_bundle`` writes a quantized bundle.

A quantized bundle keeps the float weights it derives from (``model.pt``: the parent's for PTQ, the
fine-tuned ones for QAT) and the deployable QDQ graph (``model.onnx``, softmax in FP32 after the
logits).  ``open_runner`` runs a quantized bundle through that graph, so every check sees INT8.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from edgeguard.bundle import bundle_data_config, check_target, load_bundle, save_bundle, stage_record
from edgeguard.config import Config, DataConfig, require
from edgeguard.data import load_data
from edgeguard.errors import BackendUnavailable, BadInput, CheckFailed
from edgeguard.export.onnx import Deployed, ExportConfig, finalize_onnx, to_onnx_proto
from edgeguard.models import guard as magicguard
from edgeguard.progress import log, silenced
from edgeguard.protect.watermark import VAULT_RECORD, read_key
from edgeguard.quantize.quantizers import make_quantizer
from edgeguard.results import Result
from edgeguard.runtime.parity import parity_from
from edgeguard.training import Mix, TensorData, TrainConfig, fit


@dataclass(frozen=True)
class PtqConfig(Config):
    target: Literal["tensorrt", "cpu"] = "tensorrt"
    calibration: Literal["minmax", "histogram"] = "histogram"
    calib_samples: int = 512  # spec: at least 500 images for CNNs, from the training split
    calib_batch: int = 64
    calib_dataset: str | None = None  # default: the bundle's own training data
    calib_root: str | None = None
    exclude: tuple[str, ...] = ()  # module paths kept in float (e.g. a MagicGuard layer)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.calib_samples >= 2 and self.calib_batch >= 1, "calib_samples must be >= 2 and calib_batch >= 1")


@dataclass(frozen=True)
class QatConfig(Config):
    """QAT wraps the PTQ config (target, observers, exclusions) and fine-tunes with fake quantization."""

    base: PtqConfig = field(default_factory=PtqConfig)
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    freeze_observers_epoch: int = 0  # observers stop updating after this many epochs (0: never)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.epochs >= 1 and self.lr > 0, "epochs must be >= 1 and lr > 0")
        require(self.freeze_observers_epoch >= 0, "freeze_observers_epoch must be >= 0")


def _quiet_torchao():
    """torchao prints failures to load its CUDA kernels on CPU machines; they are irrelevant here."""
    return silenced("torchao", "torch.utils._pytree", "torch.export", "torch._dynamo")


def _pt2e():
    try:
        with _quiet_torchao():
            import torchao.quantization.pt2e as pt2e
            from torchao.quantization.pt2e import quantize_pt2e
    except ImportError:
        raise BackendUnavailable("quantization needs torchao: pip install torchao") from None
    return pt2e, quantize_pt2e


def _export(model: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    dim = torch.export.Dim("batch", min=1, max=4096)
    with _quiet_torchao():
        return torch.export.export(model, (example,), dynamic_shapes=({0: dim},)).module()


def _ptq(model: torch.nn.Module, cfg: PtqConfig, data, *, extra=None) -> torch.fx.GraphModule:
    pt2e, q = _pt2e()
    model = model.eval()
    x, _ = data.tensors(0, min(len(data), cfg.calib_samples))
    with _quiet_torchao():
        prepared = q.prepare_pt2e(_export(model, x[:2]), make_quantizer(cfg.target, cfg.calibration, exclude=cfg.exclude))
        with torch.no_grad():
            for s in range(0, len(x), cfg.calib_batch):
                prepared(x[s : s + cfg.calib_batch])
        converted = q.convert_pt2e(prepared)
        pt2e.move_exported_model_to_eval(converted)
        pt2e.allow_exported_model_train_eval(converted)
    return converted


class _FreezeObservers:
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, state) -> None:
        if self.epoch and state.epoch + 1 >= self.epoch:
            pt2e, _ = _pt2e()
            state.model.apply(pt2e.disable_observer)


def _qat(model: torch.nn.Module, cfg: QatConfig, data, *, extra=None) -> torch.fx.GraphModule:
    pt2e, q = _pt2e()
    x, _ = data.tensors(0, 2)
    model.train()
    with _quiet_torchao():
        prepared = q.prepare_qat_pt2e(_export(model, x), make_quantizer(cfg.base.target, qat=True, exclude=cfg.base.exclude))
        pt2e.allow_exported_model_train_eval(prepared)
    fit(prepared, data, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, schedule="cosine", seed=cfg.seed),
        extra=extra, hooks=[_FreezeObservers(cfg.freeze_observers_epoch)], desc="QAT")
    with _quiet_torchao():
        pt2e.move_exported_model_to_eval(prepared)
        converted = q.convert_pt2e(prepared)
        pt2e.move_exported_model_to_eval(converted)
        pt2e.allow_exported_model_train_eval(converted)
    model.load_state_dict({k: v for k, v in prepared.state_dict().items() if k in model.state_dict()}, strict=False)
    return converted


_HANDLERS: dict[type, Callable[..., torch.fx.GraphModule]] = {PtqConfig: _ptq, QatConfig: _qat}


def quantize(model: torch.nn.Module, cfg: PtqConfig | QatConfig, data, *, extra=None) -> torch.fx.GraphModule:
    """The one verb: the config's type picks PTQ or QAT.  QAT updates ``model``'s float weights in place."""
    try:
        handler = _HANDLERS[type(cfg)]
    except KeyError:
        raise BadInput(f"not a quantization config: {type(cfg).__name__}; use PtqConfig or QatConfig") from None
    return handler(model, cfg, data, extra=extra)


QDQ_MIN_AGREEMENT = 0.98  # top-1 agreement of ONNX Runtime's QDQ graph with the converted PT2E module


def _check_qdq_graph(proto, converted: torch.fx.GraphModule, data) -> None:
    """INT8 kernels round differently from PyTorch's reference ops, so parity is judged by top-1 on real images."""
    import onnxruntime as ort


    x, _ = data.tensors(0, min(len(data), 256))
    with torch.no_grad():
        ref = torch.softmax(converted(x), dim=1).numpy()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    p = parity_from(ref, got, atol=1.0)
    if not p.top1_agreement >= QDQ_MIN_AGREEMENT:
        raise CheckFailed(f"the exported QDQ graph agrees with the quantized model on only {p.top1_agreement:.1%} "
                          f"of {p.n} images (need {QDQ_MIN_AGREEMENT:.0%}); nothing was written")


@dataclass(frozen=True)
class QuantizeResult(Result):
    bundle: str
    sha256: str
    mode: str
    target: str
    onnx_bytes: int
    qdq_nodes: int
    passed: bool = True

    def summary(self) -> str:
        return (f"INT8 bundle {self.bundle} ({self.mode}, target {self.target}): {self.qdq_nodes} Q/DQ nodes, "
                f"QDQ graph {self.onnx_bytes:,} bytes")


def quantize_bundle(source: str | Path, out: str | Path, cfg: PtqConfig | QatConfig) -> QuantizeResult:
    """Quantize a float bundle and write an INT8 bundle (float weights + QDQ ONNX) to ``out``."""
    import onnx


    check_target(out)
    bundle = load_bundle(source)
    if bundle.quantized:
        raise BadInput(f"{source} is already quantized ({bundle.manifest['precision']}); quantize its float parent instead")
    spec = bundle.spec
    base = cfg if isinstance(cfg, PtqConfig) else cfg.base
    data_cfg = DataConfig(base.calib_dataset, root=base.calib_root) if base.calib_dataset else bundle_data_config(bundle)
    data = load_data(data_cfg, "train")
    if len(data) < 2:
        raise BadInput(f"calibration needs at least 2 images; {data_cfg.name!r} has {len(data)}")
    if data.info.input_shape != spec.input_shape:
        raise BadInput(f"calibration images are {data.info.input_shape} but the model takes {spec.input_shape}")
    g = torch.Generator().manual_seed(base.seed)
    data = data.subset(torch.randperm(len(data), generator=g))  # calibration / QAT order from the seed
    extra = None
    if isinstance(cfg, QatConfig):
        if data.num_classes != spec.num_classes:
            raise BadInput(f"QAT data has {data.num_classes} classes but the model has {spec.num_classes}")

        if VAULT_RECORD in bundle.vault:  # keep the watermark in: QAT is fine-tuning (spec pitfall 11)
            key, _ = read_key(bundle.vault)
            extra = Mix(TensorData(key.as_float(), key.labels), 16)
            log("QAT: mixing the bundle's watermark triggers into every batch")
    model = bundle.load_model()
    kept = magicguard.guard_paths(model)
    if kept:  # the guard stays FP32: quantizing w*x (range 1e4-1e6) would turn the ripple into noise (docs/magicguard.md)
        base = base.replace(exclude=tuple(dict.fromkeys((*base.exclude, *kept))))
        cfg = base if isinstance(cfg, PtqConfig) else cfg.replace(base=base)
        log(f"MagicGuard: {', '.join(kept)} kept in FP32" + ("; QAT runs in owner mode" if isinstance(cfg, QatConfig) else ""))
    with magicguard.owner_gradients(model):  # QAT is fine-tuning: through the guard it would destroy the model
        converted = quantize(model, cfg, data, extra=extra)
    proto = to_onnx_proto(Deployed(converted), spec.input_shape, ExportConfig())
    _check_qdq_graph(proto, converted, data)
    mode = "ptq" if isinstance(cfg, PtqConfig) else "qat"
    quant_meta = {"mode": mode, "target": base.target, "calibration": base.calibration if mode == "ptq" else "qat",
                  "calib_samples": min(len(data), base.calib_samples) if mode == "ptq" else None,
                  "parent_sha256": bundle.sha256}
    guard = magicguard.export_record(bundle.manifest, proto)
    proto = finalize_onnx(proto, bundle, precision="int8", quantization=quant_meta, magicguard=guard)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)
    stage = stage_record("quantize", cfg, mode=mode, target=base.target, qdq_nodes=qdq, data=data_cfg.to_dict())
    out_bundle = save_bundle(
        out, model, spec, stages=[*bundle.stages, stage], parent=bundle,
        extra={"precision": "int8", "quantization": quant_meta},
        extra_files={"model.onnx": lambda t: onnx.save_model(proto, str(t))},
    )
    return QuantizeResult(str(out_bundle.path), out_bundle.sha256, mode, base.target,
                          (out_bundle.path / "model.onnx").stat().st_size, qdq)
