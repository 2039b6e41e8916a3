"""Helpers shared by the on-disk format readers: the dataset root, raw bytes, uint8 resizing."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from edgeguard.errors import BadInput


def _root(name: str, root: str | Path | None) -> Path:
    """``root`` as a Path that exists, or BadInput."""
    if root is None:
        raise BadInput(f"dataset {name!r} reads files you already have: give their location with --data-root")
    path = Path(root).expanduser()
    if not path.exists():
        raise BadInput(f"{name}: data root {path} does not exist")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a uint8 NCHW batch to size x size (antialiased when shrinking), in chunks."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    shrink = size < max(images.shape[2], images.shape[3])
    for s in range(0, len(images), 4096):
        x = images[s : s + 4096].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[s : s + 4096] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out
