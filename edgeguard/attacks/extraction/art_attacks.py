"""ART's own extraction attacks (``art:knockoff``, ``art:copycat``) through edgeguard's oracle and pool.

The victim is the deployed artifact behind the same budgeted :class:`QueryOracle` as edgeguard's attacks (wrapped
by :func:`edgeguard.art_bridge.as_art_classifier`); the thief is ART's ``PyTorchClassifier`` around the same
surrogate architecture; the pool is the same query set.  What ART does differently stays ART's:

- ``KnockoffNets`` (random policy) and ``CopycatCNN`` draw ``nb_stolen`` pool images without replacement with
  NumPy's global generator (seeded here from ``seed``, and restored afterwards) and query each once.
- ``PyTorchClassifier.fit`` reduces label vectors to their argmax when the loss is ``torch.nn.CrossEntropyLoss``
  (``loss=ce``, what an ART script writes): the surrogate learns from hard labels even with
  ``use_probability=True``.  ``loss=soft`` keeps the vectors (soft-label cross-entropy, as edgeguard's attack).
- No learning-rate schedule and no augmentation.  ART's own default ``batch_size_fit`` is 1; here it defaults to
  ``batch_size`` (64), so that the two protocols differ only where named.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from edgeguard.attacks.base import ATTACKS
from edgeguard.attacks.extraction.base import ExtractionConfig, ExtractionContext, QueryOracle
from edgeguard.config import require


@dataclass(frozen=True)
class ArtExtractionConfig(ExtractionConfig):
    batch_size_fit: int = 0  # ART's surrogate batch size (0: batch_size; ART's own default is 1)
    use_probability: bool = True  # ART queries keep the probability vectors (else ART one-hots them)
    loss: Literal["ce", "soft"] = "ce"  # ce: torch CrossEntropyLoss (ART trains on the argmax); soft: soft-label CE
    optimizer: Literal["sgd", "adam"] = "sgd"  # sgd: momentum 0.9, weight decay 5e-4 (edgeguard's training defaults)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.batch_size_fit >= 0, "batch_size_fit must be >= 0 (0: batch_size)")
        require(self.loss in ("ce", "soft"), f"loss must be ce or soft (got {self.loss!r})")
        require(self.optimizer in ("sgd", "adam"), f"optimizer must be sgd or adam (got {self.optimizer!r})")
        require(self.augment == "none", "ART's attacks train without augmentation: leave augment at none")


class SoftCrossEntropy(nn.Module):
    """``-sum(y * log_softmax(z))`` averaged over the batch; ART leaves the label vectors of this loss as they are."""

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(y.float() * torch.log_softmax(logits, dim=1)).sum(1).mean()


@contextlib.contextmanager
def _seeded(seed: int):
    """ART samples with NumPy's global generator and trains with torch's: seed both, restore both after."""
    np_state, torch_state = np.random.get_state(), torch.random.get_rng_state()
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


def _run_art(which: str, oracle: QueryOracle, pool, cfg: ArtExtractionConfig, ctx: ExtractionContext) -> nn.Module:
    from edgeguard.art_bridge import as_art_classifier, require_art

    art = require_art()
    from art.attacks.extraction import CopycatCNN, KnockoffNets
    from art.estimators.classification import PyTorchClassifier

    x = pool.tensors()[0].numpy().astype(np.float32)
    n = min(len(x), oracle.remaining)
    model = ctx.make_surrogate()
    opt = (torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4) if cfg.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=cfg.lr))
    thief = PyTorchClassifier(model, loss=nn.CrossEntropyLoss() if cfg.loss == "ce" else SoftCrossEntropy(),
                              optimizer=opt, input_shape=tuple(ctx.input_shape), nb_classes=ctx.num_classes,
                              clip_values=(0.0, 1.0), device_type="cpu")
    common = dict(batch_size_fit=cfg.batch_size_fit or cfg.batch_size, batch_size_query=oracle.batch_size,
                  nb_epochs=cfg.epochs, nb_stolen=n, use_probability=cfg.use_probability)
    attack = (KnockoffNets(as_art_classifier(oracle), sampling_strategy="random", verbose=False, **common)
              if which == "knockoff" else CopycatCNN(as_art_classifier(oracle), **common))
    with _seeded(cfg.seed):
        attack.extract(x, thieved_classifier=thief)
    ctx.log.update({"transfer_set": n, "art_version": art.__version__,
                    "labels": "argmax (ART reduces label vectors for CrossEntropyLoss)" if cfg.loss == "ce"
                    else "probability vectors", "batch_size_fit": common["batch_size_fit"]})
    return model.eval()


@ATTACKS.register("art:knockoff", family="extraction", config=ArtExtractionConfig, needs_pool=True)
def art_knockoff(oracle: QueryOracle, pool, cfg: ArtExtractionConfig, ctx: ExtractionContext) -> nn.Module:
    """ART's ``KnockoffNets`` (random sampling strategy)."""
    return _run_art("knockoff", oracle, pool, cfg, ctx)


@ATTACKS.register("art:copycat", family="extraction", config=ArtExtractionConfig, needs_pool=True)
def art_copycat(oracle: QueryOracle, pool, cfg: ArtExtractionConfig, ctx: ExtractionContext) -> nn.Module:
    """ART's ``CopycatCNN``."""
    return _run_art("copycat", oracle, pool, cfg, ctx)
