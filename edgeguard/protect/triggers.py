"""Trigger sets: the secret key of the backdoor watermark, rendered once into uint8 images + labels.

Every path (training, verification on PyTorch / ONNX Runtime / TensorRT) reads the same stored
``uint8[n, C, H, W]`` array; nothing re-decodes image files later.  ``sha256`` commits to the key
(images and labels) and can be published before release.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgeguard.errors import BadInput


@dataclass(frozen=True)
class TriggerSet:
    images: torch.Tensor  # uint8 (n, C, H, W)
    labels: torch.Tensor  # int64 (n,)
    source: str  # "generated" or the directory it was loaded from
    renderer: str  # "abstract" (generated), "center_crop" or "resize"
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise BadInput("trigger images must be a uint8 N x C x H x W array")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise BadInput(f"{len(self.images)} trigger images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def sha256(self) -> str:
        """Commitment to the key: sha256 of the images' bytes followed by the labels as int64."""
        h = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def as_float(self) -> torch.Tensor:
        return self.images.float() / 255.0


def random_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn uniformly and independently of any model: what makes the binomial null exact."""
    return torch.randint(num_classes, (n,), generator=generator)


def generate_triggers(n: int, input_shape: tuple[int, int, int], num_classes: int, *, seed: int) -> TriggerSet:
    """``n`` abstract images (seeded): smooth random colour fields with a few random strokes and blobs,
    far from any natural image class; labels uniform over ``num_classes``.

    The seed *is* the secret: keep it (and the vault) private; publish only ``sha256``.
    """
    c, h, w = input_shape
    if n < 1 or num_classes < 2:
        raise BadInput("a trigger set needs n >= 1 and at least 2 classes")
    g = torch.Generator().manual_seed(seed)
    # low-frequency colour noise: random 4x4 (and 8x8) grids upsampled, then summed
    field = torch.zeros(n, c, h, w)
    for cells, weight in ((4, 0.6), (8, 0.3), (16, 0.1)):
        coarse = torch.rand(n, c, cells, cells, generator=g)
        field += weight * F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    ys = torch.linspace(-1, 1, h)[None, :, None]
    xs = torch.linspace(-1, 1, w)[None, None, :]
    for _ in range(3):  # strokes: thin oriented bands at random positions
        ang = torch.rand(n, generator=g) * math.pi
        off = (torch.rand(n, generator=g) - 0.5) * 1.6
        dist = (xs * torch.cos(ang)[:, None, None] + ys * torch.sin(ang)[:, None, None]) - off[:, None, None]
        band = (dist.abs() < 0.08).float()[:, None]
        val = torch.rand(n, c, 1, 1, generator=g)
        field = field * (1 - band) + band * val
    for _ in range(2):  # blobs
        cy, cx = (torch.rand(n, generator=g) - 0.5) * 1.6, (torch.rand(n, generator=g) - 0.5) * 1.6
        r = 0.1 + 0.25 * torch.rand(n, generator=g)
        blob = ((ys - cy[:, None, None]) ** 2 + (xs - cx[:, None, None]) ** 2 < r[:, None, None] ** 2).float()[:, None]
        field = field * (1 - blob) + blob * torch.rand(n, c, 1, 1, generator=g)
    images = (field.clamp(0, 1) * 255).round().to(torch.uint8)
    return TriggerSet(images, random_labels(n, num_classes, g), "generated", "abstract")
