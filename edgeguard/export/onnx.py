"""ONNX export: output = probabilities (softmax or a defense head, inside the graph), dynamic batch
axis, edgeguard metadata, ``onnx.checker`` (full check), written atomically.

The backbone (FP32 from PyTorch, or the stored QDQ graph of an INT8 bundle) is cut at its logits and the
defense head is grafted on in FP32 (:mod:`edgeguard.export.heads`).  Before anything is written the graph runs
in ONNX Runtime on a seeded batch: the backbone's softmax is compared with PyTorch (FP32) and the head with its
PyTorch module on the graph's own logits; a mismatch raises :class:`CheckFailed` and leaves no file behind.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeguard import __version__
from edgeguard.bundle import Bundle, load_bundle, torch_bytes
from edgeguard.config import Config, require
from edgeguard.defenses.none import NoDefense
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.export.heads import (
    LOGITS,
    cached_proto,
    check_head,
    expose_logits,
    graft_head,
    head_proto,
    with_logits_output,
)
from edgeguard.fileio import atomic_write, sha256_file
from edgeguard.models import guard as magicguard
from edgeguard.progress import quiet_exporter
from edgeguard.results import Result
from edgeguard.runtime.graph import INPUT_NAME, OUTPUT_NAME
from edgeguard.runtime.metadata import encode
from edgeguard.runtime.parity import parity_from

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
class ExportResult(Result):
    path: str
    sha256: str
    bytes: int
    opset: int
    source_sha256: str
    self_check_max_abs_diff: float | None
    self_check_top1_agreement: float | None
    defense: str = "none"
    placement: str = "graph"
    head_ops: tuple[str, ...] = ()
    head_check_max_abs_diff: float | None = None  # fused head vs its PyTorch module on the graph's own logits
    sidecar: str | None = None  # host-side defense state, next to the graph
    passed: bool = True

    def summary(self) -> str:
        check = ("stored QDQ graph of the INT8 bundle" if self.self_check_max_abs_diff is None else
                 f"self-check vs PyTorch: max |Δprob| {self.self_check_max_abs_diff:.2e}, "
                 f"top-1 agreement {self.self_check_top1_agreement:.4f}")
        if self.defense != "none":
            head = (f"; head check max |Δ| {self.head_check_max_abs_diff:.2e}" if self.head_check_max_abs_diff is not None
                    else "; random head, values not compared" if self.placement == "graph" else "")
            where = (f"fused in the graph ({', '.join(self.head_ops)})" if self.placement == "graph"
                     else f"host-side, state in {self.sidecar}")
            check += f"; defense {self.defense} {where}{head}"
        return f"wrote {self.path} ({self.bytes:,} bytes, opset {self.opset}, sha256 {self.sha256[:12]}); {check}"


def to_onnx_proto(module: nn.Module, input_shape: tuple[int, ...], cfg: ExportConfig):
    """Export ``module`` (eval mode) to an in-memory ONNX ModelProto with a dynamic batch axis."""
    module = module.eval()
    example = (torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)),)
    batch = torch.export.Dim("batch", min=1, max=cfg.max_batch)
    with quiet_exporter() as log:
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


def finalize_onnx(proto, bundle: Bundle, *, precision: str = "fp32", defense=None, quantization=None, magicguard=None):
    """Write edgeguard metadata into ``proto`` and run ``onnx.checker`` (full check)."""
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
    if magicguard is not None:
        meta["magicguard"] = magicguard
    return stamp(proto, meta, f"edgeguard {__version__} export of {spec.arch} ({len(spec.classes)} classes, {precision})")


def stamp(proto, meta: dict[str, Any], doc: str):
    """Replace ``proto``'s metadata with edgeguard's ``meta``, set its doc string, run ``onnx.checker`` (full)."""
    import onnx

    del proto.metadata_props[:]
    for k, v in encode(meta).items():
        proto.metadata_props.add(key=k, value=v)
    proto.doc_string = doc
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise CheckFailed(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    return proto


HEAD_ATOL = 1e-4  # fused head vs its PyTorch module on the same logits (the ν=1000 gate amplifies softmax rounding)


def sidecar_glob(out: Path) -> str:
    return f"{out.stem}.defense.*.pt"


def sidecar_path(out: Path, digest: str) -> Path:
    """Where a host-side defense keeps its state, next to the graph and named by its content:
    ``model.onnx`` -> ``model.defense.<sha256[:12]>.pt``.  A new export never overwrites the state file an
    existing graph points to, so an interrupted export leaves the previous pair intact."""
    return out.with_name(f"{out.stem}.defense.{digest[:12]}.pt")


def _check_inputs(input_shape: tuple[int, ...], n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *input_shape, generator=torch.Generator().manual_seed(seed))


HEAD_MAX_OFF_ROWS = 0.01  # discrete heads (rounding, codebooks, top-k) may resolve a float tie differently on a few rows


@dataclass(frozen=True)
class HeadCheck:
    max_abs_diff: float
    off_rows: float  # share of rows beyond HEAD_ATOL
    passed: bool


def head_check(proto, defense, x: torch.Tensor, logits_name: str = LOGITS) -> tuple[HeadCheck, np.ndarray]:
    """Run the defended graph with its logits exposed; compare the head with the PyTorch defense on those logits.

    Continuous heads must agree within HEAD_ATOL on every row.  Heads with discrete choices (a rounding step, a
    codeword, a top-k set) can flip on a float tie between PyTorch's and ONNX Runtime's softmax, so up to 1% of
    rows may differ; more than that, or any non-finite value, fails.
    """
    import onnxruntime as ort


    try:
        sess = ort.InferenceSession(with_logits_output(proto, logits_name).SerializeToString(),
                                    providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        outs = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()}), strict=True))
    except Exception as e:  # ORT raises its own exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckFailed(f"ONNX Runtime cannot run the exported graph ({first[:200]}); nothing was written") from None
    logits = outs[logits_name]
    with torch.no_grad():
        ref = defense(torch.from_numpy(logits), x).numpy()
    got = outs[proto.graph.output[0].name]
    diff = np.abs(ref.astype(np.float64) - got)
    finite = bool(np.isfinite(got).all() and np.isfinite(ref).all())
    off = float((diff.max(1) > HEAD_ATOL).mean()) if len(diff) else 0.0
    return HeadCheck(float(diff.max()) if diff.size else 0.0, off, finite and off <= HEAD_MAX_OFF_ROWS), logits


def _sidecar_bytes(defense, bundle: Bundle) -> bytes:
    """The host-side defense's state (config, the architecture to rebuild surrogates, tensors), serialised.  An imported
    model's architecture is its import record (a factory is called again, hash-checked, where the graph is served)."""
    spec = bundle.spec
    record = {
        "format": "edgeguard-host-defense",
        "version": 1,
        "name": defense.name,
        "params": defense.cfg.params() if defense.cfg is not None else {},
        "num_classes": defense.num_classes,
        "model": {"arch": spec.arch, "num_classes": spec.num_classes, "in_channels": spec.input_shape[0],
                  "input_shape": list(spec.input_shape), "mean": list(spec.mean), "std": list(spec.std),
                  "options": dict(spec.options), "source": spec.source},
        "state": {k: v.detach().cpu().clone() for k, v in defense.state_dict().items()},
    }
    program = spec.program_bytes()  # an imported torch.export program travels with the state: the host needs no bundle
    if program is not None:
        record["program"] = torch.frombuffer(bytearray(program), dtype=torch.uint8)
    return torch_bytes(record)


