"""Shared fixtures: a tiny trained bundle (smallcnn on digits) and its ONNX export, built once.

Markers: ``slow`` (long end-to-end; CI runs them), ``gpu`` and ``tensorrt`` (skipped automatically
when the capability is missing).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("EDGEGUARD_QUIET", "1")


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not (has_gpu and has_trt):
            item.add_marker(pytest.mark.skip(reason="needs tensorrt and a GPU"))


TINY_EPOCHS = 4


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A smallcnn trained on digits for a few epochs (seconds); the path of its bundle folder."""
    from edgeguard.api import train_bundle
    from edgeguard.config import DataConfig, ModelConfig
    from edgeguard.training import TrainConfig

    out = tmp_path_factory.mktemp("tiny") / "bundle"
    train_bundle(DataConfig("digits"), ModelConfig("smallcnn"), TrainConfig(epochs=TINY_EPOCHS, lr=0.05, seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_bundle, tmp_path_factory):
    """The tiny bundle exported to ONNX."""
    from edgeguard.api import export_bundle

    out = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    export_bundle(tiny_bundle, out)
    return out


@pytest.fixture(scope="session")
def digits_test():
    from edgeguard.data import load_dataset

    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def tiny_int8(tiny_bundle, tmp_path_factory):
    """The tiny bundle quantized to INT8 (PTQ, TensorRT-style symmetric), its QDQ graph inside."""
    from edgeguard.quantize import PtqConfig, quantize_bundle

    out = tmp_path_factory.mktemp("tiny_int8") / "int8"
    return quantize_bundle(tiny_bundle, out, PtqConfig(target="tensorrt", calib_samples=256)).bundle


@pytest.fixture
def fake_trt(monkeypatch):
    """``install(version="10.3.0.26", **cudart_options) -> (trt, cudart)``: a fake tensorrt module and cuda-python
    runtime (tests/fake_tensorrt.py) for the no-GPU tests of the TensorRT code paths; torch is told it sees no GPU,
    so the cuda-python path runs."""
    import importlib.util
    import sys
    from pathlib import Path

    from edgeguard.runtime import trt_env

    spec = importlib.util.spec_from_file_location("fake_tensorrt", Path(__file__).with_name("fake_tensorrt.py"))
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)

    def install(version: str = "10.3.0.26", **cudart_options):
        trt, rt = fake.make_tensorrt(version), fake.make_cudart(**cudart_options)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trt_env, "_cudart", lambda: rt)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return trt, rt

    return install


@pytest.fixture
def no_tensorrt(monkeypatch):
    """tensorrt cannot be imported (whether or not this machine has it)."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
