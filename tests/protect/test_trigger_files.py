"""Trigger sets loaded from image files: the real WatermarkNN set and generated error cases."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeguard.errors import BadInput
from edgeguard.protect import load_trigger_dir as load_via_triggers
from edgeguard.protect.trigger_files import load_trigger_dir

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "watermarknn-trigger-set"
PICS = DATA / "pics"
LABELS = DATA / "labels-cifar.txt"

needs_data = pytest.mark.skipif(not PICS.is_dir(), reason=f"{DATA} is absent")


# ---------------------------------------------------------------------------------------------
# the real WatermarkNN trigger set (three full loads in this module: centre crop twice, resize once)


@pytest.fixture(scope="module")
def adi():
    if not PICS.is_dir():
        pytest.skip(f"{DATA} is absent")
    return load_trigger_dir(PICS, LABELS, (3, 32, 32), 10)


@pytest.fixture(scope="module")
def wrt():
    if not PICS.is_dir():
        pytest.skip(f"{DATA} is absent")
    return load_via_triggers(PICS, None, (3, 32, 32), 10, renderer="resize")


def _manual_center_crop(img: Image.Image, h: int, w: int) -> np.ndarray:
    iw, ih = img.size
    left, top = int(round((iw - w) / 2)), int(round((ih - h) / 2))
    arr = np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@needs_data
def test_real_set_shape_and_pairing(adi):
    assert adi.images.shape == (100, 3, 32, 32) and adi.images.dtype == torch.uint8
    assert adi.labels.dtype == torch.int64 and len(adi) == 100
    assert adi.files[:3] == ("1.jpg", "10.jpg", "100.jpg")
    assert adi.labels[:3].tolist() == [6, 2, 8]
    assert adi.files[-1] == "99.jpg" and adi.labels[-1].item() == 6
    assert list(adi.files) == sorted(adi.files)
    assert adi.source == str(PICS) and adi.renderer == "center_crop"
    counts = collections.Counter(adi.labels.tolist())
    assert dict(counts) == {0: 11, 1: 8, 2: 12, 3: 14, 4: 12, 5: 10, 6: 12, 7: 9, 8: 8, 9: 4}


@needs_data
def test_png_named_jpg_loads_as_rgb(adi):
    for name in ("24.jpg", "66.jpg"):
        with Image.open(PICS / name) as im:
            assert im.format == "PNG" and im.mode == "RGBA"
        i = adi.files.index(name)
        assert adi.images[i].shape == (3, 32, 32)
        assert int(adi.images[i].max()) > 0


@needs_data
def test_center_crop_is_deterministic_and_matches_manual_crop(adi):
    again = load_trigger_dir(PICS, LABELS, (3, 32, 32), 10, renderer="adi")
    assert again.renderer == "center_crop"
    assert again.sha256 == adi.sha256
    for name in ("1.jpg", "66.jpg"):  # a JPEG and a PNG-with-alpha (1489 x 838: odd margins)
        with Image.open(PICS / name) as im:
            expected = _manual_center_crop(im.convert("RGB"), 32, 32)
        assert np.array_equal(adi.images[adi.files.index(name)].numpy(), expected)


@needs_data
def test_resize_renderer_differs_and_matches_manual_resize(adi, wrt):
    assert wrt.renderer == "resize" and wrt.images.shape == (100, 3, 32, 32)
    assert torch.equal(wrt.labels, adi.labels) and wrt.files == adi.files
    assert wrt.sha256 != adi.sha256
    assert (wrt.images != adi.images).flatten(1).any(dim=1).all()  # every trigger changes
    with Image.open(PICS / "66.jpg") as im:
        rgb = im.convert("RGB")
    w, h = rgb.size  # landscape: height becomes 64
    small = rgb.resize((int(64 * w / h), 64), Image.BICUBIC)
    expected = _manual_center_crop(small, 32, 32)
    assert np.array_equal(wrt.images[wrt.files.index("66.jpg")].numpy(), expected)


@needs_data
def test_grayscale_and_subset_consistency(adi, tmp_path):
    names = ["1.jpg", "10.jpg", "24.jpg"]
    pics = tmp_path / "pics"
    pics.mkdir()
    for n in names:
        os.symlink(PICS / n, pics / n)
    (tmp_path / "labels.txt").write_text("6.000000000000000000e+00\n2.000000000000000000e+00\n1.0\n")
    rgb = load_trigger_dir(pics, None, (3, 32, 32), 10)
    for n in names:  # same pixels whatever directory the file sits in
        assert torch.equal(rgb.images[rgb.files.index(n)], adi.images[adi.files.index(n)])
    gray = load_trigger_dir(pics, None, (1, 32, 32), 10)
    assert gray.images.shape == (3, 1, 32, 32) and gray.input_shape == (1, 32, 32)
    with Image.open(PICS / "24.jpg") as im:
        expected = _manual_center_crop(im.convert("RGB").convert("L"), 32, 32)
    assert np.array_equal(gray.images[gray.files.index("24.jpg")].numpy(), expected)


# ---------------------------------------------------------------------------------------------
# small generated sets: layout rules and every bad input


def _make_set(root: Path, n: int = 3, size=(40, 30), labels: list[str] | None = None) -> tuple[Path, Path]:
    pics = root / "pics"
    pics.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, n + 1):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(pics / f"{i}.png")
    labels_path = root / "labels-test.txt"
    if labels is None:
        labels = [f"{float(i % 10):.18e}" for i in range(n)]
    labels_path.write_text("\n".join(labels) + "\n")
    return pics, labels_path


def test_generated_set_loads_in_lexicographic_order(tmp_path):
    pics, labels = _make_set(tmp_path, n=11)
    (pics / ".hidden").write_bytes(b"not an image")
    ts = load_trigger_dir(pics, labels, (3, 16, 16), 10)
    assert ts.files == ("1.png", "10.png", "11.png") + tuple(f"{i}.png" for i in range(2, 10))
    assert ts.labels.tolist() == [i % 10 for i in range(11)]
    with Image.open(pics / "10.png") as im:
        assert np.array_equal(ts.images[1].numpy(), _manual_center_crop(im.convert("RGB"), 16, 16))


def test_labels_auto_discovery_in_parent_and_inside(tmp_path):
    pics, _ = _make_set(tmp_path / "a")
    assert load_trigger_dir(pics, None, (3, 8, 8), 10).labels.tolist() == [0, 1, 2]
    pics2, labels2 = _make_set(tmp_path / "b")
    labels2.rename(pics2 / "labels.txt")  # inside the directory: skipped as an image
    ts = load_trigger_dir(pics2, None, (3, 8, 8), 10)
    assert ts.files == ("1.png", "2.png", "3.png")


def test_labels_auto_discovery_none_or_several(tmp_path):
    pics, labels = _make_set(tmp_path)
    labels.unlink()
    with pytest.raises(BadInput, match="--labels"):
        load_trigger_dir(pics, None, (3, 8, 8), 10)
    (tmp_path / "labels-a.txt").write_text("0\n1\n2\n")
    (tmp_path / "labels-b.txt").write_text("0\n1\n2\n")
    with pytest.raises(BadInput, match="several.*--labels"):
        load_trigger_dir(pics, None, (3, 8, 8), 10)


def test_wrong_number_of_labels(tmp_path):
    pics, labels = _make_set(tmp_path, labels=["0", "1"])
    with pytest.raises(BadInput, match="has 2 labels but .* has 3 images"):
        load_trigger_dir(pics, labels, (3, 8, 8), 10)


def test_missing_labels_file(tmp_path):
    pics, labels = _make_set(tmp_path)
    with pytest.raises(BadInput, match="nope.txt"):
        load_trigger_dir(pics, tmp_path / "nope.txt", (3, 8, 8), 10)


@pytest.mark.parametrize("bad", ["10", "1.5", "-1", "cat", "nan"])
def test_bad_label_names_the_line(tmp_path, bad):
    pics, labels = _make_set(tmp_path, labels=["0", "", bad, "1"])
    with pytest.raises(BadInput, match=r"labels-test\.txt, line 3"):
        load_trigger_dir(pics, labels, (3, 8, 8), 10)


def test_undecodable_file_is_named(tmp_path):
    pics, labels = _make_set(tmp_path, labels=["0", "1", "2", "3"])
    (pics / "x.jpg").write_bytes(os.urandom(256))
    with pytest.raises(BadInput, match=r"x\.jpg"):
        load_trigger_dir(pics, labels, (3, 8, 8), 10)


def test_truncated_image_is_named(tmp_path):
    pics, labels = _make_set(tmp_path)
    data = (pics / "2.png").read_bytes()
    (pics / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput, match=r"2\.png"):
        load_trigger_dir(pics, labels, (3, 8, 8), 10)


def test_empty_or_missing_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"x")
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n")
    with pytest.raises(BadInput, match="no image files"):
        load_trigger_dir(empty, labels, (3, 8, 8), 10)
    with pytest.raises(BadInput, match="does not exist"):
        load_trigger_dir(tmp_path / "missing", labels, (3, 8, 8), 10)


def test_unknown_renderer_and_bad_shape(tmp_path):
    pics, labels = _make_set(tmp_path)
    with pytest.raises(BadInput, match="renderer"):
        load_trigger_dir(pics, labels, (3, 8, 8), 10, renderer="bilinear")
    with pytest.raises(BadInput, match="input shape"):
        load_trigger_dir(pics, labels, (4, 8, 8), 10)


def test_small_image_is_zero_padded_centred(tmp_path):
    pics, labels = _make_set(tmp_path, n=1, size=(5, 4))  # 5 wide, 4 high
    ts = load_trigger_dir(pics, labels, (3, 8, 8), 10)
    with Image.open(pics / "1.png") as im:
        src = np.asarray(im.convert("RGB")).transpose(2, 0, 1)
    img = ts.images[0].numpy()
    assert np.array_equal(img[:, 2:6, 1:6], src)  # pads: top 2, bottom 2, left 1, right 2
    assert img.sum() == src.astype(np.int64).sum()


def test_alpha_is_dropped_not_composited(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red
    Image.fromarray(rgba, "RGBA").save(pics / "a.jpg", format="PNG")
    (tmp_path / "labels.txt").write_text("3\n")
    ts = load_trigger_dir(pics, None, (3, 8, 8), 10, renderer="resize")
    assert ts.images.shape == (1, 3, 8, 8)
    assert (ts.images[0, 0] == 200).all() and (ts.images[0, 1:] == 0).all()
