"""A differentiable PyTorch copy of an exported ONNX graph, Q/DQ as fake-quant with a straight-through gradient.

Fragile triggers are generated against "the closest differentiable model" of the deployed artifact (fragile spec
9.3 step 1): for an INT8 QDQ graph that is the FP32 model with the *exact* activation and weight scales of the
artifact, inserted as fake-quant nodes.  Reading them from the shipped graph itself (instead of re-running
calibration) guarantees the scales are the artifact's own.  The interpreter covers the operators edgeguard's exports
use (smallcnn, ResNet, MobileNetV2, MagicGuard, FP32 and QDQ INT8) and the common operators of imported and
third-party classifiers (normalisation layers, attention's shape arithmetic, GELU); any other operator is refused
with its name.

Nodes of a MagicGuard ripple (found structurally) pass no gradient: the owner's generator sees the model as if the
guard were absent (owner mode), while the forward values stay the artifact's.  Two more backward rules serve the
owner's optimiser without touching a forward value: a clamped QuantizeLinear passes no gradient (PyTorch
FakeQuantize's rule), and ``Relu`` leaks a slope of 0.01 below zero (a search stuck with every unit off gets out).

The output is the graph's logits: a trailing ``Softmax`` is dropped (training needs logits, not probabilities).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeguard.errors import BadInput
from edgeguard.models.guard import guard_nodes
from edgeguard.runtime.graph import clean_view
from edgeguard.runtime.metadata import decode

_QRANGE = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


class _RoundClamp(torch.autograd.Function):
    """clamp(round_half_even(x), lo, hi) forward (exactly the QuantizeLinear integer); the gradient passes where the
    rounded value lies inside [lo, hi] and is zero where it was clamped (the straight-through estimator of PyTorch's
    FakeQuantize).  Passing it everywhere told an optimiser that pushing a clamped value further out still helped: a
    trigger generator on an imported VGG graph drove its pixels past the input range (no change in the forward) until
    its tanh saturated, and the loss stayed constant to 4 decimals from step 26 on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:  # type: ignore[override]
        q = torch.round(x)
        ctx.save_for_backward((q >= lo) & (q <= hi))
        return q.clamp_(lo, hi)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return g * inside, None, None


