"""``edgeguard import``: a user's model becomes a bundle (see :mod:`edgeguard.models.imported` for what is
recorded and refused).  The bundle then goes through protect / quantize / export / verify like a trained one."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeguard.bundle import ModelSpec, check_target, save_bundle, stage_record
from edgeguard.config import DataConfig
from edgeguard.data import load_data
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.fileio import sha256_bytes
from edgeguard.models import count_parameters
from edgeguard.models.base import EdgeModel
from edgeguard.models.imported import ImportedNet, find_head, fit_weights, probe, read_weights
from edgeguard.models.sources import ARCH, call_factory, factory_record, load_program, program_input_shape
from edgeguard.results import Result

REBUILD_ATOL = 1e-5


@dataclass(frozen=True)
class ImportResult(Result):
    bundle: str
    sha256: str
    kind: str  # factory | program
    source: str
    head: str
    head_is_last: bool
    outputs: str  # what the module returns: logits | probabilities (then edgeguard takes their log)
    parameters: int
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str | None
    weights: str | None
    passed: bool = True

    def summary(self) -> str:
        return (f"bundle {self.bundle} (sha256 {self.sha256[:12]}): imported {self.source} ({self.kind}), "
                f"{self.parameters:,} parameters, {len(self.classes)} classes, input {'x'.join(map(str, self.input_shape))}, "
                f"head {self.head}, outputs {self.outputs}"
                + (f"; {self.weights}" if self.weights else ""))

def _program_bytes(obj: Any, input_shape: Sequence[int] | None) -> bytes:
    """An ExportedProgram (or an nn.Module, exported here with a dynamic batch) as .pt2 bytes."""
    if isinstance(obj, nn.Module):
        if input_shape is None:
            raise BadInput("importing a module object needs input_shape=(C, H, W)")
        x = torch.rand(2, *input_shape)
        try:
            ep = torch.export.export(obj.eval(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        except Exception as e:
            raise BadInput(f"torch.export cannot capture this module ({type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0][:200]}); pass a factory instead") from None
        obj = ep
    buf = io.BytesIO()
    torch.export.save(obj, buf)
    return buf.getvalue()


def parse_classes(classes: int | Sequence[str] | str | Path | None, data_info) -> tuple[str, ...]:
    if classes is None:
        if data_info is None:
            raise BadInput("say how many classes the model has: --classes N, a names file, or --dataset")
        return tuple(data_info.classes)
    if isinstance(classes, bool):
        raise BadInput("classes must be a count or a list of names")
    if isinstance(classes, int):
        if classes < 2:
            raise BadInput(f"a classifier needs at least 2 classes (got {classes})")
        return tuple(str(i) for i in range(classes))
    if isinstance(classes, (str, Path)):
        s = str(classes)
        if s.isdigit():
            return parse_classes(int(s), data_info)
        p = Path(s)
        if not p.is_file():
            raise BadInput(f"--classes {s}: neither a count nor a names file")
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        return parse_classes(names, data_info)
    names = tuple(str(c) for c in classes)
    if len(names) < 2 or len(set(names)) != len(names):
        raise BadInput("class names must be at least 2 distinct names")
    return names


def _source_module(source, weights, factory_args, input_shape, data_info, tmp: Path):
    """The user's module from a program (``.pt2`` file, ExportedProgram, nn.Module) or a factory (+ state dict):
    (module, source record, label, program file, input shape, weights report)."""
    program_path = None
    weights_report = None
    if isinstance(source, (nn.Module, torch.export.ExportedProgram)) or str(source).endswith(".pt2"):
        if isinstance(source, (str, Path)):
            p = Path(source)
            if not p.is_file():
                raise BadInput(f"{p} does not exist")
            blob, label = p.read_bytes(), str(p)
        else:
            shape_hint = input_shape or (tuple(data_info.input_shape) if data_info else None)
            blob, label = _program_bytes(source, shape_hint), type(source).__name__
        if weights is not None:
            raise BadInput("an ExportedProgram carries its own weights; --weights applies to a factory")
        module = load_program(blob, label)
        program_path = tmp / "program.pt2"
        program_path.write_bytes(blob)
        rec: dict[str, Any] = {"kind": "program", "target": label, "sha256": sha256_bytes(blob)}
        graph_shape = program_input_shape(module)
        if input_shape is None and graph_shape is None and data_info is None:
            raise BadInput(f"{label} has dynamic spatial dimensions: give --input-shape C,H,W")
        if input_shape is not None and graph_shape is not None and tuple(input_shape) != graph_shape:
            raise BadInput(f"--input-shape {tuple(input_shape)} disagrees with the program's input {graph_shape}")
        input_shape = input_shape or graph_shape
    elif str(source).endswith((".pt", ".pth", ".bin", ".pkl")):
        raise BadInput(f"{source} is a saved PyTorch file, not a model source: a pickled whole model is refused "
                       "(unpickling it would run code from the file); pass its factory with --weights "
                       "STATE_DICT, or a torch.export .pt2")
    else:
        rec = factory_record(str(source), factory_args)
        label = rec["target"]
        module = call_factory(rec)
        if weights is not None:
            weights_report = fit_weights(module, read_weights(weights), str(weights))
            rec["weights"] = {"file": Path(weights).name, "sha256": sha256_bytes(Path(weights).read_bytes())}
    return module, rec, label, program_path, input_shape, weights_report


def _io_contract(input_shape, classes, data_info, mean, std):
    """Input shape (C, H, W), class names and per-channel normalisation, checked against each other and the dataset."""
    if input_shape is None:
        if data_info is None:
            raise BadInput("give the model's input shape: --input-shape C,H,W (or --dataset)")
        input_shape = tuple(data_info.input_shape)
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise BadInput(f"input shape must be C,H,W with positive sizes (got {input_shape})")
    names = parse_classes(classes, data_info)
    if data_info is not None:
        if len(data_info.classes) != len(names):
            raise BadInput(f"the model is given {len(names)} classes but dataset {data_info.name!r} has "
                           f"{len(data_info.classes)}")
        if tuple(data_info.input_shape) != shape:
            raise BadInput(f"dataset {data_info.name!r} has images {tuple(data_info.input_shape)}, the model takes {shape}")
    c = shape[0]
    mean_t = tuple(float(v) for v in (mean if mean is not None else (0.0,) * c))
    std_t = tuple(float(v) for v in (std if std is not None else (1.0,) * c))
    if len(mean_t) != c or len(std_t) != c:
        raise BadInput(f"--mean/--std need {c} values, one per input channel")
    if min(std_t) <= 0:
        raise BadInput("--std values must be positive")
    return shape, names, mean_t, std_t


def _check_rebuild(spec: ModelSpec, model: nn.Module, shape: tuple[int, ...]) -> None:
    """What a later stage gets back from the bundle must compute what was imported (a factory whose architecture
    depends on chance is refused)."""
    rebuilt = spec.build()  # what a later stage will get back from the bundle
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = float((rebuilt.eval()(x) - model(x)).abs().max())
    if not d <= REBUILD_ATOL:
        raise CheckFailed(f"the model rebuilt from the recorded source differs from the imported one (max |Δ| "
                          f"{d:.2e}); the factory is not deterministic in its architecture")


def import_model(
    source: str | Path | nn.Module | Any,
    *,
    out: str | Path,
    input_shape: Sequence[int] | None = None,
    classes: int | Sequence[str] | str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    weights: str | Path | None = None,
    factory_args: Mapping[str, Any] | None = None,
    head: str | None = None,
    data: DataConfig | None = None,
) -> ImportResult:
    """Import ``source`` -- ``"pkg.mod:factory"``, ``"file.py:factory"``, a ``.pt2`` path, an ``nn.Module`` or an
    ``ExportedProgram`` -- as a bundle at ``out``.  ``mean``/``std``: the normalisation the model expects on inputs
    in [0, 1] (default none); ``data``: the dataset it belongs to (evaluation, calibration, trigger embedding)."""
    check_target(out)
    data_info = None
    if data is not None:
        data_info = load_data(data, "train").info
    tmp = tempfile.TemporaryDirectory(prefix="edgeguard-import-")
    try:
        program_path = None
        weights_report = None
        module, rec, label, program_path, input_shape, weights_report = _source_module(
            source, weights, factory_args, input_shape, data_info, Path(tmp.name))
        shape, names, mean_t, std_t = _io_contract(input_shape, classes, data_info, mean, std)
        if rec["kind"] == "factory":
            module.eval()  # an exported program is fixed in the mode it was exported in
        head_path = find_head(module, len(names), head)
        found = probe(module, shape, len(names), head_path)
        rec.update(head=head_path, head_is_last=found["head_is_last"], outputs=found["outputs"])
        net = ImportedNet(module, head_path, program=rec["kind"] == "program", head_is_last=found["head_is_last"],
                          outputs=found["outputs"])
        model = EdgeModel(net, mean_t, std_t, head_path=f"net.module.{head_path}").eval()
        spec = ModelSpec(ARCH, len(names), names, shape, mean_t, std_t, {}, source=rec,
                         program_path=str(program_path) if program_path else None)
        _check_rebuild(spec, model, shape)
        stage = stage_record("import", None, source=label, kind=rec["kind"], head=head_path,
                             head_is_last=found["head_is_last"], outputs=found["outputs"], weights=weights_report,
                             data=data.to_dict() if data is not None else None, parameters=count_parameters(module))
        bundle = save_bundle(out, model, spec, stages=[stage], dataset=data.name if data is not None else None)
    finally:
        tmp.cleanup()
    return ImportResult(str(bundle.path), bundle.sha256, rec["kind"], label, head_path, found["head_is_last"],
                        found["outputs"], count_parameters(module), shape, names, mean_t, std_t,
                        data.name if data is not None else None, weights_report)
