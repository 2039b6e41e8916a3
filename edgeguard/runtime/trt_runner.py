"""Runner for a TensorRT ``.engine`` file.

The TensorRT backend itself arrives with the engine-build issue; until then opening an engine says
clearly why it cannot run here (exit code 3), and never pretends to.
"""

from __future__ import annotations

import importlib.util

from edgeguard.errors import BackendUnavailable, BadInput
from edgeguard.runtime.base import Runner, RunnerInfo


class TrtRunner(Runner):
    backend = "tensorrt"

    def _open_impl(self) -> RunnerInfo:
        if not self.path.is_file():
            raise BadInput(f"{self.path} does not exist")
        if importlib.util.find_spec("tensorrt") is None:
            raise BackendUnavailable(
                f"cannot run {self.path}: TensorRT is not installed here "
                "(it needs an NVIDIA GPU or Jetson and pip install 'edgeguard[trt]')"
            )
        raise BackendUnavailable(
            f"cannot run {self.path}: this edgeguard version has no TensorRT runner yet; "
            "run the .onnx artifact with ONNX Runtime instead"
        )