class _Relu(torch.autograd.Function):
    """relu forward (exact); backward with slope 0.01 where the input is negative.  A trigger search on a plain relu
    can fall into a region where every hidden unit is off: the logits are then the last bias, flat enough to satisfy
    the flatness term, and no gradient leads out (an imported VGG: loss constant from step 4 on, AccTri 0.10 at the
    end on one init in ten measured).  The leak lets the owner's optimiser see which units to switch back on."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return F.relu(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.where(x > 0, 1.0, 0.01)


def _attrs(node) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _per_axis(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    shape = [1] * rank
    shape[axis % rank] = -1
    return t.reshape(shape)


def _pads(pads: list[int] | None, n: int = 2) -> tuple[list[int], bool]:
    """ONNX pads [b1, b2, e1, e2] -> F.pad order (last axis first) and whether they are symmetric."""
    pads = list(pads or [0] * 2 * n)
    begin, end = pads[:n], pads[n:]
    torch_pad: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        torch_pad += [b, e]
    return torch_pad, begin == end


class OnnxModule(nn.Module):
    """Evaluate an ONNX graph with torch ops; gradients flow to the input (fake-quant Q/DQ via STE)."""

    def __init__(self, proto, *, output: str | None = None, detach: set[str] | frozenset[str] = frozenset()):
        super().__init__()
        self.detach = frozenset(detach)  # nodes whose outputs carry no gradient (a MagicGuard ripple: owner mode)
        from onnx import numpy_helper

        g = proto.graph
        self.consts: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, np.dtype] = {}
        for init in g.initializer:
            arr = numpy_helper.to_array(init)
            self.dtypes[init.name] = arr.dtype
            self.consts[init.name] = torch.from_numpy(np.array(arr, dtype=np.float32 if arr.dtype.kind == "f" else arr.dtype))
        self.nodes = list(g.node)
        inputs = [i.name for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise BadInput(f"the ONNX graph has {len(inputs)} data inputs; a differentiable copy needs exactly one")
        self.input = inputs[0]
        out = output or g.output[0].name
        last = next((n for n in self.nodes if out in n.output), None)
        if output is None and last is not None and last.op_type == "Softmax":
            out = last.input[0]  # logits
        self.output = out
        for n in self.nodes:
            if n.op_type == "Constant":
                from onnx import numpy_helper as nh

                arr = nh.to_array(_attrs(n)["value"])
                self.dtypes[n.output[0]] = arr.dtype
                self.consts[n.output[0]] = torch.from_numpy(np.array(arr))
        unknown = sorted({n.op_type for n in self.nodes if n.op_type not in _OPS and n.op_type != "Constant"})
        if unknown:
            raise BadInput(f"cannot build a differentiable copy of the ONNX graph: unsupported operator(s) {', '.join(unknown)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Any] = dict(self.consts)
        env[self.input] = x
        for n in self.nodes:
            if n.op_type == "Constant":
                continue
            args = [env[i] if i else None for i in n.input]
            outs = _OPS[n.op_type](self, n, args, _attrs(n))
            if not isinstance(outs, tuple):
                outs = (outs,)
            if n.name in self.detach:
                outs = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outs)
            for name, v in zip(n.output, outs, strict=False):
                env[name] = v
            if self.output in n.output:
                break
        return env[self.output]


def _qrange(m: OnnxModule, node) -> tuple[int, int]:
    zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    dt = m.dtypes.get(zp_name, np.dtype(np.uint8)) if zp_name else np.dtype(np.uint8)
    if dt not in _QRANGE:
        raise BadInput(f"QuantizeLinear to {dt} is not supported by the differentiable copy (int8 / uint8 only)")
    return _QRANGE[dt]


def _quantize(m, node, a, at):
    x, scale = a[0].float(), a[1].float()
    zp = a[2].float() if len(a) > 2 and a[2] is not None else torch.zeros(())
    rank, axis = x.dim(), at.get("axis", 1)
    scale, zp = _per_axis(scale, axis, rank), _per_axis(zp, axis, rank)
    lo, hi = _qrange(m, node)
    return _RoundClamp.apply(x / scale + zp, float(lo), float(hi))


def _dequantize(m, node, a, at):
    x, scale = a[0].float(), a[1].float()
    zp = a[2].float() if len(a) > 2 and a[2] is not None else torch.zeros(())
    rank, axis = x.dim(), at.get("axis", 1)
    return (x - _per_axis(zp, axis, rank)) * _per_axis(scale, axis, rank)


def _conv(m, node, a, at):
    x, w = a[0], a[1]
    b = a[2] if len(a) > 2 else None
    pad, sym = _pads(at.get("pads"))
    if at.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise BadInput("Conv with auto_pad is not supported by the differentiable copy")
    if not sym:
        x, pad = F.pad(x, pad), [0, 0, 0, 0]
    return F.conv2d(x, w, b, stride=tuple(at.get("strides", [1, 1])), padding=(pad[2], pad[0]),
                    dilation=tuple(at.get("dilations", [1, 1])), groups=at.get("group", 1))


def _pool(kind: str):
    def op(m, node, a, at):
        x = a[0]
        pad, sym = _pads(at.get("pads"))
        k, s = tuple(at["kernel_shape"]), tuple(at.get("strides", [1, 1]))
        ceil = bool(at.get("ceil_mode", 0))
        if not sym:
            x, pad = F.pad(x, pad, value=float("-inf") if kind == "max" else 0.0), [0, 0, 0, 0]
        if kind == "max":
            return F.max_pool2d(x, k, s, padding=(pad[2], pad[0]), dilation=tuple(at.get("dilations", [1, 1])), ceil_mode=ceil)
        return F.avg_pool2d(x, k, s, padding=(pad[2], pad[0]), ceil_mode=ceil, count_include_pad=bool(at.get("count_include_pad", 0)))

    return op


def _gemm(m, node, a, at):
    x, w = a[0], a[1]
    if at.get("transA", 0):
        x = x.t()
    if at.get("transB", 0):
        w = w.t()
    y = at.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + at.get("beta", 1.0) * a[2]
    return y


def _reshape(m, node, a, at):
    x, shape = a[0], [int(s) for s in a[1].tolist()]
    shape = [x.shape[i] if s == 0 and not at.get("allowzero", 0) else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _reduce_mean(m, node, a, at):
    axes = at.get("axes") or (a[1].tolist() if len(a) > 1 and a[1] is not None else None)
    keep = bool(at.get("keepdims", 1))
    return a[0].mean(dim=tuple(int(i) for i in axes), keepdim=keep) if axes else a[0].mean()


def _clip(m, node, a, at):
    lo = a[1] if len(a) > 1 and a[1] is not None else at.get("min")
    hi = a[2] if len(a) > 2 and a[2] is not None else at.get("max")
    return torch.clamp(a[0], min=None if lo is None else float(lo), max=None if hi is None else float(hi))


def _flatten(m, node, a, at):
    ax = at.get("axis", 1)
    return a[0].reshape(int(np.prod(a[0].shape[:ax])) if ax else 1, -1)


def _text(v: str | bytes) -> str:
    """A string attribute: onnx.helper returns bytes."""
    return v.decode() if isinstance(v, bytes) else v


def _axes(a, at, i: int = 1) -> list[int] | None:
    """An op's axes: the ``axes`` attribute (older opsets) or its i-th input (opset >= 13/18)."""
    if "axes" in at:
        return [int(v) for v in at["axes"]]
    if len(a) > i and a[i] is not None:
        return [int(v) for v in a[i].reshape(-1).tolist()]
    return None


