"""Model registry, the Normalize-first wrapper and the small contract every model keeps.

Every registered entry point returns a :class:`Backbone`: ``forward_features(x) -> (N, F)`` and a final
``nn.Linear`` named ``classifier``.  ``create_model`` wraps it in :class:`EdgeModel`, whose first layer
is :class:`Normalize`, so every artifact takes raw images in [0, 1].  Imported models
(:mod:`edgeguard.models.imported`) get the same wrapper with a discovered head path.  Code that swaps or
freezes the head (fine-tuning attacks, surrogates) uses ``model.classifier`` / ``reset_classifier`` /
``is_head_parameter`` and never branches on the architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgeguard.errors import BadInput
from edgeguard.registry import Registry

MODELS = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, so they live in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Backbone(nn.Module):
    """Base for registered families: subclasses set ``self.classifier`` and define ``forward_features``."""

    classifier: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


class EdgeModel(nn.Module):
    """Normalize, then the backbone: ``forward(x in [0,1]) -> logits``.

    ``guard`` is an optional weight-free module on the logits (a MagicGuard, set by
    :func:`edgeguard.models.guard.attach`); it is part of the model, so every caller -- training,
    fine-tuning attacks, quantization, export -- sees the guarded function.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], *, head_path: str = "net.classifier"):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.guard: nn.Module | None = None
        self.head_path = head_path  # dotted path of the final linear layer (discovered for imported models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(self.normalize(x))
        return z if self.guard is None else self.guard(z)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        z = self.net.forward_head(features)
        return z if self.guard is None else self.guard(z)

    @property
    def classifier(self) -> nn.Linear:
        return self.get_submodule(self.head_path)

    def is_head_parameter(self, name: str, _p: object = None) -> bool:
        """``name`` (from ``named_parameters()``) belongs to the final layer: the parameter filter of FTLL/RTLL."""
        return name.startswith(self.head_path + ".")

    def reset_classifier(self, num_classes: int | None = None, *, generator: torch.Generator | None = None) -> None:
        """Re-initialise the final layer (RTLL/RTAL), optionally with a new class count."""
        old = self.classifier
        fan_in, fan_out = int(old.weight.shape[1]), int(old.weight.shape[0])
        n = num_classes or fan_out
        bias = getattr(old, "bias", None)
        new = nn.Linear(fan_in, n, bias=bias is not None)
        if generator is not None:
            with torch.no_grad():
                bound = 1.0 / fan_in**0.5
                new.weight.uniform_(-bound, bound, generator=generator)
                if new.bias is not None:
                    new.bias.uniform_(-bound, bound, generator=generator)
        parent, _, leaf = self.head_path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, leaf, new)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options: Any,
) -> EdgeModel:
    """Build a registered architecture with ``Normalize`` first.  ``None`` options are dropped."""
    entry = MODELS.entry(name)
    if num_classes < 2:
        raise BadInput(f"num_classes must be at least 2 (got {num_classes})")
    if in_channels not in (1, 3):
        raise BadInput(f"in_channels must be 1 or 3 (got {in_channels})")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise BadInput(f"mean/std need {in_channels} values, one per input channel")
    options = {k: v for k, v in options.items() if v is not None}
    try:
        net = entry.fn(num_classes=num_classes, in_channels=in_channels, **options)
    except (TypeError, ValueError, RuntimeError) as e:
        raise BadInput(f"model {name!r}: bad option ({str(e).splitlines()[0]})") from None
    return EdgeModel(net, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
