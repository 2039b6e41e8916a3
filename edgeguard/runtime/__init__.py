"""Runners: ``open_runner(path)`` picks the backend from the artifact; every check takes a Runner.

Dispatch is one table: a bundle folder -> TorchRunner, ``.onnx`` -> OrtRunner, ``.engine``/``.plan`` ->
TrtRunner, an ``http://``/``grpc://`` endpoint URL -> RemoteRunner (Open Inference Protocol).  Each backend
module is imported only when its row is used.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edgeguard.bundle import is_bundle, load_bundle
from edgeguard.errors import BadInput
from edgeguard.runtime.base import Runner, RunnerInfo
from edgeguard.runtime.defended import HostDefenseRunner, load_host_defense
from edgeguard.runtime.endpoint import is_remote, parse_endpoint, remote_settings
from edgeguard.training import resolve_device

_BACKENDS = {
    "bundle": ("edgeguard.runtime.torch_runner", "TorchRunner"),
    ".onnx": ("edgeguard.runtime.ort_runner", "OrtRunner"),
    ".engine": ("edgeguard.runtime.trt_runner", "TrtRunner"),
    ".plan": ("edgeguard.runtime.trt_runner", "TrtRunner"),
    "remote": ("edgeguard.runtime.remote", "RemoteRunner"),
}


def artifact_kind(path: str | Path) -> str:
    if is_remote(path):
        parse_endpoint(str(path))  # a malformed URL is refused here, before any connection
        return "remote"
    p = Path(path)
    if p.is_symlink() and not p.exists():
        raise BadInput(f"{p} is a symbolic link that leads nowhere (dangling, or a loop)")
    if p.is_dir():
        if not is_bundle(p):
            raise BadInput(f"{p} is a folder but not an edgeguard bundle (no manifest.json in it)")
        return "bundle"
    if p.suffix.lower() in _BACKENDS:
        if not p.exists():
            raise BadInput(f"{p} does not exist")
        return p.suffix.lower()
    if not p.exists():
        raise BadInput(f"{p} does not exist")
    raise BadInput(f"cannot open {p}: expected a bundle folder, a .onnx file or a .engine file")


def open_runner(
    path: str | Path,
    *,
    device: str | None = None,
    providers=None,
    batch_size: int | None = None,
    undefended: bool = False,
) -> Runner:
    """Open an artifact for prediction; the returned runner is already activated.

    An ONNX graph exported with a host-side defense comes back wrapped in a :class:`HostDefenseRunner`.
    ``undefended=True`` gives the same graph without its defense (``softmax(logits)``), for measurements.
    """
    kind = artifact_kind(path)
    if undefended and kind != ".onnx":
        raise BadInput(f"{path} is not an ONNX graph: only an exported .onnx file has an undefended view")
    if kind == "remote":  # runs where it is served: --device and providers do not apply
        module, cls = _BACKENDS[kind]
        kw = {} if batch_size is None else {"batch_size": batch_size}
        return getattr(importlib.import_module(module), cls)(str(path), **kw).open()
    if device is not None:
        resolve_device(device)  # an unknown or unavailable device is refused for every kind of artifact
    module, cls = _BACKENDS[kind]
    runner_cls = getattr(importlib.import_module(module), cls)
    kw = {} if batch_size is None else {"batch_size": batch_size}
    if kind == "bundle":
        bundle = load_bundle(path)  # verifies every file, model.onnx of an INT8 bundle included
        if bundle.quantized:  # an INT8 bundle runs its QDQ graph: the checks see what will ship
            module, cls = _BACKENDS[".onnx"]
            runner_cls = getattr(importlib.import_module(module), cls)
            onnx_path = Path(path) / "model.onnx"
            runner = runner_cls(onnx_path, providers=providers, **kw).open()
            want, got = bundle.manifest["files"]["model.onnx"]["sha256"], runner.info.sha256
            if got != want or runner.info.precision != bundle.manifest["precision"]:
                runner.close()
                raise BadInput(f"{onnx_path} is not the graph this INT8 bundle recorded (modified while opening?)")
            return runner
        kw["device"] = device
    elif kind == ".onnx":
        kw["providers"] = providers or (["cuda"] if device and device.startswith("cuda") else None)
        runner = runner_cls(path, undefended=undefended, **kw).open()
        record = runner.metadata.get("defense")
        if isinstance(record, dict) and record.get("placement") == "host":
            if undefended:
                return runner

            try:
                defense = load_host_defense(Path(path), record)
            except BaseException:
                runner.close()
                raise
            return HostDefenseRunner(runner, defense).open()
        return runner
    return runner_cls(path, **kw).open()


__all__ = ["Runner", "RunnerInfo", "artifact_kind", "is_remote", "open_runner", "remote_settings"]
