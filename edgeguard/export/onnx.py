"""FP32 ONNX export: output = probabilities (softmax, later the defense head, inside the graph),
dynamic batch axis, edgeguard metadata, ``onnx.checker`` (full check), written atomically.

Before anything is written, the graph is run in ONNX Runtime on a seeded batch and compared with
PyTorch; a mismatch raises :class:`CheckFailed` and leaves no file behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeguard import __version__
from edgeguard.bundle import Bundle, load_bundle
from edgeguard.config import Config, require
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.evaluate.metrics import ParityResult, parity_from
from edgeguard.export.metadata import encode
from edgeguard.fileio import atomic_write, sha256_file
from edgeguard.progress import silenced

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
PARITY_ATOL = 1e-5


@dataclass(frozen=True)
class ExportConfig(Config):
    opset: int = 20  # TensorRT 10.0-10.3 (JetPack 6) parse opsets up to 20
    max_batch: int = 4096  # upper bound of the dynamic batch dimension
    check_samples: int = 64  # seeded inputs for the PyTorch vs ONNX Runtime self-check (0: skip)

    def __post_init__(self) -> None:
        require(13 <= self.opset <= 23, "opset must be between 13 and 23 (20 is what TensorRT on JetPack 6 reads)")
        require(self.max_batch >= 2, "max_batch must be at least 2")
        require(self.check_samples >= 0, "check_samples must be >= 0")


class Deployed(nn.Module):
    """What ships: the model (Normalize first) followed by the output head (softmax or a defense)."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.head = head if head is not None else nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model(x))


@dataclass(frozen=True)
class ExportResult:
    path: str
    sha256: str
    bytes: int
    opset: int
    source_sha256: str
    self_check_max_abs_diff: float | None
    self_check_top1_agreement: float | None
    passed: bool = True

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _quiet_exporter():
    """The dynamo exporter narrates on stdout/stderr; keep it for the error message only."""
    return silenced("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")


def to_onnx_proto(module: nn.Module, input_shape: tuple[int, ...], cfg: ExportConfig):
    """Export ``module`` (eval mode) to an in-memory ONNX ModelProto with a dynamic batch axis."""
    module = module.eval()
    example = (torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)),)
    batch = torch.export.Dim("batch", min=1, max=cfg.max_batch)
    with _quiet_exporter() as log:
        try:
            program = torch.onnx.export(
                module,
                example,
                None,
                dynamo=True,
                external_data=False,
                opset_version=cfg.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        except Exception as e:
            tail = log.getvalue().strip().splitlines()[-3:]
            raise BadInput(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}) {' '.join(tail)[:300]}") from None
    return program.model_proto


def self_check(proto, module: nn.Module, input_shape: tuple[int, ...], n: int, seed: int = 0) -> ParityResult:
    """ONNX Runtime vs PyTorch on ``n`` seeded inputs, before the graph is written anywhere."""
    import onnxruntime as ort

    x = torch.rand(n, *input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = module.eval()(x).numpy()
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return parity_from(ref, got, atol=PARITY_ATOL, a="pytorch", b="onnxruntime")


def finalize_onnx(proto, bundle: Bundle, *, precision: str = "fp32", defense=None, quantization=None):
    """Write edgeguard metadata into ``proto`` and run ``onnx.checker`` (full check)."""
    import onnx

    spec = bundle.spec
    meta = {
        "version": __version__,
        "arch": spec.arch,
        "classes": list(spec.classes),
        "input_shape": list(spec.input_shape),
        "normalization": {"mean": list(spec.mean), "std": list(spec.std), "in_graph": True},
        "precision": precision,
        "defense": defense or {"name": "none", "params": {}},
        "output": "probabilities",
        "source_sha256": bundle.sha256,
        "stages": [s["stage"] for s in bundle.stages],
    }
    if quantization is not None:
        meta["quantization"] = quantization
    del proto.metadata_props[:]
    for k, v in encode(meta).items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = f"edgeguard {__version__} export of {spec.arch} ({len(spec.classes)} classes, {precision})"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise CheckFailed(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    return proto


def _export_quantized(bundle: Bundle, out: Path, head, defense) -> ExportResult:
    """An INT8 bundle ships its stored QDQ graph, re-stamped with this bundle as the source."""
    import onnx

    if head is not None:
        raise BadInput("defense heads for INT8 bundles are appended to the QDQ graph (not available yet)")
    proto = onnx.load(str(bundle.path / "model.onnx"))
    quant = dict(bundle.manifest.get("quantization", {}))
    proto = finalize_onnx(proto, bundle, precision=bundle.manifest["precision"], defense=defense, quantization=quant)
    atomic_write(out, lambda t: onnx.save_model(proto, str(t)))
    return ExportResult(path=str(out), sha256=sha256_file(out), bytes=out.stat().st_size, opset=proto.opset_import[0].version,
                        source_sha256=bundle.sha256, self_check_max_abs_diff=None, self_check_top1_agreement=None)


def export_onnx(
    source: Bundle | str | Path,
    out: str | Path,
    cfg: ExportConfig | None = None,
    *,
    head: nn.Module | None = None,
    defense: dict[str, Any] | None = None,
) -> ExportResult:
    """Export a bundle to ``out`` (.onnx).  ``head`` maps logits to probabilities (default softmax)."""
    import onnx

    cfg = cfg or ExportConfig()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise BadInput(f"the export target must end in .onnx (got {out.name})")
    bundle = source if isinstance(source, Bundle) else load_bundle(source)
    if bundle.quantized:
        if cfg != ExportConfig():
            raise BadInput("an INT8 bundle ships the QDQ graph it was quantized to: export options do not apply")
        return _export_quantized(bundle, out, head, defense)
    spec = bundle.spec
    module = Deployed(bundle.load_model(), head).eval()
    proto = to_onnx_proto(module, spec.input_shape, cfg)

    proto = finalize_onnx(proto, bundle, defense=defense)
    diff = agree = None
    if cfg.check_samples:
        parity = self_check(proto, module, spec.input_shape, cfg.check_samples)
        diff, agree = parity.max_abs_diff, parity.top1_agreement
        if not parity.passed:  # NaN compares false, so a broken model fails here too
            raise CheckFailed(
                f"ONNX Runtime disagrees with PyTorch on the exported graph (max |Δprob| {diff:.2e}, "
                f"top-1 agreement {agree:.4f}); nothing was written"
            )
    atomic_write(out, lambda t: onnx.save_model(proto, str(t)))
    return ExportResult(
        path=str(out),
        sha256=sha256_file(out),
        bytes=out.stat().st_size,
        opset=cfg.opset,
        source_sha256=bundle.sha256,
        self_check_max_abs_diff=diff,
        self_check_top1_agreement=agree,
    )
