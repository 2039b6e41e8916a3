"""Export: ONNX (``export_onnx``); TensorRT engines arrive with the engine-build issue."""

from edgeguard.export.onnx import Deployed, ExportConfig, ExportResult, export_onnx

__all__ = ["Deployed", "ExportConfig", "ExportResult", "export_onnx"]
