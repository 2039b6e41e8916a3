"""Load a trigger set stored as image files plus a labels text file (the WatermarkNN layout).

Layout (adiyoss/WatermarkNN, ``data/trigger_set``)::

    trigger_set/
        labels-cifar.txt      one label per line, floats such as ``6.000000000000000000e+00``
        pics/1.jpg ... 100.jpg

**Pairing.** The files are taken in *lexicographic* order of their names (``sorted(names)``:
``1.jpg, 10.jpg, 100.jpg, 11.jpg, ...``), exactly as the reference loader scans the folder, and
non-empty label line ``i`` (0-based) belongs to the ``i``-th file in that order.  It does *not*
belong to ``{i+1}.jpg``; pairing that way gives a different key on which a real watermark looks
absent.

**Files.** Every regular, non-hidden file directly inside the directory is part of the set
(no recursion); only the labels file itself is skipped when it lies inside the directory.  A file
Pillow cannot decode is an error, not silently skipped.  Files are decoded by *content*, not by
extension (two of the reference ``.jpg`` files are really PNG with an alpha channel).  Every image
is converted with ``Image.convert("RGB")`` like torchvision's ``pil_loader`` in the reference code:
the alpha channel is dropped (not composited), palette images are expanded.  For a one-channel
``input_shape`` the RGB image is then converted to ``"L"`` (ITU-R 601-2 luma, as torchvision's
``Grayscale``).  EXIF orientation is ignored, as in the reference.

**Renderers** (how a large photo becomes an ``H x W`` trigger):

``center_crop`` (default; alias ``adi``)
    The reference WatermarkNN preprocessing: centre crop ``H x W`` at full resolution, no resize,
    with torchvision's ``CenterCrop`` offsets (``int(round((size - crop) / 2))``).  An image smaller
    than the crop is zero-padded, centred, as torchvision does.
``resize`` (alias ``wrt``)
    The Watermark-Robustness-Toolbox preprocessing: resize so the shorter side is
    ``2 * max(H, W)`` (bicubic, longer side ``int(S * long / short)`` as torchvision's ``Resize``),
    then centre crop ``H x W`` as above.  For 32 x 32 that is shorter side 64, then crop 32.

The two renderers give different pixels, hence different keys; the renderer is recorded in the
returned :class:`~edgeguard.protect.triggers.TriggerSet`.  Rendering happens once, here; every
later path reads the stored ``uint8`` array.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from edgeguard.errors import BadInput
from edgeguard.protect.triggers import TriggerSet

RENDERERS = ("center_crop", "resize")
_ALIASES = {"adi": "center_crop", "wrt": "resize"}


def load_trigger_dir(
    directory,
    labels_file,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    renderer: str = "center_crop",
) -> TriggerSet:
    """Load the images in ``directory`` and the labels in ``labels_file`` into a :class:`TriggerSet`.

    ``labels_file`` may be ``None``: then exactly one ``labels*.txt`` must lie in the directory's
    parent or inside the directory.  ``input_shape`` is ``(C, H, W)`` with ``C`` 1 or 3; labels must
    be integer values in ``[0, num_classes)``.  Raises :class:`BadInput` for any bad input.
    See the module docstring for the pairing rule and the renderers.
    """
    renderer_name = _ALIASES.get(renderer, renderer)
    if renderer_name not in RENDERERS:
        raise BadInput(f"unknown trigger renderer {renderer!r}; choose one of {', '.join(RENDERERS)}")
    channels, height, width = _check_shape(input_shape)
    if int(num_classes) < 2:
        raise BadInput(f"a trigger set needs at least 2 classes, got num_classes={num_classes}")

    root = Path(directory)
    if not root.exists():
        raise BadInput(f"trigger directory {root} does not exist")
    if not root.is_dir():
        raise BadInput(f"trigger directory {root} is not a directory")

    labels_path = _find_labels(root) if labels_file is None else Path(labels_file)
    if not labels_path.exists():
        raise BadInput(f"labels file {labels_path} does not exist")
    if not labels_path.is_file():
        raise BadInput(f"labels file {labels_path} is not a regular file")
    skip = labels_path.resolve()

    names = sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_file() and p.resolve() != skip
    )
    if not names:
        raise BadInput(f"trigger directory {root} contains no image files")

    labels = _read_labels(labels_path, num_classes)
    if len(labels) != len(names):
        raise BadInput(
            f"labels file {labels_path} has {len(labels)} labels but {root} has {len(names)} images"
        )

    images = np.empty((len(names), channels, height, width), dtype=np.uint8)
    for i, name in enumerate(names):
        img = _decode(root / name, "L" if channels == 1 else "RGB")
        if renderer_name == "resize":
            img = _resize_shorter(img, 2 * max(height, width))
        arr = _center_crop(np.asarray(img, dtype=np.uint8), height, width)
        images[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    return TriggerSet(
        images=torch.from_numpy(images),
        labels=torch.tensor(labels, dtype=torch.int64),
        source=str(directory),
        renderer=renderer_name,
        files=tuple(names),
    )


def _check_shape(input_shape) -> tuple[int, int, int]:
    try:
        channels, height, width = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise BadInput(f"input shape must be (C, H, W), got {input_shape!r}") from None
    if channels not in (1, 3) or height < 1 or width < 1:
        raise BadInput(
            f"trigger images need an input shape (C, H, W) with C 1 or 3, got {tuple(input_shape)}"
        )
    return channels, height, width


def _find_labels(root: Path) -> Path:
    found: dict[Path, Path] = {}
    for folder in (root.parent, root):
        for p in sorted(folder.glob("labels*.txt")):
            if p.is_file():
                found.setdefault(p.resolve(), p)
    if not found:
        raise BadInput(
            f"no labels*.txt file found next to or inside {root}; pass the labels file with --labels"
        )
    if len(found) > 1:
        listed = ", ".join(str(p) for p in found.values())
        raise BadInput(f"several labels files found for {root} ({listed}); pass the right one with --labels")
    return next(iter(found.values()))


def _read_labels(path: Path, num_classes: int) -> list[int]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"labels file {path} cannot be read as text ({e})") from None
    labels = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        try:
            value = float(s)
        except ValueError:
            raise BadInput(f"labels file {path}, line {lineno}: {s!r} is not a number") from None
        if not math.isfinite(value) or value != int(value) or not 0 <= int(value) < num_classes:
            raise BadInput(
                f"labels file {path}, line {lineno}: {s!r} is not a class id in 0..{num_classes - 1}"
            )
        labels.append(int(value))
    return labels


def _decode(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")  # alpha dropped, as the reference's pil_loader does
    except UnidentifiedImageError:
        raise BadInput(f"trigger file {path} is not an image Pillow can decode") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"trigger file {path} cannot be decoded as an image ({e})") from None
    return rgb if mode == "RGB" else rgb.convert(mode)


def _resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: shorter side to ``size``, bicubic."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), getattr(Image, "Resampling", Image).BICUBIC)


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision ``CenterCrop``: zero-pad (centred) if smaller, then crop at round((size - crop) / 2)."""
    ih, iw = arr.shape[:2]
    if height > ih or width > iw:
        pad_h = max(height - ih, 0)
        pad_w = max(width - iw, 0)
        pads = [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)] + [(0, 0)] * (arr.ndim - 2)
        arr = np.pad(arr, pads, mode="constant", constant_values=0)
        ih, iw = arr.shape[:2]
    top = int(round((ih - height) / 2.0))
    left = int(round((iw - width) / 2.0))
    return arr[top : top + height, left : left + width]