_BACKBONES: OrderedDict[tuple[str, str], Any] = OrderedDict()
_BACKBONES_KEPT = 2


def _backbone_proto(bundle: Bundle, model: torch.nn.Module, cfg: ExportConfig):
    """The bundle's FP32 graph.  torch.onnx takes about 1.5 s for a small CNN and the same bundle is often exported
    once per defense in a row (the pipeline's defenses stage, the grid), so the last two graphs are kept, keyed by
    the bundle's content hash and the export settings; every caller gets its own copy."""
    return cached_proto(_BACKBONES, (bundle.sha256, repr(cfg)), _BACKBONES_KEPT,
                        lambda: to_onnx_proto(Deployed(model), bundle.spec.input_shape, cfg))


def _self_check(proto, bundle: Bundle, model, defense, head_module, n: int):
    """ONNX Runtime against PyTorch on ``n`` inputs: the fused head (unless random) and, for an FP32 backbone, the
    whole graph's softmax.  Returns (max |Δprob|, top-1 agreement, head max |Δ|), None where not measured."""
    diff = agree = head_diff = None
    spec = bundle.spec
    if n:
        x = _check_inputs(spec.input_shape, n)
        if not head_module.is_random():
            head_parity, logits = head_check(proto, head_module, x)
            head_diff = head_parity.max_abs_diff if defense.placement == "graph" else None
            if not head_parity.passed:
                raise CheckFailed(f"ONNX Runtime disagrees with PyTorch on the {defense.name} head "
                                  f"({head_parity.off_rows:.1%} of rows beyond {HEAD_ATOL:g}, max |Δ| "
                                  f"{head_parity.max_abs_diff:.2e}); nothing was written")
        else:
            _, logits = head_check(proto, NoDefense(None, spec.num_classes), x)
        if model is not None:  # FP32 backbone: its softmax must match PyTorch as before
            with torch.no_grad():
                ref = torch.softmax(model(x), dim=1).numpy()
            got = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
            atol = magicguard.parity_atol(bundle.manifest, PARITY_ATOL)
            parity = parity_from(ref, got, atol=atol, a="pytorch", b="onnxruntime")
            diff, agree = parity.max_abs_diff, parity.top1_agreement
            if not parity.passed:  # NaN compares false, so a broken model fails here too
                raise CheckFailed(
                    f"ONNX Runtime disagrees with PyTorch on the exported graph (max |Δprob| {diff:.2e}, "
                    f"top-1 agreement {agree:.4f}); nothing was written"
                )
    return diff, agree, head_diff


