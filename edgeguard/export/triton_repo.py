"""A Triton model repository for the production container: ``REPO/NAME/config.pbtxt`` + ``REPO/NAME/1/model.*``.

An ONNX graph runs on Triton's ``onnxruntime`` backend (``platform: "onnxruntime_onnx"``), a TensorRT engine on its
``tensorrt`` backend (``platform: "tensorrt_plan"``; built on the serving GPU with the same TensorRT as the
container).  No Python runs in the server, so the output defense must be fused in the graph: a graph whose defense
runs on the host (``model.defense.pt`` beside it) is refused -- it would ship undefended; serve it with
``edgeguard serve``.  The config's ``parameters["edgeguard"]`` carries the same public info as ``edgeguard serve``,
so a RemoteRunner reads precision, defense and classes from either server.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeguard import __version__
from edgeguard.bundle import is_bundle, load_bundle
from edgeguard.config import Config, require
from edgeguard.errors import BadInput
from edgeguard.fileio import atomic_dir, sha256_file
from edgeguard.results import Result
from edgeguard.runtime import artifact_kind, open_runner
from edgeguard.runtime.endpoint import PARAMETER
from edgeguard.runtime.metadata import decode, public_info
from edgeguard.runtime.trt_env import read_manifest


def check_model_settings(name: str, max_batch: int, max_queue_delay_us: int, instances: int) -> None:
    """What Triton accepts for a model's name, batching and instances (``serve`` and the repository alike)."""
    require(bool(re.fullmatch(r"[A-Za-z0-9._-]+", name)),
            f"--name {name!r}: a model name takes letters, digits, '.', '_' and '-' only")
    require(1 <= max_batch <= 4096, f"--max-batch must lie in 1..4096, got {max_batch}")
    require(0 <= max_queue_delay_us <= 10_000_000, "--max-queue-delay-us must lie in 0..10000000")
    require(1 <= instances <= 64, f"--instances must lie in 1..64, got {instances}")


@dataclass(frozen=True)
class TritonRepoConfig(Config):
    name: str = "model"
    max_batch: int = 64  # the config's max_batch_size
    max_queue_delay_us: int = 100  # dynamic batching
    instances: int = 1  # instance_group count
    kind: str = "auto"  # auto: KIND_GPU for an engine, KIND_CPU for ONNX; or cpu / gpu

    def __post_init__(self) -> None:
        check_model_settings(self.name, self.max_batch, self.max_queue_delay_us, self.instances)
        require(self.kind in ("auto", "cpu", "gpu"), f"--kind must be auto, cpu or gpu, got {self.kind!r}")


@dataclass(frozen=True)
class TritonRepoResult(Result):
    repo: str
    model_dir: str
    config: str
    platform: str
    model_file: str
    sha256: str
    info: dict[str, Any]
    max_batch: int = 0
    instances: int = 1
    passed: bool = True

    def summary(self) -> str:
        return (f"wrote {self.model_dir}: {self.platform}, max_batch_size {self.max_batch}, {self.instances} "
                f"instance(s), defense {self.info['defense']['name']}, model sha256 {self.sha256[:12]}")


def _q(s: str) -> str:
    return json.dumps(s)  # a protobuf text-format string literal (JSON escaping is a subset it reads)


def config_pbtxt(cfg: TritonRepoConfig, *, platform: str, input_name: str, chw: tuple[int, ...], output_name: str,
                 classes: int, kind: str, public: dict[str, Any]) -> str:
    dims = ", ".join(str(int(d)) for d in chw)
    return (
        f"name: {_q(cfg.name)}\n"
        f"platform: {_q(platform)}\n"
        f"max_batch_size: {cfg.max_batch}\n"
        f"input [\n  {{\n    name: {_q(input_name)}\n    data_type: TYPE_FP32\n    dims: [ {dims} ]\n  }}\n]\n"
        f"output [\n  {{\n    name: {_q(output_name)}\n    data_type: TYPE_FP32\n    dims: [ {classes} ]\n  }}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {cfg.max_queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {cfg.instances}\n    kind: {kind}\n  }}\n]\n"
        f"parameters {{\n  key: {_q(PARAMETER)}\n  value {{\n    string_value: {_q(json.dumps(public, sort_keys=True))}\n  }}\n}}\n"
    )


def _onnx_facts(path: Path, cfg: TritonRepoConfig) -> dict[str, Any]:
    import onnx

    with open_runner(path) as runner:  # validates the graph, reads edgeguard's metadata
        record = runner.info.defense_record
        if record.placement == "host":
            raise BadInput(f"{path} runs its {record.name!r} defense on the host (model.defense.pt), which a "
                           "Triton repository cannot carry -- it would ship undefended; use `edgeguard serve` for it, "
                           "or export with a defense that fuses into the graph")
        public = public_info(runner)
        info = runner.info
    g = onnx.load(str(path), load_external_data=False).graph
    out = g.output[0]
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in g.input[0].type.tensor_type.shape.dim]
    if any(d < 1 for d in dims[1:]):
        raise BadInput(f"{path} has a dynamic image shape {dims}; Triton's config needs fixed C x H x W")
    if dims[0] != -1 and dims[0] < cfg.max_batch:
        raise BadInput(f"{path} has a fixed batch of {dims[0]}; re-export it with a dynamic batch for max_batch {cfg.max_batch}")
    if public.get("output") == "probabilities" and not runner_outputs_probabilities(path):
        public["output"] = "logits"
    return {"platform": "onnxruntime_onnx", "file": "model.onnx", "input": g.input[0].name, "chw": tuple(dims[1:]),
            "output": out.name, "classes": info.num_classes, "public": public, "kind": "KIND_CPU"}


