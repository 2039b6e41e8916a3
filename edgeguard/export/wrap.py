"""A third-party ONNX classifier made into an edgeguard artifact, its own nodes kept byte for byte.

The shipped graph is left as it is: every node and initializer of the original is copied into the new graph
unchanged (same bytes, same order), and edgeguard adds only what makes it behave like its own artifacts:

    raw images in [0, 1] (N, C, H, W) --Sub mean, Div std[, Transpose to NHWC]--> the original input
    the original output --[Clip, Log when it returns probabilities]--> logits --defense head--> probabilities

Whether the graph returns logits or probabilities is decided on a probe batch and said in the result (``outputs``
overrides, never silently).  The metadata records the original file's sha256 and a digest of its nodes and
initializers with their positions, so :func:`wrapped_original` can show anyone that the defended file wraps the
shipped one.  Before anything is written the new graph's undefended softmax is compared with the original run in
ONNX Runtime on the same inputs, and a fused head with its PyTorch module.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeguard import __version__
from edgeguard.config import Config, require
from edgeguard.defenses.none import NoDefense
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.export.heads import check_head, graft_head, head_proto
from edgeguard.export.onnx import HEAD_ATOL, PARITY_ATOL, head_check, stamp
from edgeguard.fileio import atomic_write, sha256_file
from edgeguard.results import Result
from edgeguard.runtime.graph import FLAG_OUTPUT, INPUT_NAME, LOGITS, OUTPUT_NAME, probe_outputs
from edgeguard.runtime.metadata import decode
from edgeguard.runtime.parity import parity_from

ADDED = "edgeguard/"  # name prefix of every node and initializer the wrapper adds before the head
TINY = 1e-30  # probabilities are clipped here before the log, so a zero gives a finite logit


@dataclass(frozen=True)
class WrapConfig(Config):
    outputs: str = "auto"  # auto | logits | probabilities: what the original graph returns
    mean: tuple[float, ...] = ()  # the normalisation the graph expects on [0, 1] images (empty: none)
    std: tuple[float, ...] = ()
    layout: str = "nchw"  # nchw | nhwc: the original input's layout (the wrapped graph always takes NCHW)
    input_shape: tuple[int, ...] = ()  # C,H,W, needed only where the graph leaves them dynamic
    classes: tuple[str, ...] = ()  # class names (default 0..N-1 from the output shape)
    max_batch: int = 4096
    check_samples: int = 64
    seed: int = 0  # the probe and check inputs

    def __post_init__(self) -> None:
        require(self.outputs in ("auto", "logits", "probabilities"), "outputs must be auto, logits or probabilities")
        require(self.layout in ("nchw", "nhwc"), "layout must be nchw or nhwc")
        require(len(self.input_shape) in (0, 3), "input_shape must be C,H,W")
        require(all(s > 0 for s in self.std), "every std must be positive")
        require(self.check_samples >= 2, "check_samples must be at least 2")


@dataclass(frozen=True)
class WrapResult(Result):
    path: str
    sha256: str
    bytes: int
    original_sha256: str
    outputs: str  # what the original returns, as used
    detected: str  # what the probe saw
    input_shape: tuple[int, ...]
    num_classes: int
    original_nodes: int
    original_initializers: int
    self_check_max_abs_diff: float
    self_check_top1_agreement: float
    defense: str = "none"
    placement: str = "graph"
    head_ops: tuple[str, ...] = ()
    head_check_max_abs_diff: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    passed: bool = True

    def summary(self) -> str:
        head = f"defense {self.defense} fused ({', '.join(self.head_ops)})" if self.defense != "none" else "no defense"
        return (f"wrote {self.path} ({self.bytes:,} bytes, sha256 {self.sha256[:12]}): wraps {self.original_sha256[:12]} "
                f"({self.original_nodes} nodes, {self.original_initializers} initializers byte-identical), "
                f"{self.outputs} out of the original -> probabilities, {head}; self-check vs the original: max |Δprob| "
                f"{self.self_check_max_abs_diff:.2e}, top-1 agreement {self.self_check_top1_agreement:.4f}; "
                + "; ".join(self.notes))


def is_foreign_onnx(path: str | Path) -> bool:
    """True for an .onnx file that carries no edgeguard metadata (someone else's export)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return not decode({p.key: p.value for p in proto.metadata_props})


def _digest(messages: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for m in messages:
        b = m.SerializeToString()
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def _dims(value_info) -> list[int | None]:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _load(path: Path):
    import onnx

    if not path.is_file():
        raise BadInput(f"{path} does not exist")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"{path} is not a valid ONNX model ({first[:200]})") from None
    if decode({p.key: p.value for p in proto.metadata_props}):
        raise BadInput(f"{path} is already an edgeguard artifact; export its bundle with the defense instead")
    return proto


def _signature(proto, path: Path, cfg: WrapConfig):
    """(input value_info, output value_info, (C, H, W), class count) of a one-image-in, one-score-row-out graph."""
    import onnx

    g = proto.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise BadInput(f"{path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); a classifier takes "
                       f"one image batch")
    if len(g.output) != 1:
        raise BadInput(f"{path} has {len(g.output)} outputs ({', '.join(o.name for o in g.output)}); a classifier "
                       f"returns one (N, classes) score tensor: cut the graph to it (onnx.utils.extract_model)")
    inp, out = inputs[0], g.output[0]
    for vi, what in ((inp, "input"), (out, "output")):
        if vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            name = onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
            raise BadInput(f"{path}'s {what} {vi.name!r} is {name}; edgeguard wraps float32 graphs")
    dims = _dims(inp)
    if len(dims) != 4:
        raise BadInput(f"{path}'s input {inp.name!r} has shape {dims}; an image classifier takes N x C x H x W "
                       f"(or N x H x W x C with --layout nhwc)")
    if dims[0] is not None:
        raise BadInput(f"{path}'s batch dimension is fixed at {dims[0]}; re-export it with a dynamic batch axis "
                       f"(torch.onnx.export dynamic_shapes / dynamic_axes)")
    chw = dims[1:] if cfg.layout == "nchw" else [dims[3], dims[1], dims[2]]
    if cfg.input_shape:
        clash = [(a, b) for a, b in zip(chw, cfg.input_shape, strict=True) if a is not None and a != b]
        if clash:
            raise BadInput(f"--input-shape {','.join(map(str, cfg.input_shape))} does not match the graph's "
                           f"{cfg.layout.upper()} input {dims[1:]}")
        chw = list(cfg.input_shape)
    if any(d is None for d in chw):
        raise BadInput(f"{path}'s input {inp.name!r} leaves C, H or W dynamic ({dims}); give --input-shape C,H,W")
    odims = _dims(out)
    if len(odims) != 2:
        raise BadInput(f"{path}'s output {out.name!r} has shape {odims}, not (N, classes): it is not a classifier")
    k = odims[1] if odims[1] is not None else (len(cfg.classes) or None)
    if k is None:
        raise BadInput(f"{path}'s output leaves the class count dynamic; give --classes N")
    if cfg.classes and len(cfg.classes) != k:
        raise BadInput(f"{len(cfg.classes)} class names were given but the graph outputs {k} scores")
    if k < 2:
        raise BadInput(f"{path} outputs {k} score per image; a classifier needs at least 2 classes")
    c = chw[0]
    for name, v in (("mean", cfg.mean), ("std", cfg.std)):
        if v and len(v) not in (1, c):
            raise BadInput(f"--{name} has {len(v)} values; the input has {c} channels (give 1 or {c})")
    return inp, out, tuple(int(d) for d in chw), int(k)


def _preprocess(x: np.ndarray, mean, std, layout: str) -> np.ndarray:
    c = x.shape[1]
    m = np.asarray(mean or [0.0], np.float32).reshape(1, -1, 1, 1) * np.ones((1, c, 1, 1), np.float32)
    s = np.asarray(std or [1.0], np.float32).reshape(1, -1, 1, 1) * np.ones((1, c, 1, 1), np.float32)
    y = (x - m) / s
    return np.ascontiguousarray(y.transpose(0, 2, 3, 1) if layout == "nhwc" else y).astype(np.float32)


def _run(model_bytes: bytes, feeds: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        return sess.run(None, feeds)
    except Exception as e:  # ORT raises its own exception types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInput(f"ONNX Runtime cannot run {what} ({first[:200]})") from None


def _fresh(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out = f"{ADDED}{name}" if i == 1 else f"{ADDED}{name}_{i}"
        i += 1
    taken.add(out)
    return out


def _adapted(proto, inp, out, chw, cfg: WrapConfig, outputs: str):
    """(backbone proto ending in logits, raw input name, logits name, node range, initializer range)."""
    import onnx
    from onnx import helper, numpy_helper

    g0 = proto.graph
    taken = {t for n in g0.node for t in (*n.input, *n.output)} | {i.name for i in g0.initializer} | {
        i.name for i in g0.input} | {o.name for o in g0.output}
    raw = _fresh(INPUT_NAME, taken)
    c = chw[0]
    pre, inits = [], []
    cur = raw
    steps = []
    if cfg.mean and any(v != 0 for v in cfg.mean):
        steps.append(("Sub", "mean", cfg.mean))
    if cfg.std and any(v != 1 for v in cfg.std):
        steps.append(("Div", "std", cfg.std))
    for op, what, values in steps:
        arr = (np.asarray(values, np.float32).reshape(1, -1, 1, 1) * np.ones((1, c, 1, 1), np.float32))
        init = _fresh(f"{ADDED}{what}", taken)
        inits.append(numpy_helper.from_array(arr, init))
        nxt = _fresh(f"{ADDED}{what}_out", taken)
        pre.append(helper.make_node(op, [cur, init], [nxt], name=f"{ADDED}{what}"))
        cur = nxt
    if cfg.layout == "nhwc":
        nxt = _fresh(f"{ADDED}nhwc", taken)
        pre.append(helper.make_node("Transpose", [cur], [nxt], perm=[0, 2, 3, 1], name=f"{ADDED}to_nhwc"))
        cur = nxt
    pre.append(helper.make_node("Identity", [cur], [inp.name], name=f"{ADDED}into_original"))
    post = []
    logits = out.name
    if outputs == "probabilities":
        tiny = _fresh(f"{ADDED}tiny", taken)
        inits.append(numpy_helper.from_array(np.asarray(TINY, np.float32), tiny))
        clipped = _fresh(f"{ADDED}clipped", taken)
        logits = _fresh(LOGITS, taken)
        post = [helper.make_node("Clip", [out.name, tiny], [clipped], name=f"{ADDED}clip"),
                helper.make_node("Log", [clipped], [logits], name=f"{ADDED}log")]
    new = copy.deepcopy(proto)
    g = new.graph
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(pre + nodes + post)
    g.initializer.extend(inits)  # appended: the original initializers keep positions 0..m-1
    inits_set = {i.name for i in g0.initializer}
    old_inputs = [i for i in g.input if i.name in inits_set]  # IR < 4 lists initializers as inputs: keep them
    del g.input[:]
    batch_shape = ["batch", *chw]
    g.input.append(helper.make_tensor_value_info(raw, onnx.TensorProto.FLOAT, batch_shape))
    g.input.extend(old_inputs)
    g.value_info.append(copy.deepcopy(inp))
    if outputs == "probabilities":
        g.value_info.append(copy.deepcopy(out))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, ["batch", _dims(out)[1] or None]))
    return new, raw, logits, (len(pre), len(pre) + len(nodes)), (0, len(g0.initializer))


def wrapped_original(proto) -> dict[str, Any]:
    """Recompute the digests of the original nodes and initializers inside a wrapped graph; ``intact`` says whether
    they still match what the wrapper recorded (the original file's own digests)."""
    meta = decode({p.key: p.value for p in proto.metadata_props}).get("wrapped")
    if not isinstance(meta, dict):
        raise BadInput("this graph does not wrap a third-party ONNX (no wrapped record in its metadata)")
    a, b = meta["node_range"]
    i, j = meta["initializer_range"]
    nodes = _digest(list(proto.graph.node)[a:b])
    inits = _digest(list(proto.graph.initializer)[i:j])
    return {**meta, "intact": nodes == meta["nodes_sha256"] and inits == meta["initializers_sha256"],
            "nodes_sha256_now": nodes, "initializers_sha256_now": inits}


def _probe(original_bytes: bytes, input_name: str, source: Path, cfg: WrapConfig, chw, k: int):
    """Run the original on ``check_samples`` random [0, 1] images: (images, its scores, outputs used, outputs
    detected, notes)."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(cfg.check_samples, *chw, generator=g)
    (y,) = _run(original_bytes, {input_name: _preprocess(x.numpy(), cfg.mean, cfg.std, cfg.layout)}, str(source))
    if y.shape != (len(x), k):
        raise BadInput(f"{source} returned shape {tuple(y.shape)} for {len(x)} images, not ({len(x)}, {k})")
    if not np.isfinite(y).all():
        row = int(np.flatnonzero(~np.isfinite(y).all(1))[0])
        raise BadInput(f"{source} returns non-finite scores on [0, 1] images (row {row} of the probe)")
    detected, why = probe_outputs(y)
    outputs = detected if cfg.outputs == "auto" else cfg.outputs
    notes = [f"outputs: {detected} detected ({why})" + ("" if cfg.outputs == "auto" else f"; --outputs {outputs}")]
    if outputs == "probabilities" and detected == "logits":
        raise BadInput(f"--outputs probabilities, but {source} does not return distributions: {why}")
    if not cfg.mean and not cfg.std:
        notes.append("normalisation: none given, the graph receives [0, 1] images as they are")
    return x, y, outputs, detected, notes


def _wrap_defense(defense, k: int, chw, clean_predict):
    """The defense to fuse: none, a built one, or one built now from the wrapped graph's clean outputs."""
    if defense is None:
        defense = NoDefense(None, k)
    elif callable(defense) and not isinstance(defense, torch.nn.Module):
        defense = defense(k, chw, clean_predict)
    if defense.num_classes != k:
        raise BadInput(f"the {defense.name} defense was built for {defense.num_classes} classes, the graph has {k}")
    if defense.placement != "graph":
        raise BadInput(f"the {defense.name} defense runs on the host next to a bundle's model; a wrapped third-party "
                       f"graph takes fused defenses only (import the model as a bundle for host-side ones)")
    return defense


def _wrap_metadata(source: Path, proto, cfg: WrapConfig, inp, outp, outputs, detected, node_range, init_range, chw,
                   k: int, precision: str, defense, logits: str, ops):
    """The ``wrapped`` record (what proves the original is inside, untouched) and the graph's edgeguard metadata."""
    wrapped = {
        "sha256": sha256_file(source), "file": source.name, "outputs": outputs, "detected": detected,
        "layout": cfg.layout, "input": inp.name, "output": outp.name,
        "node_range": list(node_range), "initializer_range": list(init_range),
        "nodes_sha256": _digest(proto.graph.node), "initializers_sha256": _digest(proto.graph.initializer),
    }
    classes = list(cfg.classes) or [str(i) for i in range(k)]
    meta = {
        "version": __version__, "arch": f"onnx:{source.stem}", "classes": classes, "input_shape": list(chw),
        "normalization": {"mean": list(cfg.mean or [0.0] * chw[0]), "std": list(cfg.std or [1.0] * chw[0]),
                          "in_graph": True},
        "precision": precision, "defense": {**defense.describe(), "logits": logits, "head_ops": ops},
        "output": "probabilities", "source_sha256": wrapped["sha256"], "stages": ["wrap"], "wrapped": wrapped,
    }
    return wrapped, meta


def wrap_onnx(source: str | Path, out: str | Path, cfg: WrapConfig | None = None, *, defense=None,
              defense_context=None) -> WrapResult:
    """Wrap the third-party ONNX ``source`` into ``out``: raw [0, 1] images in, probabilities out, ``defense`` (a built
    Defense, or a callable ``(num_classes, input_shape, clean_predict) -> Defense``) fused after the softmax."""
    import onnx

    cfg = cfg or WrapConfig()
    source, out = Path(source), Path(out)
    if out.suffix.lower() != ".onnx":
        raise BadInput(f"the export target must end in .onnx (got {out.name})")
    if out.resolve() == source.resolve():
        raise BadInput("the wrapped graph must not overwrite the original it wraps; pick another --out")
    proto = _load(source)
    inp, outp, chw, k = _signature(proto, source, cfg)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise BadInput(f"{source} uses opset {opset}; edgeguard wraps opset 13 or newer (onnx.version_converter "
                       f"can upgrade it, which rewrites its nodes)")
    original_bytes = proto.SerializeToString()
    x, y, outputs, detected, notes = _probe(original_bytes, inp.name, source, cfg, chw, k)
    backbone, raw, logits, node_range, init_range = _adapted(proto, inp, outp, chw, cfg, outputs)

    def clean_predict(images: torch.Tensor) -> np.ndarray:
        (z,) = _run(backbone.SerializeToString(), {raw: images.numpy().astype(np.float32)}, "the wrapped graph")
        return torch.softmax(torch.from_numpy(z), 1).numpy()

    defense = _wrap_defense(defense, k, chw, clean_predict)
    taken = {t for n in backbone.graph.node for t in (*n.input, *n.output)} | {i.name for i in backbone.graph.initializer}
    renamed = {OUTPUT_NAME: _fresh(OUTPUT_NAME, set(taken)), FLAG_OUTPUT: _fresh(FLAG_OUTPUT, set(taken))}
    head = head_proto(defense, chw, opset, cfg.max_batch)
    merged = graft_head(backbone, head, raw, logits=logits, renamed=renamed)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node):
        precision = "int8"
    else:
        precision = "fp32"
    network_ops = frozenset(n.op_type for n in backbone.graph.node) if defense.needs_input else frozenset()
    ops = check_head(merged, allow_random=defense.is_random(), network_ops=network_ops)
    wrapped, meta = _wrap_metadata(source, proto, cfg, inp, outp, outputs, detected, node_range, init_range, chw, k,
                                   precision, defense, logits, ops)
    merged = stamp(merged, meta, f"edgeguard {__version__} wrap of {source.name} ({k} classes, {precision}, "
                                 f"original nodes and initializers unchanged)")
    check = wrapped_original(merged)
    if not check["intact"]:  # the construction keeps them by position; this proves it on the written proto
        raise CheckFailed("the wrapped graph's copy of the original nodes differs from the original; nothing was written")
    # The new graph, undefended, against the original on the same images.
    ref = torch.softmax(torch.from_numpy(y), 1).numpy() if outputs == "logits" else y / y.sum(1, keepdims=True)
    got = clean_predict(x)
    parity = parity_from(ref, got, atol=PARITY_ATOL, a="original", b="wrapped")
    if not parity.passed:
        raise CheckFailed(f"the wrapped graph disagrees with the original (max |Δprob| {parity.max_abs_diff:.2e}, "
                          f"top-1 agreement {parity.top1_agreement:.4f}); nothing was written")
    head_diff = None
    if not defense.is_random():
        hc, _ = head_check(merged, defense, x, logits)
        head_diff = hc.max_abs_diff
        if not hc.passed:
            raise CheckFailed(f"ONNX Runtime disagrees with PyTorch on the {defense.name} head ({hc.off_rows:.1%} of "
                              f"rows beyond {HEAD_ATOL:g}); nothing was written")
    atomic_write(out, lambda t: onnx.save_model(merged, str(t)))
    return WrapResult(
        path=str(out), sha256=sha256_file(out), bytes=out.stat().st_size, original_sha256=wrapped["sha256"],
        outputs=outputs, detected=detected, input_shape=chw, num_classes=k,
        original_nodes=node_range[1] - node_range[0], original_initializers=init_range[1] - init_range[0],
        self_check_max_abs_diff=parity.max_abs_diff, self_check_top1_agreement=parity.top1_agreement,
        defense=defense.name, placement=defense.placement, head_ops=tuple(ops), head_check_max_abs_diff=head_diff,
        notes=tuple(notes),
    )
