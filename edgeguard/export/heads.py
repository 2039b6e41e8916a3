"""Defense heads as ONNX graphs, grafted onto a backbone's logits.

The backbone (an FP32 export, or the QDQ graph an INT8 bundle stores) is cut at its logits: the final
``Softmax`` goes.  The defense is exported on its own from PyTorch (inputs ``logits`` and, when it reads
them, the images ``input``), its node and tensor names are prefixed ``defense/``, and it is appended, in
FP32, after the dequantized logits (the spec's ``onnx.compose`` route, done by hand so the head can also read
the graph input).  ``clean_view`` does the reverse, for measurements: it cuts a defended graph back to
``softmax(logits)``, which is also what an attacker holding the file could do (spec pitfall 12).
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import torch
from torch import nn

from edgeguard.defenses.base import ALLOWED_OPS, QDQ_OPS, RANDOM_OPS, Defense
from edgeguard.errors import BadInput, CheckFailed
from edgeguard.progress import quiet_exporter
from edgeguard.runtime.graph import FLAG_OUTPUT, INPUT_NAME, LOGITS, OUTPUT_NAME, PREFIX, producer


class _HeadExport(nn.Module):
    """(logits[, input]) -> probabilities[, flag]: the signature the head graph is exported with."""

    def __init__(self, defense: Defense):
        super().__init__()
        self.defense = defense

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None):
        if self.defense.emits_flag:
            return self.defense.forward_with_flag(logits, x)
        return self.defense(logits, x)


_HEAD_CACHE: OrderedDict[str, object] = OrderedDict()
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module()))
_HEAD_CACHE_SIZE = 8


def cached_proto(cache: OrderedDict, key, size: int, build):
    """An exported ModelProto from ``cache`` (least recently used dropped beyond ``size``), built on a miss; the
    caller always gets its own copy, so editing it never touches the cache.  ``key`` None: build, keep nothing."""
    if key is None:
        return build()
    if key not in cache:
        cache[key] = build()
        while len(cache) > size:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return copy.deepcopy(cache[key])


def _fingerprint(defense: Defense, *rest) -> str | None:
    """A hash of everything the head computes with: its class, config, and every tensor and scalar attribute of every
    submodule (registered or not).  None (no caching) if some attribute is of a kind the hash cannot vouch for."""
    h = hashlib.sha256(repr((type(defense).__module__, type(defense).__qualname__, rest)).encode())
    h.update(repr(defense.cfg.to_dict() if defense.cfg is not None else None).encode())
    for name, module in defense.named_modules():
        h.update(f"<{name}:{type(module).__qualname__}>".encode())
        items = {**vars(module), **dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
        for key in sorted(items):
            value = items[key]
            if key in _MODULE_BOOKKEEPING:  # nn.Module's own hooks, registries and flags
                continue
            if isinstance(value, torch.Tensor):
                h.update(key.encode() + str(value.dtype).encode() + repr(tuple(value.shape)).encode())
                h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            elif isinstance(value, (bool, int, float, str, type(None))) or (
                    isinstance(value, tuple) and all(isinstance(v, (bool, int, float, str)) for v in value)):
                h.update(f"{key}={value!r};".encode())
            elif isinstance(value, torch.nn.Module) or key == "cfg":
                continue  # submodules are visited by named_modules; the config is hashed above
            else:
                return None
    return h.hexdigest()


def head_proto(defense: Defense, input_shape: tuple[int, ...], opset: int, max_batch: int = 4096):
    """Export ``defense`` alone to an ONNX ModelProto (dynamic batch).

    Exporting a head through torch.export takes seconds (ModelGuard-W's unrolled solver: about 13 s), and the FP32
    and INT8 exports of one model append the same head, so the last few heads are kept, keyed by a hash of
    everything they compute with; a hit returns a copy."""
    return cached_proto(_HEAD_CACHE, _fingerprint(defense, tuple(input_shape), opset, max_batch), _HEAD_CACHE_SIZE,
                        lambda: _export_head(defense, input_shape, opset, max_batch))


def _export_head(defense: Defense, input_shape: tuple[int, ...], opset: int, max_batch: int):

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, defense.num_classes, generator=g)
    args: tuple[torch.Tensor, ...] = (logits,)
    names = [LOGITS]
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    shapes: tuple = ({0: batch},)
    if defense.needs_input:
        args = (logits, torch.rand(2, *input_shape, generator=g))
        names.append(INPUT_NAME)
        shapes = ({0: batch}, {0: batch})
    outputs = [OUTPUT_NAME, FLAG_OUTPUT] if defense.emits_flag else [OUTPUT_NAME]
    with quiet_exporter() as log:
        try:
            program = torch.onnx.export(_HeadExport(defense).eval(), args, None, dynamo=True, external_data=False,
                                        opset_version=opset, input_names=names, output_names=outputs,
                                        dynamic_shapes=shapes, verbose=False)
        except Exception as e:
            tail = " ".join(log.getvalue().strip().splitlines()[-3:])
            raise BadInput(f"the {defense.name} head does not export to ONNX ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}) {tail[:200]}") from None
    proto = program.model_proto
    post = getattr(defense, "postprocess_onnx", None)
    if post is not None:
        post(proto)
    return proto


def expose_logits(proto):
    """Copy of a probabilities graph cut at its logits: the final Softmax is removed, the output renamed ``logits``.

    A graph that already outputs logits (no final Softmax) is refused: edgeguard graphs always end in one.
    """
    proto = copy.deepcopy(proto)
    g = proto.graph
    out = g.output[0]
    node = producer(g, out.name)
    if node is None or node.op_type != "Softmax":
        raise BadInput("the backbone graph does not end in a Softmax, so its logits cannot be located")
    src = node.input[0]
    g.node.remove(node)
    for n in g.node:  # rename the logits tensor so the head's metadata can point at it
        n.output[:] = [LOGITS if o == src else o for o in n.output]
        n.input[:] = [LOGITS if i == src else i for i in n.input]
    out.name = LOGITS
    return proto


def graft_head(backbone, head, input_name: str, *, logits: str = LOGITS, renamed: dict[str, str] | None = None):
    """Append ``head`` (inputs ``logits``[, ``input``]) to ``backbone`` (output ``logits``); returns a new proto.

    ``logits``: the backbone's logits tensor; ``renamed``: new names for the head's outputs (a wrapped third-party
    graph may already use ``probabilities`` for a tensor of its own)."""
    import onnx

    b_opset = {o.domain: o.version for o in backbone.opset_import}
    h_opset = {o.domain: o.version for o in head.opset_import}
    if b_opset.get("", 0) != h_opset.get("", 0):
        raise CheckFailed(f"backbone opset {b_opset.get('')} and head opset {h_opset.get('')} differ")
    merged = copy.deepcopy(backbone)
    g = merged.graph
    if [o.name for o in g.output] != [logits]:
        raise CheckFailed("graft_head needs a backbone whose only output is the logits")
    renamed = dict(renamed or {})
    outputs = {o.name for o in head.graph.output}

    boundary = {LOGITS: logits, INPUT_NAME: input_name}

    def rename(name: str) -> str:
        if not name:
            return name
        if name in outputs:
            return renamed.get(name, name)
        return boundary.get(name, PREFIX + name)

    for n in head.graph.node:
        n2 = copy.deepcopy(n)
        n2.name = PREFIX + (n.name or n.op_type)
        n2.input[:] = [rename(i) for i in n.input]
        n2.output[:] = [rename(o) for o in n.output]
        g.node.append(n2)
    for init in head.graph.initializer:
        i2 = copy.deepcopy(init)
        i2.name = rename(init.name)
        g.initializer.append(i2)
    for vi in head.graph.value_info:
        v2 = copy.deepcopy(vi)
        v2.name = rename(vi.name)
        g.value_info.append(v2)
    del g.output[:]
    for o in head.graph.output:
        o2 = copy.deepcopy(o)
        o2.name = renamed.get(o.name, o.name)
        g.output.append(o2)
    for f in head.functions:
        if all(f.name != h.name or f.domain != h.domain for h in merged.functions):
            merged.functions.append(copy.deepcopy(f))
    for o in head.opset_import:
        if o.domain not in b_opset:
            merged.opset_import.append(copy.deepcopy(o))
    try:
        onnx.checker.check_model(merged)
    except onnx.checker.ValidationError as e:
        raise CheckFailed(f"the graph with the defense head fails onnx.checker: {str(e).splitlines()[0]}") from None
    return merged


def head_nodes(proto) -> list:
    return [n for n in proto.graph.node if n.name.startswith(PREFIX)]


def check_head(proto, *, allow_random: bool = False, network_ops: frozenset[str] = frozenset()) -> list[str]:
    """Graph rules for a fused head (docs/defenses.md): allowed op types only, no Q/DQ on or after the logits.

    ``network_ops``: op types of a second network the head runs on the input (adaptive misinformation's model),
    allowed because the backbone itself uses them.
    """
    nodes = head_nodes(proto)
    allowed = ALLOWED_OPS | (RANDOM_OPS if allow_random else frozenset()) | (network_ops - QDQ_OPS)
    bad = sorted({n.op_type for n in nodes} - allowed)
    if bad:
        raise CheckFailed(f"the defense head contains op types outside the TensorRT-safe set: {', '.join(bad)}")
    qdq = [n for n in nodes if n.op_type in QDQ_OPS]
    if qdq:
        raise CheckFailed("the defense head contains Q/DQ nodes; it must run in FP32")
    return sorted({n.op_type for n in nodes})


def with_logits_output(proto, logits: str = LOGITS):
    """Copy of a defended graph that also outputs the logits (for parity checks, never shipped)."""
    import onnx

    proto = copy.deepcopy(proto)
    names = {o.name for o in proto.graph.output}
    if logits not in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, None))
    return proto