def runner_outputs_probabilities(path: Path) -> bool:
    """Whether the graph's first output is probabilities (edgeguard exports; or a graph ending in Softmax)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if decode({p.key: p.value for p in proto.metadata_props}).get("output") == "probabilities":
        return True
    out = proto.graph.output[0].name
    return any(n.op_type == "Softmax" and out in n.output for n in proto.graph.node)


def _engine_facts(path: Path, cfg: TritonRepoConfig) -> dict[str, Any]:
    m = read_manifest(path)  # no GPU needed to describe it
    sha = sha256_file(path)
    if sha != m.get("engine_sha256"):
        raise BadInput(f"{path} is not the engine its manifest records (sha256 differs)")
    meta = m.get("metadata") or {}
    prof = m.get("profile") or {}
    hi = int((prof.get("max") or [0])[0])
    if hi and hi < cfg.max_batch:
        raise BadInput(f"{path} was built for batches up to {hi}; pass --max-batch {hi} or rebuild with --max-batch "
                       f"{cfg.max_batch}")
    classes = meta.get("classes") or []
    if not classes:
        raise BadInput(f"{path} does not declare its classes (no edgeguard metadata in its manifest)")
    defense = meta.get("defense") or {"name": "none"}
    if isinstance(defense, dict) and defense.get("placement") == "host":
        raise BadInput(f"{path} was built from a graph whose defense runs on the host; use `edgeguard serve` for it")
    public = {"precision": str(m.get("precision") or meta.get("precision") or "fp32"),
              "defense": {k: defense.get(k) for k in ("name", "params", "placement") if k in defense},
              "input_shape": list(meta.get("input_shape") or prof.get("max", [0, 0, 0, 0])[1:]),
              "classes": list(classes), "sha256": sha, "backend": "tensorrt",
              "output": m.get("output", meta.get("output", "probabilities")), "version": __version__}
    outs = [n for n in m.get("output_names", []) if n != "defense_flag"] or ["probabilities"]
    return {"platform": "tensorrt_plan", "file": "model.plan", "input": m.get("input_name", "input"),
            "chw": tuple(public["input_shape"]), "output": outs[0], "classes": len(classes), "public": public,
            "kind": "KIND_GPU"}


def write_triton_repo(artifact: str | Path, repo: str | Path, cfg: TritonRepoConfig | None = None) -> TritonRepoResult:
    """Write ``REPO/NAME`` (atomically; an existing model folder of that name is refused) for ``artifact``:
    a ``.onnx`` graph, a ``.engine``/``.plan`` with its manifest, or an INT8 bundle (its QDQ graph)."""
    cfg = cfg or TritonRepoConfig()
    kind = artifact_kind(artifact)
    src = Path(str(artifact))
    if kind == "remote":
        raise BadInput(f"a Triton repository is written from a local artifact, not a URL: {artifact}")
    if kind == "bundle":
        if not (is_bundle(src) and load_bundle(src).quantized):
            raise BadInput(f"{src} is a float bundle: export it first (edgeguard export BUNDLE --format triton-repo "
                           "fuses the defense and writes the repository in one step)")
        src = src / "model.onnx"
        kind = ".onnx"
    facts = _onnx_facts(src, cfg) if kind == ".onnx" else _engine_facts(src, cfg)
    if cfg.kind != "auto":
        facts["kind"] = "KIND_GPU" if cfg.kind == "gpu" else "KIND_CPU"
    text = config_pbtxt(cfg, platform=facts["platform"], input_name=facts["input"], chw=facts["chw"],
                        output_name=facts["output"], classes=facts["classes"], kind=facts["kind"],
                        public=facts["public"])
    model_dir = Path(repo) / cfg.name
    if model_dir.exists():
        raise BadInput(f"{model_dir} already exists; remove it or pick another --name")
    with atomic_dir(model_dir, may_replace=lambda p: False) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(src, tmp / "1" / facts["file"])
        (tmp / "config.pbtxt").write_text(text)
    return TritonRepoResult(repo=str(repo), model_dir=str(model_dir), config=str(model_dir / "config.pbtxt"),
                            platform=facts["platform"], model_file=str(model_dir / "1" / facts["file"]),
                            sha256=sha256_file(model_dir / "1" / facts["file"]), info=facts["public"],
                            max_batch=cfg.max_batch, instances=cfg.instances)


__all__ = ["TritonRepoConfig", "TritonRepoResult", "check_model_settings", "config_pbtxt", "write_triton_repo"]