def _reduce(fn):
    def op(m, node, a, at):
        axes = _axes(a, at)
        keep = bool(at.get("keepdims", 1))
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                return a[0]
            axes = list(range(a[0].dim()))
        return fn(a[0], tuple(axes), keep)

    return op


def _gather(m, node, a, at):
    x, idx = a[0], a[1].long()
    axis = at.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _slice(m, node, a, at):
    x = a[0]
    starts, ends = a[1].tolist(), a[2].tolist()
    axes = a[3].tolist() if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = a[4].tolist() if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index: list[Any] = [slice(None)] * x.dim()
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        if sp <= 0:
            raise BadInput("Slice with a non-positive step is not supported by the differentiable copy")
        n = x.shape[ax]
        st = max(0, min(n, st + n if st < 0 else st))
        en = max(0, min(n, en + n if en < 0 else en))
        index[ax] = slice(st, en, sp)
    return x[tuple(index)]


def _unsqueeze(m, node, a, at):
    x = a[0]
    axes = sorted(ax % (x.dim() + len(_axes(a, at))) for ax in _axes(a, at))
    for ax in axes:
        x = x.unsqueeze(ax)
    return x


def _squeeze(m, node, a, at):
    axes = _axes(a, at)
    x = a[0]
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _layer_norm(m, node, a, at):
    x = a[0]
    axis = at.get("axis", -1) % x.dim()
    shape = tuple(x.shape[axis:])
    w = a[1].expand(shape) if a[1] is not None else None
    b = a[2].expand(shape) if len(a) > 2 and a[2] is not None else None
    return F.layer_norm(x, shape, w, b, eps=at.get("epsilon", 1e-5))


