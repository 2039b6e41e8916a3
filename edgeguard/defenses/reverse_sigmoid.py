"""``reverse_sigmoid`` (Lee et al. 2019) and the reverse-sigmoid term the ``heuristic`` reuses.

``q ∝ p - a·β·(σ(γ·ℓ(p)) - 1/2)`` with gate ``a = 1`` here.  ``mode="reference"`` is the clipped-odds form of
mmazeika/model-stealing-defenses and KacemKhaled/defending-extraction (``ℓ = log clip(p/(1-p), 1e-12, 1-1e-12)``,
never pushes a class above 0.5 down); ``mode="textbook"`` uses the true logit ``log p - log(1-p)``
(docs/defenses.md); ``mode="art"`` is the Adversarial Robustness Toolbox's ``ReverseSigmoid``
postprocessor (1.20.1): the true logit of ``p`` clipped below at 1e-9 (ART's upper clip ``1 - 1e-9`` is 1.0 in
float32), ``p - r`` clipped to ``[0, 1]`` before renormalising.  Defaults β=0.2, γ=0.2: the ModelGuard scripts' CIFAR-10 setting (β=0.21, γ=0.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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

ODDS_MIN, ODDS_MAX = 1e-12, 1.0 - 1e-12
ART_CLIP = 1e-9  # ART's ReverseSigmoid clips p to [1e-9, 1 - 1e-9]; in float32 the upper bound rounds to 1.0, kept
# here in every precision, so a p of exactly 1 gets r = beta/2 as in ART
MODES = ("reference", "textbook", "art")


def reverse_sigmoid_term(p: torch.Tensor, beta: float, gamma: float, mode: str) -> torch.Tensor:
    """``r = β(σ(γℓ) - 1/2)``; ops: Sub, Div, Clip, Log, Mul, Sigmoid (docs/defenses.md)."""
    if mode == "reference":
        ell = torch.log(torch.clamp(p / (1.0 - p), ODDS_MIN, ODDS_MAX))
    elif mode == "art":
        pc = torch.clamp(p, ART_CLIP, 1.0)
        ell = torch.log(pc) - torch.log(1.0 - pc)
    else:
        ell = torch.log(torch.clamp(p, ODDS_MIN, 1.0)) - torch.log(torch.clamp(1.0 - p, ODDS_MIN, 1.0))
    return beta * (torch.sigmoid(gamma * ell) - 0.5)


def reverse_sigmoid_term_reference(p: np.ndarray, beta: float, gamma: float, mode: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore"):
        if mode == "reference":
            ell = np.log(np.clip(p / (1.0 - p), ODDS_MIN, ODDS_MAX))
        elif mode == "art":
            pc = np.clip(p, ART_CLIP, 1.0)
            ell = -np.log((1.0 - pc) / pc)
        else:
            ell = np.log(np.clip(p, ODDS_MIN, 1.0)) - np.log(np.clip(1.0 - p, ODDS_MIN, 1.0))
    return beta * (1.0 / (1.0 + np.exp(-gamma * ell)) - 0.5)


@dataclass(frozen=True)
class ReverseSigmoidConfig(Config):
    beta: float = 0.2
    gamma: float = 0.2
    mode: Literal["reference", "textbook", "art"] = "reference"
    top1_guard: bool = False

    def __post_init__(self) -> None:
        require(0.0 <= self.beta <= 10.0, f"reverse_sigmoid beta must lie in [0, 10] (got {self.beta})")
        require(0.0 < self.gamma <= 10.0, f"reverse_sigmoid gamma must lie in (0, 10] (got {self.gamma})")
        require(self.mode in MODES, f"reverse_sigmoid mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        require(self.mode != "textbook" or self.beta <= 2.0,
                f"reverse_sigmoid beta must be at most 2 in textbook mode, where larger values make entries negative (got {self.beta})")


class ReverseSigmoid(Defense):
    context_free = True  # its mapping follows from the published parameters alone
    name = "reverse_sigmoid"
    cfg: ReverseSigmoidConfig

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        p = torch.softmax(logits, dim=-1)
        u = p - reverse_sigmoid_term(p, c.beta, c.gamma, c.mode)
        if c.mode == "art":
            u = torch.clamp(u, 0.0, 1.0)
        q = u / u.sum(-1, keepdim=True)
        return preserve_top1(p, q) if c.top1_guard else q

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        c = self.cfg
        p = softmax_np(logits)
        u = p - reverse_sigmoid_term_reference(p, c.beta, c.gamma, c.mode)
        if c.mode == "art":
            u = np.clip(u, 0.0, 1.0)
        q = u / u.sum(-1, keepdims=True)
        return preserve_top1_reference(p, q) if c.top1_guard else q


@DEFENSES.register("reverse_sigmoid", config=ReverseSigmoidConfig)
def build_reverse_sigmoid(cfg: ReverseSigmoidConfig, ctx: DefenseContext) -> ReverseSigmoid:
    return ReverseSigmoid(cfg, ctx.num_classes)
