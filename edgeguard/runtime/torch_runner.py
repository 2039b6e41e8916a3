"""Runner for a bundle folder: the float PyTorch checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from edgeguard.bundle import load_bundle
from edgeguard.runtime.base import Runner, RunnerInfo
from edgeguard.training import resolve_device


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, path, *, device: str | None = None, **kw):
        super().__init__(path, **kw)
        self.device = resolve_device(device)

    def _open_impl(self) -> RunnerInfo:
        bundle = load_bundle(self.path)
        self._model = bundle.load_model().to(self.device)
        spec = bundle.spec
        defense = next((s.get("defense", "none") for s in reversed(bundle.stages) if "defense" in s), "none")
        return RunnerInfo(
            backend=self.backend,
            precision="fp32",
            defense=defense,
            input_shape=spec.input_shape,
            classes=spec.classes,
            sha256=bundle.sha256,
            path=str(self.path),
            device=str(self.device),
            details=(("arch", spec.arch), ("stages", tuple(s["stage"] for s in bundle.stages))),
        )

    @torch.no_grad()
    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        logits = self._model(torch.from_numpy(x).to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def _close_impl(self) -> None:
        self._model = None
