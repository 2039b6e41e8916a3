"""Build a TensorRT engine from an exported ONNX graph: ``build_engine(onnx, out, EngineConfig)``.

The TensorRT facts it relies on, with sources: docs/tensorrt.md.  One code path for TensorRT 10.x and 11.x:

- The default build is a **strongly typed** network (``STRONGLY_TYPED`` on 10.x; always on in 11.x, where the flag
  is deprecated and ignored).  Precision then follows the graph: INT8 only where the QDQ graph has Q/DQ nodes,
  FP32 everywhere else, so the defense head (``defense/`` nodes) and MagicGuard (the nodes listed in the
  ``edgeguard.magicguard`` metadata) stay FP32 by construction.  No precision flags are set.
- ``fp16=True`` needs a weakly typed network with ``BuilderFlag.FP16`` (plus ``INT8`` for a QDQ graph), which only
  TensorRT 10.x has: the defense and MagicGuard layers are then pinned to FP32 with ``OBEY_PRECISION_CONSTRAINTS``.
  TensorRT 11 removed these flags; there an FP16 engine needs an FP16 ONNX graph (ModelOpt AutoCast), and
  ``fp16=True`` is refused with exit 3.  Flags are looked up with ``getattr``, never assumed.
- One optimization profile over the batch axis (min/opt/max), a timing cache loaded from and saved to a file, and
  a manifest ``MODEL.engine.json`` beside the engine (see :func:`edgeguard.runtime.trt_env.check_compatible`).

Inputs are validated before tensorrt is imported: a missing or non-ONNX file is exit 2 on every machine; without
tensorrt or a CUDA GPU the build is exit 3 and nothing is written.  tensorrt is imported lazily.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeguard import __version__
from edgeguard.config import Config, require
from edgeguard.errors import BackendUnavailable, BadInput, CheckFailed
from edgeguard.fileio import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_file
from edgeguard.results import Result
from edgeguard.runtime import trt_env
from edgeguard.runtime.metadata import decode

DEFENSE_PREFIX = "defense/"  # edgeguard.export.heads.PREFIX
ENGINE_SUFFIXES = (".engine", ".plan")
DEFAULT_OPT_BATCH = 8
WEAK_TYPING_DEPRECATED = (10, 12)  # BuilderFlag FP16/INT8 and precision constraints: deprecated from this version
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class EngineConfig(Config):
    """How to build an engine.  Batch bounds default to 1 / 8 / 64 (clipped to a fixed batch axis)."""

    fp16: bool = False  # weakly typed FP16 build (TensorRT 10.x only); the default follows the graph's types
    workspace_mib: int = 1024
    timing_cache: str | None = None  # loaded if it exists, saved after the build
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    optimization_level: int = 3  # builder_optimization_level; 5 for release builds

    def __post_init__(self) -> None:
        require(self.workspace_mib >= 1, f"workspace must be at least 1 MiB (got {self.workspace_mib})")
        for name in ("min_batch", "opt_batch", "max_batch"):
            v = getattr(self, name)
            require(v is None or v >= 1, f"{name.replace('_', '-')} must be at least 1 (got {v})")
        given = [v for v in (self.min_batch, self.opt_batch, self.max_batch) if v is not None]
        require(given == sorted(given), "the batch profile must satisfy min-batch <= opt-batch <= max-batch "
                                        f"(got {self.min_batch} / {self.opt_batch} / {self.max_batch})")
        require(0 <= self.optimization_level <= 5, f"optimization level must lie in 0..5 (got {self.optimization_level})")


@dataclass(frozen=True)
class OnnxFacts:
    """What the build needs to know about the graph, read with onnx only."""

    input_name: str
    batch_dim: int | None  # None: dynamic
    chw: tuple[int, int, int]
    output_names: tuple[str, ...]
    has_qdq: bool
    precision: str
    output: str  # "probabilities" or "logits"
    fp32_nodes: tuple[str, ...]  # defense head + MagicGuard nodes (kept FP32); Constants make no layer, so none
    metadata: dict[str, Any]
    node_ops: dict[str, str] = field(default_factory=dict)  # fp32 node -> its op type


def inspect_onnx(path: str | Path) -> OnnxFacts:
    """Read the input, outputs, Q/DQ presence, metadata and the FP32 node list; :class:`BadInput` if not ONNX."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist")
    if path.suffix.lower() != ".onnx":
        raise BadInput(f"{path} is not an ONNX file (expected a .onnx file from edgeguard export)")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
    g = proto.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4 or not g.output:
        raise BadInput(f"{path} must have one N x C x H x W image input and an output")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    meta = decode({p.key: p.value for p in proto.metadata_props})
    chw = tuple(meta.get("input_shape") or dims[1:])
    if len(chw) != 3 or any(not isinstance(d, int) or d < 1 for d in chw):
        raise BadInput(f"{path} has a dynamic image shape {dims[1:]}; export it with a fixed C x H x W")
    defense = meta.get("defense")
    if isinstance(defense, dict) and defense.get("placement") == "host":
        raise BadInput(f"{path} runs its defense {defense.get('name')!r} on the host (sidecar file), so an engine would "
                       "ship without it; export with a defense fused in the graph for TensorRT")
    ops = {n.op_type for n in g.node}
    has_qdq = bool(ops & {"QuantizeLinear", "DequantizeLinear"})
    out0 = g.output[0].name
    ends_in_softmax = any(n.op_type == "Softmax" and out0 in n.output for n in g.node)
    output = "probabilities" if meta.get("output") == "probabilities" or ends_in_softmax else "logits"
    guard = meta.get("magicguard") if isinstance(meta.get("magicguard"), dict) else {}
    listed = {str(n) for n in guard.get("nodes", [])}
    ops = {n.name: n.op_type for n in g.node}
    fp32 = [n.name for n in g.node if (n.name.startswith(DEFENSE_PREFIX) or n.name in listed) and n.op_type != "Constant"]
    return OnnxFacts(
        input_name=inputs[0].name,
        batch_dim=dims[0],
        chw=chw,  # type: ignore[arg-type]
        output_names=tuple(o.name for o in g.output),
        has_qdq=has_qdq,
        precision=str(meta.get("precision") or ("int8" if has_qdq else "fp32")),
        output=output,
        fp32_nodes=tuple(dict.fromkeys(fp32)),
        metadata=meta,
        node_ops={n: ops[n] for n in fp32},
    )


