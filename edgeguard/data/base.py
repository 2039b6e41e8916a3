"""The dataset type every loader returns, and the dataset registry.

Images are held in memory as uint8 (0-255) or float32 (0-1) tensors, NCHW; ``ds[i]`` returns a
float32 CHW image in [0, 1] and an int label, and ``ds.tensors()`` gives whole batches at once.
Normalisation is *not* applied here: it is the first layer of every model (see edgeguard.models).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from edgeguard.errors import BadInput
from edgeguard.registry import Registry

DATASETS = Registry("dataset")
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    input_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }


class ImageDataset(Dataset):
    """In-memory labelled images; ``images`` is (N, C, H, W) uint8 or float32 in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, split: str):
        if images.ndim != 4:
            raise BadInput(f"{info.name}: images must be N x C x H x W, got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise BadInput(f"{info.name}: images must be uint8 or float32, got {images.dtype}")
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) != len(images):
            raise BadInput(f"{info.name}: {len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
            raise BadInput(
                f"{info.name}: labels must lie in 0..{info.num_classes - 1}, found {int(labels.min())}..{int(labels.max())}"
            )
        if tuple(images.shape[1:]) != tuple(info.input_shape):
            raise BadInput(f"{info.name}: image shape {tuple(images.shape[1:])} != declared {info.input_shape}")
        self.images = images
        self.labels = labels
        self.info = info
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_float(self.images[i]), int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def tensors(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A contiguous slice as (float32 images in [0,1], int64 labels)."""
        return to_float(self.images[start:stop]), self.labels[start:stop]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[idx], self.labels[idx], self.info, self.split)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate (x, y) batches; with ``shuffle`` the order comes from ``generator``."""
        for idx in batch_indices(len(self), batch_size, shuffle=shuffle, generator=generator):
            yield to_float(self.images[idx]), self.labels[idx]


def batch_indices(
    n: int, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Index tensors of consecutive batches over ``n`` items, in a seeded random order if ``shuffle``."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for s in range(0, n, batch_size):
        yield order[s : s + batch_size]


def to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images in [0,1] (computed in chunks, so uint8 sets stay cheap)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for s in range(0, len(images), 4096):
        x = to_float(images[s : s + 4096]).double()
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    if count == 0:
        return (0.5,) * c, (0.25,) * c
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 6) for v in mean), tuple(round(max(float(v), 1e-3), 6) for v in std)


def int_option(name: str, option: str, value, minimum: int) -> int:
    """An integer option (an int, or its digits as a string from the command line) of at least ``minimum``."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise BadInput(f"{name} {option} must be an integer of at least {minimum} (got {value!r})")
    return int(value)


def make_dataset(
    name: str,
    split: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ImageDataset:
    """Wrap loaded arrays; mean/std default to the statistics of these images."""
    if mean is None or std is None:
        mean, std = channel_stats(images)
    info = DatasetInfo(name, tuple(str(c) for c in classes), tuple(images.shape[1:]), tuple(mean), tuple(std))
    return ImageDataset(images, labels, info, split)


def load_dataset(name: str, split: str = "train", root: str | None = None, **options) -> ImageDataset:
    """Load a registered dataset.  ``root`` is the on-disk location for the standard formats."""
    if split not in SPLITS:
        raise BadInput(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    entry = DATASETS.entry(name)
    if entry.meta.get("needs_root") and root is None:
        raise BadInput(f"dataset {name!r} reads files you already have: give their location with --data-root")
    reserved = sorted({"root", "split"} & set(options))
    if reserved:
        raise BadInput(f"dataset option {reserved[0]!r} is not an option: use --data-root / --split")
    try:
        return entry.fn(split, root=root, **options)
    except (TypeError, ValueError) as e:  # a bad option value or name; loaders raise BadInput for bad files
        msg = str(e).split(")", 1)[-1].strip() if "unexpected keyword" in str(e) else str(e)
        raise BadInput(f"dataset {name!r}: bad option ({msg})") from None
