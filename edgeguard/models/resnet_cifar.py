"""CIFAR-style ResNet: 3x3 stride-1 stem, no max-pool, BasicBlocks, stages 64/128/256/512.

Residual adds are plain ``out + shortcut`` and every ReLU is ``inplace=False`` so that
``torch.export``-based (PT2E) quantization can trace and annotate the graph unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgeguard.models.base import MODELS, Backbone


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU, conv3x3-BN, add the (projected) shortcut, ReLU."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(Backbone):
    """Stem, four BasicBlock stages (strides 1/2/2/2), global average pool, ``classifier``."""

    def __init__(
        self,
        layers: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=False),
        )
        stages = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(cin, w, stride)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.num_features = cin
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.flatten(self.pool(x))


@MODELS.register("resnet18", family="resnet", input_size=32)
def resnet18(num_classes: int, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar([2, 2, 2, 2], num_classes, in_channels)


@MODELS.register("resnet34", family="resnet", input_size=32)
def resnet34(num_classes: int, in_channels: int = 3) -> ResNetCifar:
    return ResNetCifar([3, 4, 6, 3], num_classes, in_channels)
