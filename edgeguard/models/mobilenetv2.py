"""MobileNetV2 adapted to 32x32 inputs: stride-1 stem and stride-1 second bottleneck stage.

Otherwise the torchvision layout: inverted residuals with ReLU6, ``width_mult`` rounded to
multiples of 8, a 1280-channel last conv, global average pool, optional dropout, ``classifier``.
Residual adds are plain ``x + conv(x)`` and activations are not in-place, for PT2E quantization.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgeguard.models.base import MODELS, Backbone

# expand ratio t, output channels c, repeats n, first stride s (CIFAR: stage 2 stride 2 -> 1)
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:  # never round down by more than 10%
        new += divisor
    return new


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1), 3x3 depthwise, 1x1 linear project; add when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(Backbone):
    """Stem, 17 inverted residuals, 1x1 conv to ``last_channel``, pool, dropout, ``classifier``.

    ``forward`` applies dropout between ``forward_features`` and ``classifier``; with the default
    ``dropout=0.0`` it is an ``nn.Identity`` and ``forward == classifier(forward_features(x))``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width_mult: float = 1.0,
        dropout: float = 0.0,
        last_channel: int = 1280,
    ):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        last = _make_divisible(last_channel * max(1.0, width_mult))
        layers: list[nn.Module] = [_conv_bn_relu6(in_channels, cin, stride=1)]
        for t, c, n, s in _SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn_relu6(cin, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.num_features = last
        self.head_drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_out per group (TF/timm MobileNet init); torch's fan_out ignores groups, which
                # makes the depthwise convs tiny and an untrained model's eval output vanish (~1e-9).
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.features(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head_drop(self.forward_features(x)))


@MODELS.register("mobilenetv2", family="mobilenet", input_size=32)
def mobilenetv2(
    num_classes: int, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.0
) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, width_mult=width_mult, dropout=dropout)
