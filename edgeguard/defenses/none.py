"""``none``: the undefended output, softmax of the logits."""

from __future__ import annotations

import numpy as np
import torch

from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext, softmax_np


class NoDefense(Defense):

    keeps_top1 = True  # by construction: the argmax is kept
    context_free = True  # its mapping follows from the published parameters alone
    name = "none"

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        return softmax_np(logits)


@DEFENSES.register("none")
def build_none(cfg: None, ctx: DefenseContext) -> NoDefense:
    return NoDefense(cfg, ctx.num_classes)
