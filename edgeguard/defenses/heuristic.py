"""``heuristic``: the output-perturbation defense of Khaled et al., ICMLA 2023 ("DCP" in their code).

Per query (docs/defenses.md): ``p = softmax(z)``, ``m = max p``, gate ``a = σ(ν(β - m))``,
``u = p - a·β(σ(γℓ(p)) - 1/2)``, ``q = u / Σu``.  Confident answers (``m ≥ β + 0.02``) come back unchanged; the
low-confidence region that out-of-distribution transfer sets populate is flattened.  No auxiliary model, no
randomness, no state: one softmax and a dozen element-wise ops, fused into the exported graph.

edgeguard defaults (docs/defenses.md): β=0.7, γ=0.2 (0.1 for 100 or more classes), ν=1000, reference mode,
and the top-1 guard on (the argmax of the undefended model is always kept, margin 1e-4);
``top1_guard=false`` reproduces the released code exactly.
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
from edgeguard.defenses.reverse_sigmoid import reverse_sigmoid_term, reverse_sigmoid_term_reference


@dataclass(frozen=True)
class HeuristicConfig(Config):
    beta: float = 0.7  # threshold on the max probability and perturbation magnitude ("epsilon" in the code)
    gamma: float | None = None  # slope; default 0.2, or 0.1 for >= 100 classes (the repository's CIFAR-100 value)
    nu: float = 1000.0  # gate sharpness (hard-coded 1000 in the reference)
    mode: Literal["reference", "textbook"] = "reference"
    top1_guard: bool = True

    def __post_init__(self) -> None:
        require(0.0 <= self.beta <= 10.0, f"heuristic beta must lie in [0, 10] (got {self.beta})")
        require(self.gamma is None or 0.0 < self.gamma <= 10.0, f"heuristic gamma must lie in (0, 10] (got {self.gamma})")
        require(0.0 < self.nu <= 1e5, f"heuristic nu must lie in (0, 100000] (got {self.nu})")
        require(self.mode == "reference" or self.beta <= 2.0,
                f"heuristic beta must be at most 2 in textbook mode, where larger values make entries negative (got {self.beta})")

    def slope(self, num_classes: int) -> float:
        return self.gamma if self.gamma is not None else (0.1 if num_classes >= 100 else 0.2)


class Heuristic(Defense):
    context_free = True  # its mapping follows from the published parameters alone
    name = "heuristic"
    cfg: HeuristicConfig

    def public_params(self):
        out = super().public_params()
        out["gamma"] = self.cfg.slope(self.num_classes)
        return out

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        c = self.cfg
        p = torch.softmax(logits, dim=-1)
        m = p.amax(-1, keepdim=True)
        gate = torch.sigmoid(c.nu * (c.beta - m))
        u = p - gate * reverse_sigmoid_term(p, c.beta, c.slope(self.num_classes), c.mode)
        q = u / u.sum(-1, keepdim=True)
        return preserve_top1(p, q) if c.top1_guard else q

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        c = self.cfg
        p = softmax_np(logits)
        m = p.max(-1, keepdims=True)
        gate = 1.0 / (1.0 + np.exp(np.clip(c.nu * (m - c.beta), -700, 700)))
        u = p - gate * reverse_sigmoid_term_reference(p, c.beta, c.slope(self.num_classes), c.mode)
        q = u / u.sum(-1, keepdims=True)
        return preserve_top1_reference(p, q) if c.top1_guard else q


@DEFENSES.register("heuristic", config=HeuristicConfig)
def build_heuristic(cfg: HeuristicConfig, ctx: DefenseContext) -> Heuristic:
    return Heuristic(cfg, ctx.num_classes)
