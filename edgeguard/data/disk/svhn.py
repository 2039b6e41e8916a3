"""SVHN cropped digits from ``train_32x32.mat`` / ``test_32x32.mat`` (needs scipy)."""

from __future__ import annotations

import numpy as np
import torch

from edgeguard.data.base import DATASETS, ImageDataset, make_dataset
from edgeguard.data.disk.common import _root
from edgeguard.errors import BackendUnavailable, BadInput


@DATASETS.register("svhn", family="disk", needs_root=True)
def svhn(split: str, *, root: str | None = None) -> ImageDataset:
    """SVHN cropped digits from ``train_32x32.mat`` / ``test_32x32.mat`` in ``root`` (needs scipy).

    Label 10 in the files means the digit 0 and is mapped to 0.  73,257 train / 26,032 test, 3x32x32.
    """
    path = _root("svhn", root)
    mat = path / f"{split}_32x32.mat"
    if not mat.is_file():
        raise BadInput(f"svhn: missing {mat} (the cropped-digits 'Format 2' file)")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise BackendUnavailable(
            "reading SVHN .mat files needs scipy: pip install 'edgeguard[svhn]'"
        ) from None
    try:
        d = loadmat(str(mat), variable_names=("X", "y"))
    except Exception as e:  # MatReadError, ValueError, OSError, ... from a corrupt or foreign file
        raise BadInput(f"{mat} is not a readable MATLAB file ({type(e).__name__}: {e})") from None
    if "X" not in d or "y" not in d:
        raise BadInput(f"{mat} has no 'X' and 'y' variables, so it is not an SVHN cropped-digits file")
    x, y = d["X"], d["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise BadInput(f"{mat}: 'X' must be uint8 H x W x 3 x N, got {x.dtype} {x.shape}")
    try:
        y = np.asarray(y).astype(np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise BadInput(f"{mat}: 'y' must hold integer labels") from None
    if len(y) != x.shape[3]:
        raise BadInput(f"{mat} holds {x.shape[3]} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise BadInput(
            f"{mat}: labels must lie in 1..10 (10 is the digit 0), found {int(y.min())}..{int(y.max())}"
        )
    y[y == 10] = 0
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return make_dataset("svhn", split, images, torch.from_numpy(y), [str(i) for i in range(10)])
