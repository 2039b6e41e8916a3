"""What TensorRT engines depend on: the tensorrt module, the GPU, and the manifest beside every engine.

An engine (plan) runs only with the TensorRT version and the GPU architecture it was built with (docs/tensorrt.md), so
``edgeguard build-engine`` writes ``MODEL.engine.json`` beside ``MODEL.engine`` and the runner compares it with
the machine before deserializing anything.  The comparison (:func:`check_compatible`) is a pure function of two
mappings, so it is tested without tensorrt or a GPU.  tensorrt, cuda-python and torch are imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeguard.errors import BackendUnavailable, BadInput

MANIFEST_FORMAT = "edgeguard-engine"
MANIFEST_VERSION = 1
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
REBUILD = "rebuild it on this machine with: edgeguard build-engine MODEL.onnx --out {engine}"


def manifest_path(engine: str | Path) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def import_tensorrt(purpose: str = "build or run TensorRT engines"):
    """The tensorrt module, or :class:`BackendUnavailable` (exit 3) with one sentence."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError when libnvinfer is missing
        why = "is not installed" if isinstance(e, ImportError) else f"cannot be loaded ({type(e).__name__})"
        raise BackendUnavailable(
            f"cannot {purpose}: TensorRT {why} here; build and run engines on the target GPU or Jetson "
            "(pip install 'edgeguard[trt]' on an x86 GPU host, JetPack's python3-libnvinfer on a Jetson)"
        ) from None
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def gpu_properties() -> tuple[str, tuple[int, int]]:
    """(name, (major, minor)) of CUDA device 0, through torch when it sees a GPU, else cuda-python.

    Raises :class:`BackendUnavailable` when there is no CUDA GPU (or no way to ask)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]
    except ImportError:
        pass
    try:
        cudart = _cudart()
    except ImportError:
        raise BackendUnavailable("no CUDA GPU is visible here (torch sees none and cuda-python is not installed); "
                                 "TensorRT engines need an NVIDIA GPU or a Jetson") from None
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise BackendUnavailable("no CUDA GPU is visible here; TensorRT engines need an NVIDIA GPU or a Jetson")
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise BackendUnavailable(f"cannot query CUDA device 0 (error {int(err)})")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00"), (int(prop.major), int(prop.minor))


def l4t_release() -> str | None:
    """The first line of /etc/nv_tegra_release on a Jetson (e.g. ``# R36 (release), REVISION: 4.0, ...``)."""
    try:
        return TEGRA_RELEASE.read_text().splitlines()[0].lstrip("# ").strip() or None
    except (OSError, IndexError):
        return None


def environment(trt) -> dict[str, Any]:
    """The fingerprint an engine is tied to: TensorRT version, GPU name and compute capability, L4T."""
    name, cc = gpu_properties()
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": name,
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "l4t": l4t_release(),
    }


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def read_manifest(engine: str | Path) -> dict[str, Any]:
    """The manifest beside an engine; a missing or malformed one is :class:`BadInput` with a rebuild hint."""
    engine = Path(engine)
    path = manifest_path(engine)
    hint = REBUILD.format(engine=engine)
    if not path.is_file():
        raise BadInput(f"{engine} has no manifest {path.name} beside it, so its TensorRT version and GPU are unknown; {hint}")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput(f"{path} is not valid JSON; {hint}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise BadInput(f"{path} is not an edgeguard engine manifest; {hint}")
    if int(m.get("format_version", 0)) > MANIFEST_VERSION:
        raise BadInput(f"{path} was written by a newer edgeguard (manifest version {m['format_version']})")
    missing = [k for k in ("tensorrt_version", "compute_capability", "engine_sha256", "metadata", "profile") if k not in m]
    if missing:
        raise BadInput(f"{path} lacks {', '.join(missing)}; {hint}")
    return m


def check_compatible(manifest: dict[str, Any], env: dict[str, Any], *, engine: str | Path = "MODEL.engine") -> None:
    """Refuse an engine built for another TensorRT version or GPU architecture (before deserializing it).

    TensorRT plans are tied to the exact TensorRT version and to the compute capability (docs/tensorrt.md); the GPU name is
    recorded but not compared (two boards with one compute capability run the same plan).  Unless the engine was
    built version-compatible, the TensorRT versions must match exactly.  Raises :class:`BadInput` (exit 2)."""
    hint = REBUILD.format(engine=engine)
    built_cc, here_cc = str(manifest["compute_capability"]), str(env["compute_capability"])
    if built_cc != here_cc:
        raise BadInput(f"{engine} was built for compute capability {built_cc} ({manifest.get('gpu_name', '?')}) but this "
                       f"GPU is {here_cc} ({env.get('gpu_name', '?')}); {hint}")
    built, here = str(manifest["tensorrt_version"]), str(env["tensorrt_version"])
    if built != here:
        compatible = bool(manifest.get("flags", {}).get("version_compatible"))
        if not (compatible and _version(here) >= _version(built)):
            raise BadInput(f"{engine} was built with TensorRT {built} but this machine has TensorRT {here}; {hint}")
