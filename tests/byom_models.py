"""Three classifiers defined outside edgeguard's registry, with the head layouts users bring (used by the
bring-your-own-model tests; plain PyTorch: torchvision and timm cannot be imported here)."""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class TinyResNet(nn.Module):
    """ResNet layout: stem, residual stages with BatchNorm, global pool, ``.fc``."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TinyVGG(nn.Module):
    """VGG / MobileNet layout: ``features`` then a ``classifier`` Sequential ending in a Linear (Dropout inside)."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class TinyViT(nn.Module):
    """ViT / ConvNeXt layout: patch embedding, a transformer-ish block with LayerNorm, a norm, then ``.head``."""

    def __init__(self, num_classes: int = 10, in_ch: int = 1, dim: int = 32, patch: int = 4, tokens: int = 64):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm = nn.GroupNorm(1, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, L, D)
        h = self.norm1(t)
        t = t + self.attn(h, h, h, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        pooled = t.mean(1)
        return self.head(self.norm(pooled.unsqueeze(-1)).squeeze(-1))


def resnet(num_classes: int = 10, in_ch: int = 1, width: int = 16) -> nn.Module:
    return TinyResNet(num_classes, in_ch, width)


def vgg(num_classes: int = 10, in_ch: int = 1) -> nn.Module:
    return TinyVGG(num_classes, in_ch)


def vit(num_classes: int = 10, in_ch: int = 1) -> nn.Module:
    return TinyViT(num_classes, in_ch)


def train_user_model(module: nn.Module, epochs: int = 6, seed: int = 0) -> nn.Module:
    """Train ``module`` on digits the way a user would elsewhere: inputs normalised outside the model with the
    dataset's mean/std (which the import is then told).  Returns the trained module, in eval mode."""
    from edgeguard.config import DataConfig
    from edgeguard.data import load_data
    from edgeguard.models import Normalize
    from edgeguard.training import TrainConfig, fit

    data = load_data(DataConfig(), "train")
    torch.manual_seed(seed)
    fit(nn.Sequential(Normalize(data.info.mean, data.info.std), module), data,
        TrainConfig(epochs=epochs, optimizer="adam", lr=3e-3, weight_decay=0.0, seed=seed), desc="user training", quiet=True)
    return module.eval()


DIGITS_MEAN, DIGITS_STD = (0.305555,), (0.323724,)
