"""The CIFAR "python version" batches, read with a restricted unpickler that only rebuilds numpy arrays."""

from __future__ import annotations

import codecs
import importlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch

from edgeguard.data.base import DATASETS, ImageDataset, make_dataset
from edgeguard.data.disk.common import _read_bytes, _root
from edgeguard.errors import BadInput

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """What Python 3 protocol-2 pickles call to rebuild ``bytes``; only the latin-1 form they use."""
    try:
        latin1 = codecs.lookup(encoding).name == "iso8859-1"
    except (LookupError, TypeError):
        latin1 = False
    if not isinstance(obj, str) or not latin1:
        raise pickle.UnpicklingError("_codecs.encode is only allowed as str -> latin-1 bytes")
    return obj.encode("latin-1", errors)


# (module, name) pairs a CIFAR batch may reference: numpy array, dtype and scalar reconstruction, under
# numpy 1's and numpy 2's module names (the official files were written by numpy 1 under Python 2).
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _numpy_global(module: str, name: str):
    # prefer numpy 2's private package (importing numpy.core there warns), fall back to numpy 1's
    for mod in dict.fromkeys(
        (module.replace("numpy.core", "numpy._core"), module.replace("numpy._core", "numpy.core"))
    ):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {module}.{name}")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs; anything else is refused unloaded."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _CIFAR_GLOBALS:
            return _numpy_global(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise BadInput(
            f"{self.path} is not a CIFAR batch file: it contains a pickled object of type {module}.{name}"
        )

    def persistent_load(self, pid):
        raise BadInput(f"{self.path} is not a CIFAR batch file: it contains a persistent-id reference")


def _unpickle_cifar(path: Path) -> dict:
    if not path.is_file():
        raise BadInput(f"missing CIFAR file {path}")
    raw = _read_bytes(path)
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), path).load()
    except BadInput:
        raise
    except Exception as e:  # UnpicklingError, EOFError, ValueError, TypeError ... from a corrupt file
        raise BadInput(f"{path} is not a readable CIFAR batch file ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"{path} is not a CIFAR batch file: it holds a {type(obj).__name__}, not a dict")
    return obj


def _entry(d: dict, key: str, path: Path):
    """``d[key]`` whether the pickle has bytes keys (official files) or str keys."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    found = ", ".join(sorted(k.decode("latin-1") if isinstance(k, bytes) else str(k) for k in d))
    raise BadInput(f"{path} has no {key!r} entry (it has: {found or 'nothing'})")


def _names(value, path: Path, key: str) -> list[str]:
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in list(value)]
    except (TypeError, UnicodeDecodeError):
        raise BadInput(f"{path}: {key!r} must be a list of class names") from None


def _cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle_cifar(path)
    data = _entry(d, "data", path)
    labels = _entry(d, label_key, path)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or not (data.shape[1:] == (3072,) or data.shape[1:] == (3, 32, 32))
    ):
        shape = getattr(data, "shape", None)
        raise BadInput(
            f"{path}: 'data' must be a uint8 array of N x 3072 pixels, got {type(data).__name__} {shape or ''}".rstrip()
        )
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise BadInput(f"{path}: {label_key!r} must be a list of integer labels") from None
    if len(y) != len(data):
        raise BadInput(f"{path} holds {len(data)} images but {len(y)} {label_key!r}")
    return data.reshape(-1, 3, 32, 32), y


def _cifar_dir(name: str, root: Path, folder: str, marker: str) -> Path:
    for d in (root, root / folder):
        if (d / marker).is_file():
            return d
    raise BadInput(
        f"{name}: no {marker} in {root} or {root / folder}; point --data-root at the {folder} folder "
        f"of the CIFAR 'python version' (or its parent)"
    )


def _cifar(
    name: str,
    split: str,
    root: Path,
    folder: str,
    files: list[str],
    meta: str,
    label_key: str,
    names_key: str,
    mean,
    std,
) -> ImageDataset:
    d = _cifar_dir(name, root, folder, files[0])
    meta_path = d / meta
    if not meta_path.is_file():
        raise BadInput(f"{name}: missing {meta_path} (the class-name file that comes with the batches)")
    classes = _names(_entry(_unpickle_cifar(meta_path), names_key, meta_path), meta_path, names_key)
    xs, ys = [], []
    for f in files:
        x, y = _cifar_arrays(d / f, label_key)
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise BadInput(
                f"{d / f}: {label_key!r} must lie in 0..{len(classes) - 1}, found {int(y.min())}..{int(y.max())}"
            )
        xs.append(x)
        ys.append(y)
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)))
    labels = torch.from_numpy(np.concatenate(ys))
    return make_dataset(name, split, images, labels, classes, mean=mean, std=std)


@DATASETS.register("cifar10", family="disk", needs_root=True)
def cifar10(split: str, *, root: str | None = None) -> ImageDataset:
    """CIFAR-10, python version: ``data_batch_1..5`` (train, 50,000), ``test_batch`` (10,000), 3x32x32.

    ``root`` is the ``cifar-10-batches-py`` folder or its parent; class names come from ``batches.meta``.
    """
    path = _root("cifar10", root)
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _cifar(
        "cifar10", split, path, "cifar-10-batches-py", files, "batches.meta", "labels", "label_names",
        CIFAR10_MEAN, CIFAR10_STD,
    )  # fmt: skip


@DATASETS.register("cifar100", family="disk", needs_root=True)
def cifar100(split: str, *, root: str | None = None, label_mode: str = "fine") -> ImageDataset:
    """CIFAR-100, python version: ``train`` (50,000) and ``test`` (10,000), 3x32x32.

    ``label_mode="fine"`` (100 classes, default) or ``"coarse"`` (the 20 superclasses); names from ``meta``.
    ``root`` is the ``cifar-100-python`` folder or its parent.
    """
    if label_mode not in ("fine", "coarse"):
        raise BadInput(f"cifar100 label_mode must be 'fine' or 'coarse' (got {label_mode!r})")
    path = _root("cifar100", root)
    return _cifar(
        "cifar100", split, path, "cifar-100-python", [split], "meta", f"{label_mode}_labels",
        f"{label_mode}_label_names", CIFAR100_MEAN, CIFAR100_STD,
    )  # fmt: skip
