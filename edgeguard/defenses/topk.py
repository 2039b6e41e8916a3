"""``topk``: return only the k most probable classes; ``k=1`` is the hard-label (top-1) defense.

``k=1``: ``q = one-hot(argmax p)`` (ModelGuard's Top-1 baseline).  ``k>1``: the k largest probabilities,
the rest zeroed, renormalised to sum to 1 (``renormalize=false`` keeps the raw values).  Ties are broken
towards the lower class index, as ONNX ``TopK``/``ArgMax`` do.  The argmax is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgeguard.config import Config, require
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext, one_hot_of, softmax_np
from edgeguard.errors import BadInput


@dataclass(frozen=True)
class TopKConfig(Config):
    k: int = 1
    renormalize: bool = True

    def __post_init__(self) -> None:
        require(self.k >= 1, f"topk k must be at least 1 (got {self.k})")


class TopK(Defense):

    keeps_top1 = True  # by construction: the argmax is kept
    context_free = True  # its mapping follows from the published parameters alone
    name = "topk"
    cfg: TopKConfig

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        p = torch.softmax(logits, dim=-1)
        k = self.cfg.k
        if k == 1:
            return one_hot_of(p.argmax(-1, keepdim=True), self.num_classes, p)
        idx = torch.topk(p, k, dim=-1).indices  # (N, k); TopK with a constant K
        classes = torch.arange(self.num_classes, device=p.device).view(1, 1, -1)
        mask = (idx.unsqueeze(-1) == classes).to(p.dtype).sum(1)  # (N, C) 0/1
        q = p * mask
        return q / q.sum(-1, keepdim=True) if self.cfg.renormalize else q

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        p = softmax_np(logits)
        order = np.argsort(-p, axis=-1, kind="stable")[:, : self.cfg.k]
        q = np.zeros_like(p)
        np.put_along_axis(q, order, np.take_along_axis(p, order, -1), -1)
        if self.cfg.k == 1:
            return (q > 0).astype(np.float64)
        return q / q.sum(-1, keepdims=True) if self.cfg.renormalize else q


@DEFENSES.register("topk", config=TopKConfig)
def build_topk(cfg: TopKConfig, ctx: DefenseContext) -> TopK:
    if cfg.k > ctx.num_classes:
        raise BadInput(f"topk k={cfg.k} exceeds the model's {ctx.num_classes} classes")
    return TopK(cfg, ctx.num_classes)
