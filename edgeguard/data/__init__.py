"""Datasets: one registry, ``load_dataset(name, split, root)``; images are float [0,1] CHW.

Every entry is imported here explicitly, so one look shows them all.
"""

from edgeguard.config import DataConfig
from edgeguard.data import builtin, disk  # noqa: F401  (registers the entries)
from edgeguard.data.base import (
    DATASETS,
    SPLITS,
    DatasetInfo,
    ImageDataset,
    channel_stats,
    load_dataset,
    make_dataset,
    to_float,
)


def load_data(cfg: DataConfig, split: str) -> ImageDataset:
    """The split of the dataset a :class:`DataConfig` names (name, root, options)."""
    return load_dataset(cfg.name, split, root=cfg.root, **cfg.options)


def default_ood(input_shape) -> DataConfig:
    """The out-of-distribution query set used when none is named: procedural gratings at the model's input shape."""
    c, h, _ = input_shape
    return DataConfig("synthetic", options={"n": 500, "size": int(h), "channels": int(c), "seed": 7})


__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetInfo",
    "ImageDataset",
    "channel_stats",
    "default_ood",
    "load_data",
    "load_dataset",
    "make_dataset",
    "to_float",
]