def resolve_profile(batch_dim: int | None, cfg: EngineConfig) -> tuple[int, int, int]:
    """(min, opt, max) batch of the optimization profile; a fixed batch axis allows only itself."""
    if batch_dim is not None:
        given = {v for v in (cfg.min_batch, cfg.opt_batch, cfg.max_batch) if v is not None}
        if given - {batch_dim}:
            raise BadInput(f"the ONNX graph has a fixed batch of {batch_dim}; the profile cannot ask for "
                           f"{sorted(given - {batch_dim})} (re-export with a dynamic batch axis)")
        return batch_dim, batch_dim, batch_dim
    lo = cfg.min_batch or 1
    hi = cfg.max_batch or max(DEFAULT_MAX_BATCH, lo, cfg.opt_batch or 0)
    opt = cfg.opt_batch or min(max(DEFAULT_OPT_BATCH, lo), hi)
    if not lo <= opt <= hi:
        raise BadInput(f"the batch profile must satisfy min <= opt <= max (got {lo} / {opt} / {hi})")
    return lo, opt, hi


_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)\]")
# ops whose layers carry no float precision or that the parser may fold away: a pinned node of these kinds may have no
# layer of its own without leaving FP32 math unpinned
_NO_FLOAT_MATH = frozenset({"Constant", "Identity", "Shape", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Cast",
                            "Gather", "Concat", "Slice", "Expand", "Greater", "Less", "Equal", "GreaterOrEqual",
                            "LessOrEqual", "Not", "And", "Or", "ArgMax", "ConstantOfShape"})


