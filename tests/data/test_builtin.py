"""Built-in datasets: digits (real, fixed split) and synthetic (seeded, learnable)."""

from __future__ import annotations

import pytest
import torch

from edgeguard.data import load_dataset
from edgeguard.errors import BadInput


def test_digits_fixed_split_and_range():
    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(tr), len(te)) == (1257, 540)
    assert tr.info.input_shape == (1, 32, 32) and tr.num_classes == 10
    x, y = te.tensors()
    assert x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.bincount(y, minlength=10).min() >= 50  # stratified
    # the split is fixed: a second load gives the same images in the same order
    assert torch.equal(load_dataset("digits", "test").tensors()[0], x)
    img, label = te[0]
    assert img.shape == (1, 32, 32) and isinstance(label, int)
    assert load_dataset("digits", "test", size=8).info.input_shape == (1, 8, 8)


def test_digits_pad_centres_the_digit_like_mnist():
    x = load_dataset("digits", "test", size=28, pad=5).tensors()[0]
    assert x.shape == (540, 1, 28, 28)
    border = torch.ones(28, 28, dtype=torch.bool)
    border[5:23, 5:23] = False
    assert float(x[:, 0, border].abs().max()) == 0.0  # a black frame of 5 pixels
    inner = torch.nn.functional.interpolate(load_dataset("digits", "test", size=8).tensors()[0], size=(18, 18),
                                            mode="bilinear", align_corners=False).clamp(0, 1)
    assert torch.equal(x[:, :, 5:23, 5:23], inner)  # the digit itself, resized to 18x18
    with pytest.raises(BadInput, match="no room"):
        load_dataset("digits", "test", size=28, pad=14)


def test_synthetic_is_seeded_sized_and_shares_classes_across_splits():
    a = load_dataset("synthetic", "train", n=64, size=16, seed=1)
    b = load_dataset("synthetic", "train", n=64, size=16, seed=1)
    c = load_dataset("synthetic", "train", n=64, size=16, seed=2)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.info.input_shape == (3, 16, 16) and len(a) == 64
    assert load_dataset("synthetic", "test", n=5, channels=1, num_classes=4).info.input_shape == (1, 32, 32)
    assert not torch.equal(load_dataset("synthetic", "test", n=64, size=16, seed=1).images, a.images)


def test_synthetic_is_learnable_by_a_linear_probe():
    """Classes are defined by prototypes shared by both splits: a nearest-centroid rule generalises."""
    tr = load_dataset("synthetic", "train", n=1000, size=16)
    te = load_dataset("synthetic", "test", n=300, size=16)
    x, y = tr.tensors()
    feats = lambda t: torch.fft.rfft2(t - t.mean(dim=(2, 3), keepdim=True)).abs().flatten(1)  # noqa: E731
    f = feats(x)
    cent = torch.stack([f[y == k].mean(0) for k in range(10)])
    xt, yt = te.tensors()
    pred = torch.cdist(feats(xt), cent).argmin(1)
    acc = float((pred == yt).float().mean())
    assert 0.5 < acc  # far above chance (0.1), so a CNN has a real signal to learn


def test_unknown_names_and_bad_options():
    with pytest.raises(BadInput, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(BadInput, match="unknown split"):
        load_dataset("digits", "val")
    with pytest.raises(BadInput, match="--data-root"):
        load_dataset("cifar10", "train")
    with pytest.raises(BadInput, match="synthetic"):
        load_dataset("synthetic", n=0)
    with pytest.raises(BadInput, match="unexpected keyword|dataset 'digits'"):
        load_dataset("digits", colour=True)


def test_photo_crops_are_seeded_natural_image_crops():
    tr = load_dataset("photo_crops", "train", n=300)
    x, y = tr.tensors()
    assert x.shape == (300, 3, 32, 32) and tr.num_classes == 1 and int(y.max()) == 0
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(load_dataset("photo_crops", "train", n=300).tensors()[0], x)  # seeded
    te = load_dataset("photo_crops", "test", n=300).tensors()[0]
    assert not torch.equal(te, x)  # the splits draw different crops
    # natural images: neighbouring pixels are strongly correlated (white noise would give ~0)
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.8
    assert float(x.mean(dim=(1, 2, 3)).std()) > 0.05  # crops differ from one another
    grey = load_dataset("photo_crops", "train", n=10, size=28, channels=1).tensors()[0]
    assert grey.shape == (10, 1, 28, 28)
    with pytest.raises(BadInput, match="min_scale"):
        load_dataset("photo_crops", "train", min_scale=0.6, max_scale=0.5)
    with pytest.raises(BadInput, match="channels"):
        load_dataset("photo_crops", "train", channels=2)