def _write(out: Path, proto, bundle: Bundle, defense, record: dict, *, precision, quant, guard):
    """Write the graph (and a host-side defense's state file, named by its hash, recorded in the graph first);
    remove state files of earlier exports to ``out``.  Returns the final graph and the state file written."""
    import onnx

    written_sidecar: Path | None = None
    existed = False
    if defense.placement != "graph":
        blob = _sidecar_bytes(defense, bundle)
        digest = hashlib.sha256(blob).hexdigest()
        written_sidecar = sidecar_path(out, digest)
        existed = written_sidecar.exists()
        atomic_write(written_sidecar, lambda t: t.write_bytes(blob))
        record["sidecar"], record["sidecar_sha256"] = written_sidecar.name, digest
        proto = finalize_onnx(proto, bundle, precision=precision, defense=record, quantization=quant, magicguard=guard)
    try:
        atomic_write(out, lambda t: onnx.save_model(proto, str(t)))
    except BaseException:
        if written_sidecar is not None and not existed:
            written_sidecar.unlink(missing_ok=True)
        raise
    for stale in out.parent.glob(sidecar_glob(out)):  # state files of earlier exports to this path
        if written_sidecar is None or stale.name != written_sidecar.name:
            stale.unlink(missing_ok=True)
    return proto, written_sidecar


def export_onnx(
    source: Bundle | str | Path,
    out: str | Path,
    cfg: ExportConfig | None = None,
    *,
    defense=None,
) -> ExportResult:
    """Export a bundle to ``out`` (.onnx) with ``defense`` (a built :class:`~edgeguard.defenses.Defense`; default
    ``none``) as the output head.

    Fusable defenses are appended in FP32 after the logits, for FP32 bundles and for the QDQ graph of INT8 bundles
    alike.  A host-side defense ships the undefended graph plus its state in ``model.defense.pt``; ``open_runner``
    serves the pair through :class:`~edgeguard.runtime.defended.HostDefenseRunner`.
    """
    import onnx


    cfg = cfg or ExportConfig()
    out = Path(out)
    if out.suffix.lower() != ".onnx":
        raise BadInput(f"the export target must end in .onnx (got {out.name})")
    bundle = source if isinstance(source, Bundle) else load_bundle(source)
    spec = bundle.spec
    defense = defense if defense is not None else NoDefense(None, spec.num_classes)
    if defense.num_classes != spec.num_classes:
        raise BadInput(f"the {defense.name} defense was built for {defense.num_classes} classes, the model has {spec.num_classes}")
    quant = None
    model = None
    if bundle.quantized:
        if cfg != ExportConfig():
            raise BadInput("an INT8 bundle ships the QDQ graph it was quantized to: export options do not apply")
        stored = onnx.load(str(bundle.path / "model.onnx"))
        backbone = expose_logits(stored)
        precision = bundle.manifest["precision"]
        quant = dict(bundle.manifest.get("quantization", {}))
        opset = next(o.version for o in stored.opset_import if o.domain in ("", "ai.onnx"))
    else:
        model = bundle.load_model().eval()
        backbone = expose_logits(_backbone_proto(bundle, model, cfg))
        precision, opset = "fp32", cfg.opset
    head_module = defense if defense.placement == "graph" else NoDefense(None, spec.num_classes)
    head = head_proto(head_module, spec.input_shape, opset, cfg.max_batch)
    proto = graft_head(backbone, head, backbone.graph.input[0].name)
    network_ops = frozenset(n.op_type for n in backbone.graph.node) if head_module.needs_input else frozenset()
    ops = check_head(proto, allow_random=head_module.is_random(), network_ops=network_ops)
    record = {**defense.describe(), "logits": LOGITS, "head_ops": ops}
    if defense.placement != "graph":
        record["sidecar"] = None  # filled in below, once the state file is written
        record["sidecar_sha256"] = None
    guard = magicguard.export_record(bundle.manifest, proto)  # FP32 guard nodes, no Q/DQ inside (else CheckFailed)
    proto = finalize_onnx(proto, bundle, precision=precision, defense=record, quantization=quant, magicguard=guard)

    diff, agree, head_diff = _self_check(proto, bundle, model, defense, head_module, cfg.check_samples)
    proto, written_sidecar = _write(out, proto, bundle, defense, record, precision=precision, quant=quant, guard=guard)
    return ExportResult(
        path=str(out),
        sha256=sha256_file(out),
        bytes=out.stat().st_size,
        opset=opset,
        source_sha256=bundle.sha256,
        self_check_max_abs_diff=diff,
        self_check_top1_agreement=agree,
        defense=defense.name,
        placement=defense.placement,
        head_ops=tuple(record["head_ops"]),
        head_check_max_abs_diff=head_diff,
        sidecar=str(written_sidecar) if written_sidecar is not None else None,
    )
