"""The Runner protocol: every check (accuracy, verification, attacks, benchmarks) takes a Runner.

``Runner.predict`` is final: it validates the input (uint8 0-255 or float 0-1, NCHW, the artifact's
input shape), scales uint8, splits into batches and checks the output; backends override only
``_open_impl``, ``_predict_impl`` (float32 NCHW numpy in, float32 (N, classes) numpy out) and
``_close_impl``.  ``info`` is read from the artifact itself, never passed in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.errors import BadInput, CheckFailed

DEFAULT_BATCH = 256


@dataclass(frozen=True)
class DefenseRecord:
    """The output defense an artifact carries, read once by its runner (the graph's metadata, an engine manifest, a
    host-side module, a server's public info): every check reads it here, never from the artifact again."""

    name: str = "none"
    params: dict = field(default_factory=dict)  # public parameters (secret ones are never recorded)
    placement: str = "graph"  # graph (fused) | host (a state file beside the graph) | unknown (a foreign server)

    @classmethod
    def from_record(cls, record: Any, *, default: str = "none") -> DefenseRecord:
        """From an artifact's ``defense`` metadata (a dict, a bare name, or nothing)."""
        if isinstance(record, dict):
            return cls(str(record.get("name", default)), dict(record.get("params") or {}),
                       str(record.get("placement", "graph")))
        if isinstance(record, str) and record:
            return cls(record)
        return cls(default, {}, "unknown" if default == "unknown" else "graph")


@dataclass(frozen=True)
class RunnerInfo:
    backend: str  # "torch", "onnxruntime", "tensorrt"
    precision: str  # "fp32", "int8", "fp16", ...
    defense: str  # name of the output defense in the artifact ("none" when undefended)
    input_shape: tuple[int | None, int | None, int | None]  # C, H, W (None: dynamic)
    classes: tuple[str, ...]
    sha256: str  # bundle: the manifest's hash; file artifacts: the file's hash
    path: str
    device: str = "cpu"
    details: tuple[tuple[str, Any], ...] = ()
    defense_record: DefenseRecord | None = None  # filled from ``defense`` when a runner gives no record

    def __post_init__(self) -> None:
        if self.defense_record is None:
            object.__setattr__(self, "defense_record", DefenseRecord.from_record(None, default=self.defense))
        elif self.defense_record.name != self.defense:
            raise ValueError(f"defense {self.defense!r} and its record {self.defense_record.name!r} disagree")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["classes"] = list(self.classes)
        d["details"] = dict(self.details)
        return d


class Runner:
    """Base class; use as ``with open_runner(path) as r: probs = r.predict(x)``."""

    backend = "base"

    def __init__(self, path: str | Path, *, batch_size: int = DEFAULT_BATCH):
        self.path = Path(path)
        self.batch_size = int(batch_size)
        self._info: RunnerInfo | None = None
        self.flagged = 0  # rows a defense flagged (e.g. ModelGuard-S codebook misses) since the runner opened

    # --- public, final ---------------------------------------------------------------------------
    def open(self) -> Runner:
        if self._info is None:
            self._info = self._open_impl()
            self.flagged = 0
        return self

    def close(self) -> None:
        if self._info is not None:
            self._close_impl()
            self._info = None

    def __enter__(self) -> Runner:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def expect(self, rows: int, *, batch: int | None = None) -> None:
        """A check says how many images it is about to send (a remote runner derives its whole-check deadline from
        it); local runners need nothing."""

    @property
    def info(self) -> RunnerInfo:
        if self._info is None:
            self.open()
        assert self._info is not None
        return self._info

    def predict(self, x: Any, *, batch_size: int | None = None) -> np.ndarray:
        """Probabilities, float32 (N, classes), exactly as a deployed API would return them."""
        info = self.info
        arr = self._check(x)
        bs = int(batch_size or self.batch_size)
        outs = [self._predict_impl(arr[s : s + bs]) for s in range(0, len(arr), bs)]
        out = np.concatenate(outs, axis=0) if outs else np.zeros((0, info.num_classes), np.float32)
        out = np.asarray(out, dtype=np.float32)
        if out.shape != (len(arr), info.num_classes):
            raise BadInput(f"{self.path} returned shape {out.shape}, expected {(len(arr), info.num_classes)}")
        if not np.all(np.isfinite(out)):
            raise CheckFailed(f"{self.path} returned non-finite probabilities (NaN or inf); the model is broken")
        return out

    # --- backends override these -----------------------------------------------------------------
    def _open_impl(self) -> RunnerInfo:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close_impl(self) -> None:
        pass

    # --- input validation, once for all backends ---------------------------------------------------
    def _check(self, x: Any) -> np.ndarray:
        if hasattr(x, "detach"):  # torch tensor, without importing torch here
            x = x.detach().cpu().numpy()
        arr = np.asarray(x)
        if arr.ndim == 3:
            arr = arr[None]
        expected = self.info.input_shape
        if arr.ndim != 4:
            raise BadInput(f"input must be N x C x H x W images, got shape {arr.shape}")
        if any(e is not None and e != a for e, a in zip(expected, arr.shape[1:], strict=True)):
            want = "x".join("?" if e is None else str(e) for e in expected)
            raise BadInput(f"input shape {tuple(arr.shape)} does not match {self.path}'s N x {want}")
        if arr.dtype == np.uint8:
            return arr.astype(np.float32) / np.float32(255.0)
        if not np.issubdtype(arr.dtype, np.floating):
            raise BadInput(f"input must be uint8 (0-255) or float (0-1), got {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.size:
            lo, hi = float(np.min(arr)), float(np.max(arr))
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
                raise BadInput(f"float input must lie in [0, 1] (raw images scaled by 1/255), got {lo:.3g}..{hi:.3g}")
        return arr
