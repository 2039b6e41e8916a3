"""PT2E quantizers for the two deployment targets (annotate only; torchao's prepare/convert rewrite).

* ``tensorrt``: INT8 symmetric activations (zero point 0) and per-channel symmetric INT8 weights --
  what TensorRT's explicit quantization accepts.  Q/DQ go on the inputs of every conv / linear and of
  residual adds (TensorRT fuses conv + add best when the shortcut carries Q/DQ too).
* ``cpu``: unsigned asymmetric activations + signed per-channel weights (U8S8), which ONNX Runtime
  runs with integer kernels on x86; conv outputs are quantized as well so that DQ -> Conv -> Q
  patterns fuse into QLinearConv.

Logits (the output of the final linear) are never quantized, so softmax and the defense head stay FP32.
Layers whose module path starts with one of ``exclude`` (e.g. a MagicGuard layer) are left in float.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from edgeguard.errors import BadInput

CONV_OPS = ("conv2d",)
LINEAR_OPS = ("linear",)
ADD_OPS = ("add",)


def _op_name(node) -> str:
    target = getattr(node, "target", None)
    name = getattr(target, "__name__", str(target))  # e.g. "conv2d.default"
    return name.split(".")[0]


def _observers(method: str):
    import torchao.quantization.pt2e as pt2e

    if method == "minmax":
        return pt2e.MinMaxObserver
    if method == "histogram":
        return pt2e.HistogramObserver
    raise BadInput(f"unknown calibration method {method!r}; use minmax or histogram")


def make_specs(target: str, calibration: str, *, qat: bool):
    """(activation spec, weight spec) for a target."""
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    if target not in ("tensorrt", "cpu"):
        raise BadInput(f"unknown quantization target {target!r}; use tensorrt or cpu")
    eps = 2**-12
    if qat:
        act_obs = pt2e.FusedMovingAvgObsFakeQuantize.with_args(observer=pt2e.MovingAverageMinMaxObserver, eps=eps)
        w_obs = pt2e.FusedMovingAvgObsFakeQuantize.with_args(observer=pt2e.MovingAveragePerChannelMinMaxObserver, eps=eps)
    else:
        act_obs = _observers(calibration).with_args(eps=eps)
        w_obs = pt2e.PerChannelMinMaxObserver.with_args(eps=eps)
    if target == "tensorrt":
        act = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_tensor_symmetric,
                               observer_or_fake_quant_ctr=act_obs)
    else:
        act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                               observer_or_fake_quant_ctr=act_obs)
    weight = QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric,
                              ch_axis=0, observer_or_fake_quant_ctr=w_obs)
    return act, weight


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _excluded(node, exclude: Sequence[str]) -> bool:
    path = _module_path(node)
    return any(path == e or path.startswith(e + ".") or f".{e}" in f".{path}" for e in exclude)


def make_quantizer(target: str, calibration: str = "histogram", *, qat: bool = False, exclude: Sequence[str] = ()):
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, Quantizer

    act, weight = make_specs(target, calibration, qat=qat)
    quantize_outputs = target == "cpu"

    class EdgeguardQuantizer(Quantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            nodes = [n for n in model.graph.nodes if n.op == "call_function"]
            linears = [n for n in nodes if _op_name(n) in LINEAR_OPS]
            last_linear = linears[-1] if linears else None
            for n in nodes:
                op = _op_name(n)
                if _excluded(n, exclude) or "quantization_annotation" in n.meta:
                    continue
                if op in CONV_OPS or op in LINEAR_OPS:
                    inputs = {n.args[0]: act, n.args[1]: weight}
                    out = None
                    if quantize_outputs and op in CONV_OPS:
                        users = list(n.users)
                        if len(users) == 1 and _op_name(users[0]) in ("relu", "relu_", "hardtanh", "clamp"):
                            users[0].meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=act, _annotated=True)
                        else:
                            out = act
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map=inputs, output_qspec=out if n is not last_linear else None, _annotated=True
                    )
                elif op in ADD_OPS and len(n.args) >= 2 and all(isinstance(a, torch.fx.Node) for a in n.args[:2]):
                    n.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={n.args[0]: act, n.args[1]: act}, _annotated=True
                    )
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            pass

    return EdgeguardQuantizer()
