"""``edgeguard pipeline --config configs/demo.yaml --out DIR``: every stage in-process, then a report.

Stages: train -> watermark (optional) -> magicguard (optional: guard + destruction table) -> quantize (optional) -> export
-> evaluate (accuracy + parity) -> fragile (optional: enrol the shipped ONNX, tamper detection) -> verify (watermark on the ONNX artifacts: unmarked, marked, after each removal attack)
-> defenses -> extraction -> bench.

The stages call the same library functions as the stage commands (``edgeguard.verbs``, re-exported by ``edgeguard.api``); later
protections add their own stage functions to ``STAGES``.  Outputs in DIR:
``bundle/`` (the owner's PyTorch bundle), ``model.onnx`` (what ships), ``report.md``, ``report.json``.
"""

from edgeguard.pipeline.config import PipelineConfig
from edgeguard.pipeline.run import RUN_MARKER, PipelineResult, run_pipeline
from edgeguard.pipeline.stages import STAGES, Context

__all__ = ["RUN_MARKER", "STAGES", "Context", "PipelineConfig", "PipelineResult", "run_pipeline"]