def layer_node(layer_name: str, metadata: str, nodes: set[str]) -> str | None:
    """The ONNX node (from ``nodes``) a parsed TensorRT layer came from, or None.

    The ONNX parser names a layer after its node (``node``, then ``node_1``, ... when one node makes several
    layers) and, on TensorRT 10+, writes ``[ONNX Layer: node]`` into the layer's metadata -- for a node inside an
    ONNX local function, the call path ``caller/.../node``, so every tail of the path is tried.  Any layer of a
    ``defense/`` node counts, listed or not."""
    candidates = []
    m = _ONNX_LAYER.search(metadata or "")
    if m:
        path = m.group(1).strip()
        parts = path.split("/")
        candidates += [path] + ["/".join(parts[i:]) for i in range(1, len(parts))]
    candidates.append(layer_name)
    base = re.sub(r"_\d+$", "", layer_name)
    if base != layer_name:
        candidates.append(base)
    for c in candidates:
        if c in nodes or c.startswith(DEFENSE_PREFIX):
            return c
    return None


def _inputs(layer) -> list[str]:
    names = []
    for k in range(int(getattr(layer, "num_inputs", 0) or 0)):
        t = layer.get_input(k)
        if t is not None:
            names.append(t.name)
    return names


def _pin_fp32(trt, network, nodes: tuple[str, ...], node_ops: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Weakly typed builds: set precision and float output types of the listed nodes' layers to FP32.

    The parser also adds helper layers with no ONNX metadata (casts, shuffles); one whose every input comes from a
    pinned layer is inside the pinned region and is pinned too.  Returns (pinned layers, helper layers among them);
    a listed node doing float math that no layer carries is refused (its math would run in FP16)."""
    wanted, pinned, helpers = set(nodes), [], []
    floats = {trt.DataType.FLOAT, getattr(trt.DataType, "HALF", None), getattr(trt.DataType, "BF16", None)}
    produced_by: dict[str, int] = {}
    pinned_idx: set[int] = set()
    covered: set[str] = set()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        meta = str(getattr(layer, "metadata", "") or "")
        node = layer_node(layer.name, meta, wanted)
        helper = False
        if node is None and not _ONNX_LAYER.search(meta):
            ins = [produced_by[t] for t in _inputs(layer) if t in produced_by]
            helper = bool(ins) and all(j in pinned_idx for j in ins)
        for j in range(layer.num_outputs):
            produced_by[layer.get_output(j).name] = i
        if node is None and not helper:
            continue
        if node is not None:
            covered.add(node)
        pinned_idx.add(i)
        outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outs:
            continue  # shape / index / boolean layers carry no float precision
        layer.precision = trt.DataType.FLOAT
        for j in outs:
            layer.set_output_type(j, trt.DataType.FLOAT)
        pinned.append(layer.name)
        if helper:
            helpers.append(layer.name)
    missing = [n for n in nodes if n not in covered and (node_ops or {}).get(n, "") not in _NO_FLOAT_MATH]
    if missing:
        raise CheckFailed(f"the FP32 pinning of an FP16 build would not cover {len(missing)} node(s) doing float math "
                          f"({', '.join(missing[:3])}): no TensorRT layer carries their ONNX names; build without "
                          "--fp16 (a strongly typed engine keeps them FP32 by the graph's types)")
    return pinned, helpers


@dataclass(frozen=True)
class EngineResult(Result):
    engine: str
    manifest: str
    sha256: str
    bytes: int
    precision: str
    profile: dict[str, Any]
    seconds: float
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    fp32_layers: tuple[str, ...]
    passed: bool = True

    def summary(self) -> str:
        p = self.profile
        return (f"wrote {self.engine} ({self.bytes:,} bytes, {self.precision}, sha256 {self.sha256[:12]}) with "
                f"TensorRT {self.tensorrt_version} on {self.gpu_name} (compute {self.compute_capability}) in "
                f"{self.seconds:.1f} s; batch profile {p['min'][0]}/{p['opt'][0]}/{p['max'][0]}; manifest {self.manifest}")


def _flag(trt, name: str):
    return getattr(trt.BuilderFlag, name, None)


def _version(trt) -> tuple[int, int]:
    parts = (str(trt.__version__).split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        return (0, 0)


def _parse(trt, onnx_path: Path, strongly_typed: bool, major: int):
    """Builder, network and parser with the graph parsed (strongly typed unless FP16 flags are asked for)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    st = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    net_flags = (1 << int(st)) if strongly_typed and major < 11 and st is not None else 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).strip().splitlines()[0] for i in range(parser.num_errors)] or ["no detail"]
        raise BadInput(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[0][:300]}"
                       + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""))
    return builder, network, parser  # the parser must outlive the build (it owns the weights)


