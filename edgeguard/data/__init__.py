"""Datasets: one registry, ``load_dataset(name, split, root)``; images are float [0,1] CHW.

Every entry is imported here explicitly, so one look shows them all.
"""

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

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetInfo",
    "ImageDataset",
    "channel_stats",
    "load_dataset",
    "make_dataset",
    "to_float",
]
