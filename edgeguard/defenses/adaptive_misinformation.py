"""``adaptive_misinformation`` (Kariyappa & Qureshi, CVPR 2020): out-of-distribution-looking queries get the
answer of a misinformation model.

``m = max p``, gate ``h = σ(ν(τ - m))`` (ν=1000: ≈1 below τ, ≈0 above), ``q = (1 - h)·p + h·p_mis`` with
``p_mis = softmax(f̂(x))``.  The misinformation model f̂ has the protected architecture and is trained here, with
the one training loop, on the owner's training data with the loss ``-log(1 - p̂_y + 1e-12)`` (probability
pushed away from the true label), 5 epochs by default (both reference codes).  The inlier score is the
teacher's own max probability (the outlier-exposure detector of the paper is not used, as in the released
code).  Both branches are in one exported graph, so a query costs about two forward passes.  Not top-1
preserving: queries below τ are answered by f̂.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgeguard.config import Config, require
from edgeguard.defenses.base import DEFENSES, Defense, DefenseContext, softmax_np
from edgeguard.errors import BadInput
from edgeguard.training import TensorData, TrainConfig, fit


@dataclass(frozen=True)
class AdaptiveMisinformationConfig(Config):
    tau: float = 0.7  # ModelGuard's CIFAR-10 setting; class default 0.99 in the reference code
    nu: float = 1000.0
    epochs: int = 5  # misinformation model training
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        require(0.0 <= self.tau <= 1.0, f"adaptive_misinformation tau must lie in [0, 1] (got {self.tau})")
        require(0.0 < self.nu <= 1e5, f"adaptive_misinformation nu must lie in (0, 100000] (got {self.nu})")
        require(0 <= self.seed < 2**31, f"adaptive_misinformation seed must lie in [0, 2^31) (got {self.seed})")
        require(self.epochs >= 1 and self.lr > 0 and self.batch_size >= 1,
                "adaptive_misinformation epochs, lr and batch_size must be positive")


def misinformation_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``-log(1 - softmax(logits)_y + 1e-12)``, mean over the batch."""
    p_y = F.softmax(logits, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    return -torch.log(1.0 - p_y + 1e-12).mean()


class AdaptiveMisinformation(Defense):
    name = "adaptive_misinformation"
    needs_input = True
    cfg: AdaptiveMisinformationConfig

    def __init__(self, cfg: AdaptiveMisinformationConfig, num_classes: int, misinformation: torch.nn.Module):
        super().__init__(cfg, num_classes)
        self.misinformation = misinformation.eval()

    def public_params(self):
        return {k: v for k, v in super().public_params().items() if k in ("tau", "nu")}

    def forward(self, logits: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            raise BadInput("adaptive_misinformation needs the input images as well as the logits")
        p = torch.softmax(logits, dim=-1)
        gate = torch.sigmoid(self.cfg.nu * (self.cfg.tau - p.amax(-1, keepdim=True)))
        p_mis = torch.softmax(self.misinformation(x), dim=-1)
        return (1.0 - gate) * p + gate * p_mis

    def reference(self, logits: np.ndarray, x: np.ndarray | None = None) -> np.ndarray:
        p = softmax_np(logits)
        with torch.no_grad():
            z_mis = self.misinformation.double()(torch.as_tensor(x, dtype=torch.float64)).numpy()
        self.misinformation.float()
        gate = 1.0 / (1.0 + np.exp(np.clip(self.cfg.nu * (p.max(-1, keepdims=True) - self.cfg.tau), -700, 700)))
        return (1.0 - gate) * p + gate * softmax_np(z_mis)


@DEFENSES.register("adaptive_misinformation", config=AdaptiveMisinformationConfig)
def build_adaptive_misinformation(cfg: AdaptiveMisinformationConfig, ctx: DefenseContext) -> AdaptiveMisinformation:
    if ctx.model_factory is None or ctx.train_images is None:
        raise BadInput("adaptive_misinformation trains a misinformation model on the protected model's training data; "
                       "none was given")
    x, y = ctx.train_images()
    torch.manual_seed(cfg.seed)
    model = ctx.model_factory()
    fit(model, TensorData(x, y), TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed),
        loss=misinformation_loss, desc="misinformation model", quiet=ctx.quiet)
    return AdaptiveMisinformation(cfg, ctx.num_classes, model.cpu().eval())
