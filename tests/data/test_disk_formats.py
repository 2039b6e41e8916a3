"""The on-disk dataset formats, each read from small real files written here in its standard format."""

from __future__ import annotations

import collections
import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeguard.data import DATASETS, load_dataset
from edgeguard.data.disk import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from edgeguard.errors import BackendUnavailable, BadInput

DISK = ["cifar10", "cifar100", "fashion_mnist", "imagefolder", "mnist", "npz", "svhn"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def check_float_views(ds, n: int, shape: tuple[int, int, int]) -> None:
    assert len(ds) == n
    x, y = ds[0]
    assert x.dtype == torch.float32 and tuple(x.shape) == shape
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert isinstance(y, int)
    xs, ys = ds.tensors()
    assert xs.dtype == torch.float32 and tuple(xs.shape) == (n, *shape)
    assert 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0
    assert ys.dtype == torch.int64 and len(ys) == n


def test_registered_names():
    assert DATASETS.names(family="disk") == DISK
    for name in DISK:
        assert DATASETS.entry(name).meta["needs_root"] is True


@pytest.mark.parametrize("name", DISK)
def test_missing_root(tmp_path, name):
    with pytest.raises(BadInput, match="--data-root"):
        load_dataset(name, "train", None)
    with pytest.raises(BadInput, match=r"nowhere does not exist"):
        load_dataset(name, "train", str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------- CIFAR


def dump_py2_style(obj, path: Path, protocol: int = 2) -> None:
    """Pickle as the official batches are: protocol 2 naming numpy 1's ``numpy.core.multiarray``."""
    data = pickle.dumps(obj, protocol=protocol)
    if protocol == 2:
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(data)


def cifar_batch(rng, n: int, label_keys: dict[str, int], str_keys: bool = False):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = {k: [int(v) for v in rng.integers(0, hi, size=n)] for k, hi in label_keys.items()}
    d = {"batch_label": b"batch", "data": data, "filenames": [b"img_%d.png" % i for i in range(n)], **labels}
    return d if str_keys else {k.encode(): v for k, v in d.items()}


def write_cifar10(parent: Path, *, protocol: int = 2, str_keys: bool = False, seed: int = 0) -> dict:
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        b = cifar_batch(rng, 4 if name != "test_batch" else 10, {"labels": 10}, str_keys)
        batches[name] = b
        dump_py2_style(b, folder / name, protocol)
    meta = {"num_cases_per_batch": 4, "label_names": [n.encode() for n in CIFAR10_NAMES], "num_vis": 3072}
    dump_py2_style(
        meta if str_keys else {k.encode(): v for k, v in meta.items()}, folder / "batches.meta", protocol
    )
    return batches


def test_cifar10_official_layout(tmp_path):
    batches = write_cifar10(tmp_path)
    first = batches["data_batch_1"][b"data"]
    first[0, 1024 + 5 * 32 + 7] = 200  # channel 1 (green), row 5, column 7 of image 0
    dump_py2_style(batches["data_batch_1"], tmp_path / "cifar-10-batches-py" / "data_batch_1")
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray" in raw and b"numpy._core" not in raw  # like the files from 2009

    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        ds = load_dataset("cifar10", "train", str(root))
        check_float_views(ds, 20, (3, 32, 32))
        assert ds.images.dtype == torch.uint8
        assert list(ds.info.classes) == CIFAR10_NAMES
        assert ds.info.mean == CIFAR10_MEAN and ds.info.std == CIFAR10_STD
        want = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
        assert ds.labels.tolist() == want
        assert ds[0][0][1, 5, 7].item() == pytest.approx(200 / 255)
        assert torch.equal(ds.images[0].reshape(-1), torch.from_numpy(first[0]))
        last = batches["data_batch_5"][b"data"][-1]
        assert torch.equal(ds.images[-1].reshape(-1), torch.from_numpy(last))

    test = load_dataset("cifar10", "test", str(tmp_path))
    check_float_views(test, 10, (3, 32, 32))
    assert test.labels.tolist() == batches["test_batch"][b"labels"]
    assert torch.equal(test.images.reshape(10, -1), torch.from_numpy(batches["test_batch"][b"data"]))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_str_keys_and_newer_protocols(tmp_path, protocol):
    batches = write_cifar10(tmp_path, protocol=protocol, str_keys=True)
    ds = load_dataset("cifar10", "test", str(tmp_path))
    assert ds.labels.tolist() == batches["test_batch"]["labels"]
    assert torch.equal(ds.images.reshape(10, -1), torch.from_numpy(batches["test_batch"]["data"]))


def write_cifar100(parent: Path) -> dict:
    folder = parent / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    out = {}
    for split, n in (("train", 20), ("test", 10)):
        out[split] = cifar_batch(rng, n, {"fine_labels": 100, "coarse_labels": 20})
        dump_py2_style(out[split], folder / split)
    meta = {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    }
    dump_py2_style(meta, folder / "meta")
    return out


def test_cifar100_fine_and_coarse(tmp_path):
    written = write_cifar100(tmp_path)
    fine = load_dataset("cifar100", "train", str(tmp_path / "cifar-100-python"))
    check_float_views(fine, 20, (3, 32, 32))
    assert fine.num_classes == 100 and fine.info.classes[3] == "fine_3"
    assert fine.labels.tolist() == written["train"][b"fine_labels"]
    assert fine.info.mean == CIFAR100_MEAN and fine.info.std == CIFAR100_STD
    assert torch.equal(fine.images.reshape(20, -1), torch.from_numpy(written["train"][b"data"]))
    coarse = load_dataset("cifar100", "test", str(tmp_path), label_mode="coarse")
    assert coarse.num_classes == 20 and coarse.info.classes[0] == "coarse_0"
    assert coarse.labels.tolist() == written["test"][b"coarse_labels"]
    with pytest.raises(BadInput, match="label_mode"):
        load_dataset("cifar100", "test", str(tmp_path), label_mode="medium")


def _touch(path: str) -> None:
    Path(path).write_text("executed")


class Payload:
    """Unpickling this would run ``_touch``: the reader must refuse it before calling anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)


class ExecPayload(Payload):
    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('executed')",)


@pytest.mark.parametrize("kind", ["ordereddict", "function", "exec"])
def test_cifar_refuses_foreign_pickles_without_running_them(tmp_path, kind):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    marker = tmp_path / "marker"
    if kind == "ordereddict":
        obj, what = collections.OrderedDict([(b"data", b"x")]), "collections.OrderedDict"
    elif kind == "function":
        obj, what = {b"data": Payload(marker)}, "_touch"
    else:
        obj, what = {b"data": ExecPayload(marker)}, r"__builtin__\.exec"  # protocol 2 spelling
    batch.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(
        BadInput,
        match=rf"test_batch is not a CIFAR batch file: it contains a pickled object of type .*{what}",
    ):
        load_dataset("cifar10", "test", str(tmp_path))
    assert not marker.exists()


def test_cifar_bad_files(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    with pytest.raises(BadInput, match="missing CIFAR file .*data_batch_3"):
        load_dataset("cifar10", "train", str(tmp_path))
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadInput, match="test_batch is not a readable CIFAR batch file"):
        load_dataset("cifar10", "test", str(tmp_path))
    (folder / "test_batch").write_bytes(pickle.dumps({b"labels": [1]}, protocol=2))
    with pytest.raises(BadInput, match="test_batch has no 'data' entry"):
        load_dataset("cifar10", "test", str(tmp_path))
    (folder / "batches.meta").unlink()
    with pytest.raises(BadInput, match="missing .*batches.meta"):
        load_dataset("cifar10", "test", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no test_batch in .*empty or .*cifar-10-batches-py"):
        load_dataset("cifar10", "test", str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------- MNIST


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x0800 | arr.ndim
    return (
        struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    )


def write_mnist(folder: Path, *, gz: bool = False, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", 20), ("t10k", 10)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        x[0, 10, 11] = 200
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        out[prefix] = (x, y)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return out


def test_mnist_pads_to_32_like_lenet(tmp_path):
    written = write_mnist(tmp_path)
    ds = load_dataset("mnist", "train", str(tmp_path))
    check_float_views(ds, 20, (1, 32, 32))
    x, y = written["train"]
    assert ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == y.tolist()
    assert list(ds.info.classes) == [str(i) for i in range(10)]
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(x))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(ds.images[:, 0][:, border].max()) == 0
    assert ds[0][0][0, 12, 13].item() == pytest.approx(200 / 255)

    kept = load_dataset("mnist", "test", str(tmp_path), size=28)
    check_float_views(kept, 10, (1, 28, 28))
    assert torch.equal(kept.images[:, 0], torch.from_numpy(written["t10k"][0]))
    assert kept.labels.tolist() == written["t10k"][1].tolist()

    small = load_dataset("mnist", "test", str(tmp_path), size=14)
    check_float_views(small, 10, (1, 14, 14))
    with pytest.raises(BadInput, match="size must be an integer"):
        load_dataset("mnist", "test", str(tmp_path), size=2)


def test_fashion_mnist_gzipped_torchvision_layout(tmp_path):
    written = write_mnist(tmp_path / "FashionMNIST" / "raw", gz=True, seed=3)
    ds = load_dataset("fashion_mnist", "test", str(tmp_path), size=28)
    check_float_views(ds, 10, (1, 28, 28))
    assert ds.info.classes[0] == "T-shirt/top" and ds.info.classes[9] == "Ankle boot"
    assert torch.equal(ds.images[:, 0], torch.from_numpy(written["t10k"][0]))
    assert ds.labels.tolist() == written["t10k"][1].tolist()
    # the MNIST/raw folder and a plain raw/ folder are found too
    write_mnist(tmp_path / "other" / "MNIST" / "raw", gz=True)
    assert len(load_dataset("mnist", "train", str(tmp_path / "other"))) == 20
    write_mnist(tmp_path / "third" / "raw")
    assert len(load_dataset("mnist", "train", str(tmp_path / "third"))) == 20


def test_mnist_bad_files(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    images.write_bytes(raw[:-100])
    with pytest.raises(BadInput, match="train-images-idx3-ubyte is truncated"):
        load_dataset("mnist", "train", str(tmp_path))
    images.write_bytes(raw[:10])
    with pytest.raises(BadInput, match="truncated: it ends inside the IDX header"):
        load_dataset("mnist", "train", str(tmp_path))
    images.write_bytes(struct.pack(">I", 0x0801) + raw[4:])
    with pytest.raises(BadInput, match="not an IDX file .*0x00000803 expected, got 0x00000801"):
        load_dataset("mnist", "train", str(tmp_path))
    images.unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(BadInput, match="train-images-idx3-ubyte.gz is a damaged or truncated gzip file"):
        load_dataset("mnist", "train", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(BadInput, match="missing .*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(9, dtype=np.uint8)))
    with pytest.raises(BadInput, match="holds 10 images but .* holds 9 labels"):
        load_dataset("mnist", "test", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="no t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", str(empty))


# -------------------------------------------------------------------------------------------- SVHN


def write_svhn(folder: Path) -> dict:
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    out = {}
    for split, n in (("train", 20), ("test", 10)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[5, 7, 1, 0] = 200  # row 5, column 7, green, image 0
        y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)
        y[0, 0], y[1, 0] = 10, 3
        savemat(str(folder / f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return out


def test_svhn(tmp_path):
    written = write_svhn(tmp_path)
    ds = load_dataset("svhn", "train", str(tmp_path))
    check_float_views(ds, 20, (3, 32, 32))
    x, y = written["train"]
    assert ds.labels[0].item() == 0 and ds.labels[1].item() == 3  # 10 means the digit 0
    assert ds.labels.tolist() == [0 if v == 10 else int(v) for v in y[:, 0]]
    assert ds[0][0][1, 5, 7].item() == pytest.approx(200 / 255)
    assert torch.equal(ds.images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert list(ds.info.classes) == [str(i) for i in range(10)]
    assert len(load_dataset("svhn", "test", str(tmp_path))) == 10


def test_svhn_bad_files(tmp_path, monkeypatch):
    with pytest.raises(BadInput, match="missing .*train_32x32.mat"):
        load_dataset("svhn", "train", str(tmp_path))
    (tmp_path / "train_32x32.mat").write_bytes(b"this is not a MATLAB file at all" * 10)
    with pytest.raises(BadInput, match="train_32x32.mat is not a readable MATLAB file"):
        load_dataset("svhn", "train", str(tmp_path))
    from scipy.io import savemat

    savemat(str(tmp_path / "train_32x32.mat"), {"images": np.zeros(3)})
    with pytest.raises(BadInput, match="has no 'X' and 'y'"):
        load_dataset("svhn", "train", str(tmp_path))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    with pytest.raises(BackendUnavailable, match=r"pip install 'edgeguard\[svhn\]'"):
        load_dataset("svhn", "train", str(tmp_path))


# ------------------------------------------------------------------------------------- imagefolder


def solid(w: int, h: int, rgb, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h), rgb)


def write_imagefolder(root: Path) -> dict:
    rng = np.random.default_rng(4)
    pics = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
    # exact 32x32 PNGs whose pixels must come back unchanged
    for i in range(3):
        a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        a[5, 7] = (200, 10, 20)
        Image.fromarray(a).save(root / "train" / "cat" / f"c{i}.png")
        pics[f"c{i}"] = a
    # a PNG with alpha saved under a .jpg name, as in the WatermarkNN trigger set
    rgba = rng.integers(0, 256, size=(32, 32, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "train" / "dog" / "trigger.jpg", format="PNG")
    pics["trigger"] = rgba
    solid(64, 48, (0, 0, 255)).save(root / "train" / "dog" / "wide.jpeg", quality=95)
    solid(32, 32, (255, 0, 0)).save(root / "train" / "dog" / "red.bmp")
    solid(32, 32, 5, "P").save(root / "train" / "dog" / "pal.gif")
    (root / "train" / "dog" / "notes.txt").write_text("not an image, and ignored")
    b = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(b).save(root / "test" / "dog" / "d0.png")
    pics["d0"] = b
    return pics


def test_imagefolder(tmp_path):
    pics = write_imagefolder(tmp_path)
    ds = load_dataset("imagefolder", "train", str(tmp_path))
    check_float_views(ds, 7, (3, 32, 32))
    assert list(ds.info.classes) == ["cat", "dog"]
    # files sorted within each class: c0 c1 c2 | pal.gif red.bmp trigger.jpg wide.jpeg
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    for i in range(3):
        assert torch.equal(ds.images[i], torch.from_numpy(pics[f"c{i}"]).permute(2, 0, 1))
    assert ds[0][0][0, 5, 7].item() == pytest.approx(200 / 255)
    assert torch.equal(ds.images[5], torch.from_numpy(pics["trigger"][:, :, :3]).permute(2, 0, 1))
    assert ds.images[4, :, 0, 0].tolist() == [255, 0, 0]
    wide = ds.images[6].int()  # 64x48 blue JPEG: shorter side to 32, then the centre
    assert (wide[2] > 240).all() and (wide[:2] < 15).all()

    test = load_dataset("imagefolder", "test", str(tmp_path))
    check_float_views(test, 1, (3, 32, 32))
    assert test.info.classes == ds.info.classes and test.labels.tolist() == [1]
    assert torch.equal(test.images[0], torch.from_numpy(pics["d0"]).permute(2, 0, 1))

    grey = load_dataset("imagefolder", "train", str(tmp_path), channels=1, size=16)
    check_float_views(grey, 7, (1, 16, 16))


def test_imagefolder_resize_modes(tmp_path):
    big = np.random.default_rng(5).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(big).save(tmp_path / "train" / "a" / "big.png")
    Image.fromarray(big[:20, :20]).save(tmp_path / "train" / "a" / "small.png")
    crop = load_dataset("imagefolder", "train", str(tmp_path), resize="center_crop")
    assert torch.equal(crop.images[0], torch.from_numpy(big[4:36, 4:36]).permute(2, 0, 1))
    small = crop.images[1]  # 20x20 centred on 32x32 zeros
    assert torch.equal(small[:, 6:26, 6:26], torch.from_numpy(big[:20, :20]).permute(2, 0, 1))
    assert int(small.sum()) == int(small[:, 6:26, 6:26].sum())
    resized = load_dataset("imagefolder", "train", str(tmp_path))  # default: resize the shorter side
    assert resized.images.shape == (2, 3, 32, 32)
    assert not torch.equal(resized.images[0], crop.images[0])
    with pytest.raises(BadInput, match="resize must be one of resize, center_crop"):
        load_dataset("imagefolder", "train", str(tmp_path), resize="stretch")


def test_imagefolder_bad_inputs(tmp_path):
    write_imagefolder(tmp_path)
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(BadInput, match="test/bird is a class that .*train does not have"):
        load_dataset("imagefolder", "test", str(tmp_path))
    (tmp_path / "test" / "bird").rmdir()
    bad = tmp_path / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing valid")
    with pytest.raises(BadInput, match="broken.png is not an image Pillow can decode"):
        load_dataset("imagefolder", "train", str(tmp_path))
    bad.write_bytes(b"plain text named .png")
    with pytest.raises(BadInput, match="broken.png is not an image Pillow can decode"):
        load_dataset("imagefolder", "train", str(tmp_path))
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    with pytest.raises(BadInput, match="has no class folders"):
        load_dataset("imagefolder", "train", str(empty))
    (empty / "train" / "a").mkdir()
    with pytest.raises(BadInput, match="class folder .*a holds no image files"):
        load_dataset("imagefolder", "train", str(empty))
    with pytest.raises(BadInput, match="missing .*train"):
        load_dataset("imagefolder", "train", str(tmp_path / "train" / "cat"))


# --------------------------------------------------------------------------------------------- npz


def test_npz_folder_nchw_uint8(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, size=(20, 3, 8, 8), dtype=np.uint8)
    x[0, 1, 5, 7] = 200
    y = rng.integers(0, 4, size=20)
    y[0] = 4
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:10], y=np.zeros(10, dtype=np.int64))
    ds = load_dataset("npz", "train", str(tmp_path))
    check_float_views(ds, 20, (3, 8, 8))
    assert ds.images.dtype == torch.uint8 and torch.equal(ds.images, torch.from_numpy(x))
    assert ds.labels.tolist() == y.tolist()
    assert ds[0][0][1, 5, 7].item() == pytest.approx(200 / 255)
    assert list(ds.info.classes) == ["0", "1", "2", "3", "4"]
    test = load_dataset("npz", "test", str(tmp_path))  # test labels are all 0, classes still from train
    assert test.info.classes == ds.info.classes
    assert load_dataset("npz", "test", str(tmp_path), num_classes=7).num_classes == 7


def test_npz_single_file_nhwc_float_with_class_names(tmp_path):
    rng = np.random.default_rng(7)
    xtr = rng.random((20, 6, 6, 3), dtype=np.float32)
    xtr[0, 5, 4, 2] = 1.0
    xte = rng.random((10, 6, 6, 3)).astype(np.float64)
    ytr, yte = rng.integers(0, 3, size=20), rng.integers(0, 3, size=10)
    path = tmp_path / "set.npz"
    np.savez_compressed(
        path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, classes=np.array(["a", "b", "c"])
    )
    ds = load_dataset("npz", "train", str(path))
    check_float_views(ds, 20, (3, 6, 6))
    assert ds.images.dtype == torch.float32
    assert torch.equal(ds.images, torch.from_numpy(xtr).permute(0, 3, 1, 2))
    assert ds[0][0][2, 5, 4].item() == 1.0
    assert list(ds.info.classes) == ["a", "b", "c"] and ds.labels.tolist() == ytr.tolist()
    test = load_dataset("npz", "test", str(path))
    check_float_views(test, 10, (3, 6, 6))
    assert torch.allclose(test.images, torch.from_numpy(xte.astype(np.float32)).permute(0, 3, 1, 2))
    with pytest.raises(BadInput, match="num_classes=5 but .* names 3 classes"):
        load_dataset("npz", "test", str(path), num_classes=5)


def test_npz_single_file_nhw_for_any_split(tmp_path):
    x = np.random.default_rng(8).integers(0, 256, size=(10, 9, 9), dtype=np.uint8)
    y = np.arange(10) % 2
    path = tmp_path / "x.npz"
    np.savez(path, x=x, y=y.reshape(10, 1))
    for split in ("train", "test"):
        ds = load_dataset("npz", split, str(path))
        check_float_views(ds, 10, (1, 9, 9))
        assert torch.equal(ds.images[:, 0], torch.from_numpy(x)) and ds.labels.tolist() == y.tolist()
        assert list(ds.info.classes) == ["0", "1"]


def test_npz_bad_inputs(tmp_path):
    with pytest.raises(BadInput, match="missing .*train.npz"):
        load_dataset("npz", "train", str(tmp_path))
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.full((4, 1, 4, 4), 1.5, dtype=np.float32), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(BadInput, match=r"bad.npz: float images in 'x' must lie in \[0, 1\], found 1.5..1.5"):
        load_dataset("npz", "train", str(bad))
    objects = np.empty(4, dtype=object)
    objects[:] = [np.zeros((1, 4, 4))] * 4
    np.savez(bad, x=objects, y=np.zeros(4, dtype=np.int64))
    with pytest.raises(BadInput, match="bad.npz: 'x' is an array of pickled Python objects"):
        load_dataset("npz", "train", str(bad))
    np.savez(
        bad, x=np.zeros((4, 1, 4, 4), np.uint8), y=np.zeros(4, np.int64), classes=np.array(["a", 1], object)
    )
    with pytest.raises(BadInput, match="'classes' is an array of pickled Python objects"):
        load_dataset("npz", "train", str(bad))
    np.savez(bad, images=np.zeros((4, 1, 4, 4), np.uint8))
    with pytest.raises(BadInput, match="has neither 'x'/'y' nor 'x_train'/'y_train' arrays .*images"):
        load_dataset("npz", "train", str(bad))
    np.savez(bad, x=np.zeros((4, 1, 4, 4), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(BadInput, match="holds 4 images in 'x' but 3 labels in 'y'"):
        load_dataset("npz", "train", str(bad))
    np.savez(bad, x=np.zeros((4, 1, 4, 4), np.uint8), y=np.array([0, 1, 2, 3]))
    with pytest.raises(BadInput, match=r"'y' must lie in 0..1, found 3"):
        load_dataset("npz", "train", str(bad), num_classes=2)
    bad.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(BadInput, match="bad.npz is not a readable .npz archive"):
        load_dataset("npz", "train", str(bad))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(BadInput, match="single .npy array"):
        load_dataset("npz", "train", str(tmp_path / "single.npy"))
