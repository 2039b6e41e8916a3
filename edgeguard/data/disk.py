"""Datasets read from files you already have, in their standard on-disk formats.

Nothing here downloads: every entry takes ``root`` (``--data-root``) and reads what is there.

* ``cifar10`` / ``cifar100``: the CIFAR "python version" pickled batches.  ``root`` is the
  ``cifar-10-batches-py`` / ``cifar-100-python`` folder or its parent.  The pickles are read with a
  restricted unpickler that only rebuilds numpy arrays, so a file that smuggles in any other
  object is refused before anything in it runs.
* ``mnist`` / ``fashion_mnist``: the four IDX files (optionally ``.gz``) in ``root``, ``root/raw``
  or torchvision's ``root/MNIST/raw`` (``root/FashionMNIST/raw``).
* ``svhn``: the cropped-digits ``train_32x32.mat`` / ``test_32x32.mat`` (needs scipy).
* ``imagefolder``: ``root/train/<class>/*.png|jpg|...`` and ``root/test/<class>/...``.
* ``npz``: numpy archives with ``x``/``y`` arrays (one file or ``train.npz`` + ``test.npz``).

All images are held as uint8 NCHW tensors (``npz`` keeps float input as float32); ``ds[i]`` gives
float32 in [0, 1].  Every malformed input raises :class:`BadInput` naming the file.
"""

from __future__ import annotations

import codecs
import gzip
import importlib
import io
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgeguard.data.base import DATASETS, SPLITS, ImageDataset, int_option, make_dataset
from edgeguard.errors import BackendUnavailable, BadInput

# ----------------------------------------------------------------------------------------- helpers


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


# ------------------------------------------------------------------------------------------- CIFAR

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


# ------------------------------------------------------------------------------------------- MNIST

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


# -------------------------------------------------------------------------------------------- SVHN


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


# ------------------------------------------------------------------------------------- imagefolder

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


# --------------------------------------------------------------------------------------------- npz


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
