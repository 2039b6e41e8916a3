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

from edgeguard.data.disk.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar10,
    cifar100,
)
from edgeguard.data.disk.imagefolder import IMAGE_EXTENSIONS, RESIZE_MODES, imagefolder
from edgeguard.data.disk.mnist import FASHION_MNIST_CLASSES, fashion_mnist, mnist, read_idx
from edgeguard.data.disk.npz import npz
from edgeguard.data.disk.svhn import svhn

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS",
    "RESIZE_MODES", "cifar10", "cifar100", "fashion_mnist", "imagefolder", "mnist", "npz", "read_idx", "svhn",
]
