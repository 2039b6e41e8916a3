"""``root/<split>/<class>/*.png|jpg|...`` image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeguard.data.base import DATASETS, ImageDataset, int_option, make_dataset
from edgeguard.data.disk.common import _root
from edgeguard.errors import BadInput

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
RESIZE_MODES = ("resize", "center_crop")


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(
        (p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    )


def _decode(path: Path, size: int, channels: int, resize: str) -> np.ndarray:
    """One image file (decoded by content) as a uint8 C x size x size array."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = im.convert("L" if channels == 1 else "RGB")
    except Exception as e:  # UnidentifiedImageError, truncated data, decompression bombs, ...
        raise BadInput(f"{path} is not an image Pillow can decode ({type(e).__name__}: {e})") from None
    if resize == "resize":
        w, h = im.size
        if (w, h) != (size, size):
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return _center_crop(a, size).transpose(2, 0, 1)


def _center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """Crop H x W x C to size x size about the centre, zero-padding a side that is shorter."""
    out = np.zeros((size, size, a.shape[2]), dtype=np.uint8)
    src, dst = [], []
    for n in a.shape[:2]:
        if n >= size:
            start = int(round((n - size) / 2.0))
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            pad = (size - n) // 2
            src.append(slice(0, n))
            dst.append(slice(pad, pad + n))
    out[dst[0], dst[1]] = a[src[0], src[1]]
    return out


@DATASETS.register("imagefolder", family="disk", needs_root=True)
def imagefolder(
    split: str, *, root: str | None = None, size: int = 32, channels: int = 3, resize: str = "resize"
) -> ImageDataset:
    """Image files in ``root/train/<class>/`` and ``root/test/<class>/`` (png, jpg, jpeg, bmp, gif, webp).

    Class names are the sorted folder names under ``root/train``; the test split uses the same list
    (a test class folder may be missing, but not unknown).  Files are decoded by content, whatever
    their extension, converted to RGB (``channels=1``: greyscale) and brought to ``size`` x ``size``:

    * ``resize="resize"`` (default): scale the shorter side to ``size`` (bilinear), then centre-crop;
    * ``resize="center_crop"``: cut ``size`` x ``size`` from the centre at full resolution, padding
      with zeros where the image is smaller.
    """
    path = _root("imagefolder", root)
    size = int_option("imagefolder", "size", size, 4)
    channels = int_option("imagefolder", "channels", channels, 1)
    if channels not in (1, 3):
        raise BadInput(f"imagefolder channels must be 1 or 3 (got {channels!r})")
    if resize not in RESIZE_MODES:
        raise BadInput(f"imagefolder resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise BadInput(f"imagefolder: missing {train_dir} (expected {path}/train/<class>/<image files>)")
    classes = [p.name for p in _class_dirs(train_dir)]
    if not classes:
        raise BadInput(
            f"imagefolder: {train_dir} has no class folders (expected {train_dir}/<class>/<image files>)"
        )
    split_dir = path / split
    if not split_dir.is_dir():
        raise BadInput(f"imagefolder: missing {split_dir} (expected {split_dir}/<class>/<image files>)")
    index = {c: i for i, c in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in index:
            raise BadInput(f"imagefolder: {class_dir} is a class that {train_dir} does not have")
        found = _image_files(class_dir)
        if not found and split == "train":
            raise BadInput(f"imagefolder: class folder {class_dir} holds no image files")
        files += [(f, index[class_dir.name]) for f in found]
    if not files:
        raise BadInput(f"imagefolder: {split_dir} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    images = np.empty((len(files), channels, size, size), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        images[i] = _decode(f, size, channels, resize)
    labels = torch.tensor([c for _, c in files], dtype=torch.long)
    return make_dataset("imagefolder", split, torch.from_numpy(images), labels, classes)