def _split(m, node, a, at):
    x, axis = a[0], at.get("axis", 0)
    sizes = a[1].tolist() if len(a) > 1 and a[1] is not None else at.get("split")
    if sizes is None:
        k = at.get("num_outputs", len(node.output))
        n = x.shape[axis]
        sizes = [-(-n // k)] * (k - 1)
        sizes.append(n - sum(sizes))
    return tuple(torch.split(x, [int(v) for v in sizes], dim=axis))


_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 6: torch.int32, 7: torch.int64, 9: torch.bool,
           10: torch.float32, 11: torch.float32, 16: torch.float32}  # half / double / bf16 stay FP32 here


def _cast(m, node, a, at):
    to = at.get("to", 1)
    if to not in _DTYPES:
        raise BadInput(f"Cast to ONNX type {to} is not supported by the differentiable copy")
    return a[0].to(_DTYPES[to])


def _constant_of_shape(m, node, a, at):
    from onnx import numpy_helper

    value = torch.from_numpy(np.array(numpy_helper.to_array(at["value"]))).reshape(-1)[0] if "value" in at else \
        torch.tensor(0.0)
    return torch.full([int(v) for v in a[0].tolist()], value.item(), dtype=value.dtype)


def _batch_norm(m, node, a, at):
    x, w, b, mean, var = a[:5]
    return F.batch_norm(x, mean, var, w, b, training=False, eps=at.get("epsilon", 1e-5))


def _pad(m, node, a, at):
    pads = a[1].tolist() if len(a) > 1 and a[1] is not None else at.get("pads")
    mode = _text(at.get("mode", "constant"))
    n = len(pads) // 2
    torch_pad: list[int] = []
    for b_, e in zip(reversed(pads[:n]), reversed(pads[n:]), strict=True):
        torch_pad += [int(b_), int(e)]
    value = float(a[2]) if len(a) > 2 and a[2] is not None else 0.0
    return F.pad(a[0], torch_pad, mode=mode, value=value) if mode == "constant" else F.pad(a[0], torch_pad, mode=mode)


_OPS: dict[str, Callable[..., Any]] = {
    "BatchNormalization": _batch_norm,
    "Concat": lambda m, n, a, at: torch.cat([t for t in a if t is not None], dim=at.get("axis", 0)),
    "Gather": _gather,
    "Slice": _slice,
    "Shape": lambda m, n, a, at: torch.tensor(a[0].shape[at.get("start", 0):at.get("end", None)], dtype=torch.int64),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": lambda m, n, a, at: a[0].permute(*(at.get("perm") or reversed(range(a[0].dim())))),
    "Expand": lambda m, n, a, at: a[0].expand(torch.broadcast_shapes(a[0].shape, tuple(int(v) for v in a[1].tolist()))),
    "Split": _split,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
    "Range": lambda m, n, a, at: torch.arange(a[0].item(), a[1].item(), a[2].item(), dtype=a[0].dtype),
    "Pad": _pad,
    "Where": lambda m, n, a, at: torch.where(a[0].bool(), a[1], a[2]),
    "Equal": lambda m, n, a, at: a[0] == a[1],
    "Less": lambda m, n, a, at: a[0] < a[1],
    "Greater": lambda m, n, a, at: a[0] > a[1],
    "Not": lambda m, n, a, at: ~a[0].bool(),
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": lambda m, n, a, at: F.instance_norm(a[0], weight=a[1], bias=a[2],
                                                                 eps=at.get("epsilon", 1e-5)),
    "Gelu": lambda m, n, a, at: F.gelu(a[0], approximate=_text(at.get("approximate", "none"))),
    "Erf": lambda m, n, a, at: torch.erf(a[0]),
    "Exp": lambda m, n, a, at: torch.exp(a[0]),
    "Log": lambda m, n, a, at: torch.log(a[0]),
    "Sqrt": lambda m, n, a, at: torch.sqrt(a[0]),
    "Pow": lambda m, n, a, at: torch.pow(a[0], a[1]),
    "Neg": lambda m, n, a, at: -a[0],
    "Abs": lambda m, n, a, at: a[0].abs(),
    "Reciprocal": lambda m, n, a, at: 1.0 / a[0],
    "Max": lambda m, n, a, at: torch.stack(torch.broadcast_tensors(*a)).amax(0),
    "Min": lambda m, n, a, at: torch.stack(torch.broadcast_tensors(*a)).amin(0),
    "ReduceSum": _reduce(lambda x, ax, k: x.sum(dim=ax, keepdim=k)),
    "ReduceMax": _reduce(lambda x, ax, k: x.amax(dim=ax, keepdim=k)),
    "ReduceMin": _reduce(lambda x, ax, k: x.amin(dim=ax, keepdim=k)),
    "Einsum": lambda m, n, a, at: torch.einsum(_text(at["equation"]), *a),
    "LogSoftmax": lambda m, n, a, at: torch.log_softmax(a[0], dim=at.get("axis", -1)),
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda m, n, a, at: a[0].mean(dim=(2, 3), keepdim=True),
    "Gemm": _gemm,
    "MatMul": lambda m, n, a, at: a[0] @ a[1],
    "Reshape": _reshape,
    "Flatten": _flatten,
    "ReduceMean": _reduce_mean,
    "Relu": lambda m, n, a, at: _Relu.apply(a[0]),
    "Clip": _clip,
    "Sigmoid": lambda m, n, a, at: torch.sigmoid(a[0]),
    "Tanh": lambda m, n, a, at: torch.tanh(a[0]),
    "Sin": lambda m, n, a, at: torch.sin(a[0]),
    "Add": lambda m, n, a, at: a[0] + a[1],
    "Sub": lambda m, n, a, at: a[0] - a[1],
    "Mul": lambda m, n, a, at: a[0] * a[1],
    "Div": lambda m, n, a, at: a[0] / a[1],
    "Identity": lambda m, n, a, at: a[0],
    "Softmax": lambda m, n, a, at: torch.softmax(a[0], dim=at.get("axis", -1)),
}


def differentiable_copy(path, *, undefended: bool = True) -> OnnxModule:
    """Load ``path`` (.onnx) as an :class:`OnnxModule` returning logits; a fused defense head is cut off first."""
    import onnx


    try:
        proto = onnx.load(str(path))
    except Exception as e:
        raise BadInput(f"{path} is not a valid ONNX model ({type(e).__name__})") from None
    record = decode({p.key: p.value for p in proto.metadata_props}).get("defense") or {}
    if undefended and isinstance(record, dict) and record.get("logits"):
        proto = clean_view(proto, record["logits"])

    ripple = {name for chain in guard_nodes(proto) for name in chain[:-1]}  # all but the final Add: owner gradients
    return OnnxModule(proto, detach=ripple).eval()
