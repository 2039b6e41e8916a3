"""INT8 quantization (PT2E via torchao): ``quantize(model, cfg, data)`` and ``quantize_bundle``."""

from edgeguard.quantize.core import PtqConfig, QatConfig, QuantizeResult, quantize, quantize_bundle

__all__ = ["PtqConfig", "QatConfig", "QuantizeResult", "quantize", "quantize_bundle"]
