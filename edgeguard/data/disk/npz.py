"""numpy archives with ``x``/``y`` arrays: one file, or ``train.npz`` + ``test.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeguard.data.base import DATASETS, SPLITS, ImageDataset, int_option, make_dataset
from edgeguard.data.disk.common import _root
from edgeguard.errors import BadInput


def _open_npz(path: Path):
    if not path.is_file():
        raise BadInput(f"npz: missing {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # pickled payload, not a zip, damaged archive, ...
        raise BadInput(f"{path} is not a readable .npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise BadInput(f"{path} is a single .npy array, not an .npz archive with 'x' and 'y'")
    return z


def _npz_array(z, key: str, path: Path) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise BadInput(
                f"{path}: {key!r} is an array of pickled Python objects; only numeric arrays are read"
            ) from None
        raise BadInput(f"{path}: cannot read {key!r} ({e})") from None
    except Exception as e:  # damaged member
        raise BadInput(f"{path}: cannot read {key!r} ({type(e).__name__}: {e})") from None


def _npz_keys(z, split: str, path: Path) -> tuple[str, str]:
    keys = set(z.files)
    if {f"x_{split}", f"y_{split}"} <= keys:
        return f"x_{split}", f"y_{split}"
    if {"x", "y"} <= keys:
        return "x", "y"
    raise BadInput(
        f"{path} has neither 'x'/'y' nor 'x_{split}'/'y_{split}' arrays (it has: {', '.join(sorted(keys)) or 'nothing'})"
    )


def _npz_labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    if y.dtype.kind in "iu":
        out = y.astype(np.int64)
    elif y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        out = y.astype(np.int64)
    else:
        raise BadInput(f"{path}: {key!r} must hold integer class labels, got {y.dtype}")
    if out.ndim > 1 and out.size == out.shape[0]:
        out = out.reshape(-1)
    if out.ndim != 1:
        raise BadInput(f"{path}: {key!r} must be a 1-d array of labels, got shape {y.shape}")
    if len(out) and out.min() < 0:
        raise BadInput(f"{path}: {key!r} holds a negative label ({int(out.min())})")
    return out


def _npz_images(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]  # N x H x W
    elif x.ndim == 4:
        if x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    else:
        raise BadInput(
            f"{path}: {key!r} must be N x H x W, N x C x H x W or N x H x W x C, got shape {x.shape}"
        )
    if x.shape[1] not in (1, 3):
        raise BadInput(f"{path}: {key!r} must have 1 or 3 channels (NCHW or NHWC), got shape {x.shape}")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype.kind == "f":
        if x.size and not np.all(np.isfinite(x)):
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise BadInput(f"{path}: {key!r} holds {bad} NaN or infinite pixel value{'s' if bad > 1 else ''}")
        if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):
            raise BadInput(
                f"{path}: float images in {key!r} must lie in [0, 1], found {float(np.nanmin(x)):g}..{float(np.nanmax(x)):g}"
            )
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise BadInput(
                f"{path}: integer images in {key!r} must lie in 0..255, found {x.min()}..{x.max()}"
            )
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8))
    raise BadInput(f"{path}: {key!r} must hold uint8 (0-255) or float (0-1) pixels, got {x.dtype}")


def _npz_classes(z, path: Path) -> list[str] | None:
    if "classes" not in z.files:
        return None
    c = _npz_array(z, "classes", path)
    if c.dtype.kind not in "US" or c.ndim != 1:
        raise BadInput(f"{path}: 'classes' must be a 1-d array of strings, got {c.dtype} {c.shape}")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in c.tolist()]


def _max_label(path: Path, key: str) -> int:
    with _open_npz(path) as z:
        if key not in z.files:
            return -1
        y = _npz_labels(_npz_array(z, key, path), path, key)
    return int(y.max()) if len(y) else -1


def _other_labels_max(root: Path, file: Path, split: str, used_key: str) -> int:
    """Largest label in the splits not being loaded, so train and test agree on the class count."""
    if root.is_dir():
        return max(
            [
                _max_label(root / f"{s}.npz", "y")
                for s in SPLITS
                if s != split and (root / f"{s}.npz").is_file()
            ]
            + [-1]
        )
    return max([_max_label(file, k) for k in ("y_train", "y_test", "y") if k != used_key] + [-1])


@DATASETS.register("npz", family="disk", needs_root=True)
def npz(split: str, *, root: str | None = None, num_classes: int | None = None) -> ImageDataset:
    """Images and labels from numpy ``.npz`` archives (read with ``allow_pickle=False``).

    ``root`` is one ``.npz`` file, with ``x_train``/``y_train``/``x_test``/``y_test`` (split by key)
    or ``x``/``y`` (used for whichever split is asked), or a folder with ``train.npz`` and
    ``test.npz`` each holding ``x``/``y``.  ``x`` is uint8 (0-255) or float (0-1), laid out
    N x C x H x W, N x H x W x C (told by a last dimension of 1 or 3) or N x H x W.  Class names
    come from an optional ``classes`` string array, else they are ``"0"``..``"K-1"`` with K from
    ``num_classes`` or one more than the largest label found in any split.
    """
    path = _root("npz", root)
    num_classes = None if num_classes is None else int_option("npz", "num_classes", num_classes, 1)
    file = path / f"{split}.npz" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        raise BadInput(f"npz: missing {file} (expected train.npz and test.npz with 'x' and 'y' in {path})")
    with _open_npz(file) as z:
        xk, yk = _npz_keys(z, split, file)
        x = _npz_array(z, xk, file)
        y = _npz_labels(_npz_array(z, yk, file), file, yk)
        classes = _npz_classes(z, file)
    images = _npz_images(x, file, xk)
    if len(images) != len(y):
        raise BadInput(f"{file} holds {len(images)} images in {xk!r} but {len(y)} labels in {yk!r}")
    if classes is not None:
        if num_classes is not None and num_classes != len(classes):
            raise BadInput(f"npz num_classes={num_classes} but {file} names {len(classes)} classes")
    else:
        if num_classes is None:
            num_classes = max(int(y.max()) if len(y) else -1, _other_labels_max(path, file, split, yk)) + 1
            if num_classes < 1:
                raise BadInput(
                    f"{file} holds no labels, so the number of classes is unknown: give num_classes"
                )
        classes = [str(i) for i in range(num_classes)]
    if len(y) and y.max() >= len(classes):
        raise BadInput(f"{file}: {yk!r} must lie in 0..{len(classes) - 1}, found {int(y.max())}")
    return make_dataset("npz", split, images, torch.from_numpy(y), classes)