def _builder_config(trt, builder, network, cfg: EngineConfig, facts, strongly_typed: bool):
    """The builder config (workspace, optimisation level, FP16 with FP32 pinning, TF32 off), the flags recorded in
    the manifest, and the layers pinned to FP32."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.workspace_mib) << 20)
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(cfg.optimization_level)
    flags: dict[str, Any] = {"strongly_typed": strongly_typed, "fp16": bool(cfg.fp16), "int8_qdq": facts.has_qdq,
                             "precision_constraints": None, "version_compatible": False}
    pinned: list[str] = []
    if cfg.fp16:
        config.set_flag(_flag(trt, "FP16"))
        if facts.has_qdq:  # a weakly typed network runs Q/DQ only with INT8 enabled (docs/tensorrt.md)
            config.set_flag(_flag(trt, "INT8"))
        pinned, helpers = _pin_fp32(trt, network, facts.fp32_nodes, facts.node_ops)
        flags["fp32_helper_layers"] = len(helpers)
        if pinned:
            obey = _flag(trt, "OBEY_PRECISION_CONSTRAINTS") or _flag(trt, "PREFER_PRECISION_CONSTRAINTS")
            if obey is None:
                raise BackendUnavailable(f"TensorRT {trt.__version__} cannot pin layers to FP32 in an FP16 build; "
                                         "build without --fp16")
            config.set_flag(obey)
            flags["precision_constraints"] = "obey" if obey == _flag(trt, "OBEY_PRECISION_CONSTRAINTS") else "prefer"
    # TensorRT enables TF32 for FP32 Conv/Gemm by default: an "fp32" engine would compute with a 10-bit mantissa
    # (probabilities move by up to 7.5e-3 on a MagicGuard graph, past the 1e-3 golden tolerance).  Cleared.
    tf32 = _flag(trt, "TF32")
    if tf32 is not None:
        config.clear_flag(tf32)
    flags["tf32"] = bool(config.get_flag(tf32)) if tf32 is not None else None
    return config, flags, pinned


def _load_timing_cache(config, cache_path: Path) -> str:
    """Attach the timing cache at ``cache_path`` (created when absent, replaced when recorded elsewhere)."""
    previous = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(previous)
    if not config.set_timing_cache(cache, False):  # recorded on another GPU or TensorRT: start afresh
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
        return "the existing timing cache did not match this GPU/TensorRT and was replaced"
    return "loaded" if previous else "created"


def build_engine(onnx_path: str | Path, out: str | Path, cfg: EngineConfig | None = None) -> EngineResult:
    """Build ``out`` (a ``.engine``/``.plan``) and ``out.json`` from an ONNX graph on this machine's GPU."""
    cfg = cfg or EngineConfig()
    onnx_path, out = Path(onnx_path), Path(out)
    facts = inspect_onnx(onnx_path)
    if out.suffix.lower() not in ENGINE_SUFFIXES:
        raise BadInput(f"--out {out} must end in .engine or .plan (open_runner picks the backend from the suffix)")
    if out.resolve() == onnx_path.resolve():
        raise BadInput("--out must not be the ONNX file itself")
    lo, opt, hi = resolve_profile(facts.batch_dim, cfg)
    trt = trt_env.import_tensorrt("build a TensorRT engine")
    env = trt_env.environment(trt)  # BackendUnavailable without a CUDA GPU
    major = trt_env.trt_major(trt)
    if cfg.fp16 and (_flag(trt, "FP16") is None or _version(trt) >= WEAK_TYPING_DEPRECATED):
        raise BackendUnavailable(
            f"TensorRT {trt.__version__} takes FP16 from the graph's types only (the weakly typed FP16/INT8 builder flags "
            "and precision constraints are deprecated since 10.12 and removed in 11): build an FP16 engine from an "
            "FP16 ONNX graph (ModelOpt AutoCast) without --fp16, or use TensorRT 10.3-10.11 (JetPack 6: 10.3)")

    strongly_typed = not cfg.fp16
    builder, network, parser = _parse(trt, onnx_path, strongly_typed, major)
    config, flags, pinned = _builder_config(trt, builder, network, cfg, facts, strongly_typed)
    c, h, w = facts.chw
    profile = builder.create_optimization_profile()
    profile.set_shape(facts.input_name, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))
    config.add_optimization_profile(profile)
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
    cache_note = _load_timing_cache(config, cache_path) if cache_path is not None else None

    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if plan is None:
        raise CheckFailed(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above); "
                          "nothing was written")
    data = bytes(plan)
    engine_sha = sha256_bytes(data)
    atomic_write_bytes(out, data)
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))


    precision = "int8" if facts.has_qdq else facts.precision
    if cfg.fp16:
        precision = "int8+fp16" if facts.has_qdq else "fp16"
    prof = {"input": facts.input_name, "min": [lo, c, h, w], "opt": [opt, c, h, w], "max": [hi, c, h, w]}
    manifest = {
        "format": trt_env.MANIFEST_FORMAT,
        "format_version": trt_env.MANIFEST_VERSION,
        "engine": out.name,
        "engine_sha256": engine_sha,
        "engine_bytes": len(data),
        "source_onnx": onnx_path.name,
        "source_onnx_sha256": sha256_file(onnx_path),
        **env,
        "cuda_version": _cuda_version(),
        "precision": precision,
        "flags": flags,
        "profile": prof,
        "input_name": facts.input_name,
        "output_names": list(facts.output_names),
        "output": facts.output,
        "fp32_nodes": list(facts.fp32_nodes),
        "fp32_layers": pinned,
        "fp32_by": "graph types (strongly typed network)" if strongly_typed else "precision constraints",
        "workspace_mib": cfg.workspace_mib,
        "optimization_level": cfg.optimization_level,
        "timing_cache": {"path": str(cache_path), "status": cache_note} if cache_path else None,
        "metadata": facts.metadata,
        "config": cfg.to_dict(),
        "build_seconds": round(seconds, 3),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "edgeguard_version": __version__,
    }
    mpath = trt_env.manifest_path(out)
    atomic_write_json(mpath, manifest)
    return EngineResult(str(out), str(mpath), engine_sha, len(data), precision, prof, round(seconds, 3),
                        env["tensorrt_version"], env["gpu_name"], env["compute_capability"], tuple(pinned))


def _cuda_version() -> str | None:
    """Best effort: the CUDA runtime version (torch's build, else cuda-python's runtime)."""
    try:
        import torch

        if torch.version.cuda:
            return str(torch.version.cuda)
    except ImportError:
        pass
    try:
        err, v = trt_env._cudart().cudaRuntimeGetVersion()
        return f"{v // 1000}.{(v % 1000) // 10}" if int(err) == 0 else None
    except Exception:
        return None
