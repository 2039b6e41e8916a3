"""``rounding``: probabilities rounded to a number of decimals, not renormalised (ModelGuard baseline).

``q = round(p, decimals)`` element-wise (round half to even, ONNX ``Round``).  With 1 decimal (the ModelGuard
scripts' setting) every entry is a multiple of 0.1; ties after rounding make the argmax the first index,
so the top-1 can change (spec pitfall 15) and rows need not sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeguard.config import Config, require
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext, softmax_np


@dataclass(frozen=True)
class RoundingConfig(Config):
    decimals: int = 1

    def __post_init__(self) -> None:
        require(0 <= self.decimals <= 6, f"rounding decimals must lie in 0..6 (got {self.decimals})")


class Rounding(Defense):
    context_free = True  # its mapping follows from the published parameters alone
    name = "rounding"
    cfg: RoundingConfig

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        scale = float(10 ** self.cfg.decimals)
        return torch.round(torch.softmax(logits, dim=-1) * scale) / scale

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        scale = 10.0 ** self.cfg.decimals
        return np.round(softmax_np(logits) * scale) / scale


@DEFENSES.register("rounding", config=RoundingConfig)
def build_rounding(cfg: RoundingConfig, ctx: DefenseContext) -> Rounding:
    return Rounding(cfg, ctx.num_classes)
