"""MNIST and Fashion-MNIST from their IDX files (optionally gzipped)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeguard.data.base import DATASETS, ImageDataset, int_option, make_dataset
from edgeguard.data.disk.common import _read_bytes, _resize_uint8, _root
from edgeguard.errors import BadInput

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def read_idx(path: Path, magic: int) -> np.ndarray:
    """One IDX file (gzipped or not, told by its content) as a uint8 array of the shape its header gives."""
    raw = _read_bytes(path)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise BadInput(f"{path} is a damaged or truncated gzip file ({e})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        got = f"0x{int.from_bytes(raw[:4], 'big'):08x}" if len(raw) >= 4 else "nothing"
        raise BadInput(
            f"{path} is not an IDX file of {ndim}-d unsigned bytes: magic number 0x{magic:08x} expected, got {got}"
        )
    if len(raw) < header:
        raise BadInput(f"{path} is truncated: it ends inside the IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    body = len(raw) - header
    if body < expected:
        shape = " x ".join(map(str, dims))
        raise BadInput(
            f"{path} is truncated: its header declares {shape} = {expected} bytes but only {body} follow"
        )
    if body > expected:
        raise BadInput(
            f"{path} is not a valid IDX file: {body - expected} bytes follow the declared {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(d: Path, base: str) -> Path | None:
    # official names, and the 'train-images.idx3-ubyte' spelling some unpackers produce
    dotted = base.replace("-idx", ".idx")
    for n in (base, base + ".gz", dotted, dotted + ".gz"):
        if (d / n).is_file():
            return d / n
    return None


def _mnist(name: str, split: str, root: str | None, size: int, torchvision_dir: str, classes) -> ImageDataset:
    path = _root(name, root)
    size = int_option(name, "size", size, 4)
    prefix = "train" if split == "train" else "t10k"
    img_base, lbl_base = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    dirs = [path, path / "raw", path / torchvision_dir / "raw"]
    found = next(((d, p) for d in dirs if (p := _find_idx(d, img_base)) is not None), None)
    if found is None:
        raise BadInput(
            f"{name}: no {img_base} (or {img_base}.gz) in {path}, {path / 'raw'} or {path / torchvision_dir / 'raw'}"
        )
    d, img_path = found
    lbl_path = _find_idx(d, lbl_base)
    if lbl_path is None:
        raise BadInput(f"{name}: missing {d / lbl_base} (or {lbl_base}.gz) next to {img_path.name}")
    x = read_idx(img_path, IDX_IMAGES_MAGIC)
    y = read_idx(lbl_path, IDX_LABELS_MAGIC).astype(np.int64)
    if len(x) != len(y):
        raise BadInput(f"{img_path} holds {len(x)} images but {lbl_path} holds {len(y)} labels")
    if len(y) and y.max() >= len(classes):
        raise BadInput(f"{lbl_path}: labels must lie in 0..{len(classes) - 1}, found {int(y.max())}")
    images = torch.from_numpy(x.copy()).unsqueeze(1)  # (N,1,H,W) uint8
    h, w = images.shape[2:]
    if h == w == size:
        pass
    elif h == w and size == h + 4:  # LeNet's 28 -> 32: two zero pixels on every side
        images = F.pad(images, (2, 2, 2, 2))
    else:
        images = _resize_uint8(images, size)
    return make_dataset(name, split, images.contiguous(), torch.from_numpy(y), classes)


@DATASETS.register("mnist", family="disk", needs_root=True)
def mnist(split: str, *, root: str | None = None, size: int = 32) -> ImageDataset:
    """MNIST from its four IDX files (``train-images-idx3-ubyte`` ..., optionally ``.gz``), 1 channel.

    ``root`` holds the files directly, in ``raw/``, or torchvision-style in ``MNIST/raw``.  ``size=32``
    (default) zero-pads the 28x28 digits by 2 pixels each side as LeNet does, ``size=28`` keeps them,
    any other size resizes bilinearly.  60,000 train / 10,000 test images.
    """
    return _mnist("mnist", split, root, size, "MNIST", [str(i) for i in range(10)])


@DATASETS.register("fashion_mnist", family="disk", needs_root=True)
def fashion_mnist(split: str, *, root: str | None = None, size: int = 32) -> ImageDataset:
    """Fashion-MNIST: same IDX files and options as ``mnist`` (torchvision folder ``FashionMNIST/raw``)."""
    return _mnist("fashion_mnist", split, root, size, "FashionMNIST", FASHION_MNIST_CLASSES)
