"""KnockoffNets (Orekondy et al., CVPR 2019), random policy: query ``budget`` images drawn at random from the
attacker's pool, once each, and distil the returned vectors into a surrogate (soft-label cross-entropy).

Spec (extraction-defenses 5.1, modelguard 6.1): the pool is another dataset (CIFAR-100 for a CIFAR-10 victim,
synthetic images here); posteriors are taken on un-augmented images, the surrogate may train with
augmentation while keeping the posterior of the un-augmented image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgeguard.attacks.base import ATTACKS
from edgeguard.attacks.extraction.base import (
    ExtractionConfig,
    ExtractionContext,
    QueryOracle,
    query_all,
    train_surrogate,
)


@dataclass(frozen=True)
class KnockoffConfig(ExtractionConfig):
    pass


def sample_pool(pool, n: int, seed: int) -> torch.Tensor:
    """``n`` images drawn without replacement from the pool, in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool), generator=g)[:n]
    return pool.subset(idx).tensors()[0]


@ATTACKS.register("knockoff", family="extraction", config=KnockoffConfig, needs_pool=True)
def knockoff(oracle: QueryOracle, pool, cfg: KnockoffConfig, ctx: ExtractionContext) -> torch.nn.Module:
    x = sample_pool(pool, min(len(pool), oracle.remaining), cfg.seed)
    y = query_all(oracle, x)
    ctx.log["transfer_set"] = len(x)
    return train_surrogate(ctx.make_surrogate(), x, y, cfg, desc="knockoff surrogate", quiet=ctx.quiet)
