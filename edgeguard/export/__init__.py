"""Export: ONNX (``export_onnx``); TensorRT engines in ``edgeguard.export.tensorrt`` (imported on use: it needs
tensorrt and a GPU only when a build runs)."""

from edgeguard.export.onnx import Deployed, ExportConfig, ExportResult, export_onnx

__all__ = ["Deployed", "ExportConfig", "ExportResult", "export_onnx"]
