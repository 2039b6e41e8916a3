"""``gaussian``: additive Gaussian noise on the probabilities, clipped at 0 and renormalised.

``q = max(p + σ·n, 0) / Σ max(p + σ·n, 0)``.  Two noise sources:

- random mode (default): ``n ~ N(0, 1)`` drawn afresh for every query.  In PyTorch from a generator seeded
  with ``seed``; in the exported graph a ``RandomNormalLike`` node carrying the same seed (ONNX Runtime draws a
  reproducible sequence per session; TensorRT ignores the seed, spec section 3).  Averaging repeated
  queries removes this noise, which is why ModelGuard restricts itself to deterministic mappings.
- ``deterministic=true``: keyed pseudo-noise, a fixed function of the logits: ``n = ẑ·R`` with ``ẑ`` the
  standardised logits and ``R`` a secret (C, C) matrix drawn from ``seed`` with N(0, 1/C) entries, so each entry
  of ``n`` is approximately N(0, 1) across queries, while a repeated query gets the same answer (nothing to
  average away) and PyTorch and ONNX Runtime agree to float rounding (used by the parity tests).

``top1_guard`` optionally restores the argmax.  The seed is left out of the artifact's metadata, but it is
in the graph itself (the random node's ``seed`` attribute, or the key matrix ``R`` as an initializer), like
every other weight: output perturbation protects an API, not a file someone holds (spec pitfall 12).
A fresh ONNX Runtime session replays the same noise sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeguard.config import Config, require
from edgeguard.defenses.base import (
    DEFENSES,
    Defense,
    DefenseContext,
    preserve_top1,
    preserve_top1_reference,
    softmax_np,
)

_TINY = 1e-12


@dataclass(frozen=True)
class GaussianConfig(Config):
    sigma: float = 0.05
    deterministic: bool = False
    top1_guard: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        require(0.0 <= self.sigma <= 1.0, f"gaussian sigma must lie in [0, 1] (got {self.sigma})")
        require(0 <= self.seed < 2**31, f"gaussian seed must lie in [0, 2^31) (got {self.seed})")


class Gaussian(Defense):
    context_free = True  # its mapping follows from the published parameters alone
    name = "gaussian"
    random = True
    secret_params = ("seed",)
    cfg: GaussianConfig

    def __init__(self, cfg: GaussianConfig, num_classes: int):
        super().__init__(cfg, num_classes)
        g = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("mix", torch.randn(num_classes, num_classes, generator=g) / num_classes**0.5)
        self._gen = torch.Generator().manual_seed(cfg.seed)

    def is_random(self) -> bool:
        return not self.cfg.deterministic

    def noise(self, logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        if self.cfg.deterministic:
            centred = logits - logits.mean(-1, keepdim=True)
            scale = torch.sqrt((centred * centred).mean(-1, keepdim=True)) + 1e-6
            return (centred / scale) @ self.mix
        if torch.compiler.is_exporting():
            return torch.randn_like(p)  # RandomNormalLike; the seed is set on the node after export
        return torch.randn(p.shape, generator=self._gen, dtype=p.dtype)

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        p = torch.softmax(logits, dim=-1)
        u = torch.clamp(p + self.cfg.sigma * self.noise(logits, p), min=0.0) + _TINY
        q = u / u.sum(-1, keepdim=True)
        return preserve_top1(p, q) if self.cfg.top1_guard else q

    def postprocess_onnx(self, proto) -> None:
        """Seed the graph's random nodes (a fresh generator per ONNX Runtime session, same sequence each time)."""
        import onnx

        for node in proto.graph.node:
            if node.op_type in ("RandomNormalLike", "RandomUniformLike"):
                node.attribute.append(onnx.helper.make_attribute("seed", float(self.cfg.seed)))

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        if not self.cfg.deterministic:
            raise ValueError("the random mode has no reference; use deterministic=true")
        z = np.asarray(logits, dtype=np.float64)
        p = softmax_np(z)
        centred = z - z.mean(-1, keepdims=True)
        n = (centred / (np.sqrt((centred**2).mean(-1, keepdims=True)) + 1e-6)) @ self.mix.double().numpy()
        u = np.maximum(p + self.cfg.sigma * n, 0.0) + _TINY
        q = u / u.sum(-1, keepdims=True)
        return preserve_top1_reference(p, q) if self.cfg.top1_guard else q


@DEFENSES.register("gaussian", config=GaussianConfig)
def build_gaussian(cfg: GaussianConfig, ctx: DefenseContext) -> Gaussian:
    return Gaussian(cfg, ctx.num_classes)
