"""Secrets and determinism.

No owner secret in what ships: the FP32, INT8 and defended ONNX files of a watermarked, MagicGuard-guarded bundle
with fragile triggers enrolled on its ONNX carry no trigger image, no trigger label list, no key seed and no fragile
key, neither in their bytes nor in ``metadata_props``.  (The MagicGuard unit mask, when ``ratio`` < 1, is part of
the computation and ships inside the graph by necessity; what stays in the vault is the owner's record.)
Determinism: the same seed twice gives the same weights file (sha256) and the same ONNX graph bytes on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

KEY_SEED = 86753091  # distinctive digits to search for


@pytest.fixture(scope="module")
def shipped(tiny_bundle, tmp_path_factory):
    from edgeguard.api import export_bundle
    from edgeguard.bundle import load_bundle
    from edgeguard.protect import WatermarkConfig, embed_watermark
    from edgeguard.protect.fragile import FragileConfig, protect_fragile
    from edgeguard.protect.magicguard import MagicGuardConfig, protect_magicguard
    from edgeguard.protect.watermark import read_key
    from edgeguard.quantize import PtqConfig, quantize_bundle

    tmp = tmp_path_factory.mktemp("secrets")
    wm = embed_watermark(tiny_bundle, tmp / "wm", WatermarkConfig(n_triggers=24, epochs=12), key_seed=KEY_SEED)
    guarded = protect_magicguard(wm.bundle, tmp / "guarded", MagicGuardConfig(ratio=0.5, seed=5)).bundle
    files = {"fp32": export_bundle(guarded, tmp / "fp32.onnx").path,
             "defended": export_bundle(guarded, tmp / "defended.onnx", defense="heuristic").path}
    int8 = quantize_bundle(wm.bundle, tmp / "int8", PtqConfig(target="cpu", calib_samples=128)).bundle
    files["int8"] = export_bundle(int8, tmp / "int8.onnx").path
    fr = protect_fragile(files["fp32"], tmp / "fragile", FragileConfig(n=16, steps=60, max_steps=300), quiet=True)
    key, record = read_key(load_bundle(guarded).vault)
    return {"files": files, "key": key, "record": record, "fragile_dir": tmp / "fragile", "fragile": fr,
            "vault": Path(guarded) / "vault"}


def _windows(data: bytes, n: int = 4, size: int = 48) -> list[bytes]:
    """A few slices from inside ``data`` (any one of them found in a file means ``data`` leaked into it)."""
    if len(data) <= size:
        return [data] if data else []
    step = (len(data) - size) // n
    return [data[i * step + step // 2: i * step + step // 2 + size] for i in range(n)]


def _secret_blobs(s) -> dict[str, list[bytes]]:
    images = s["key"].images
    x = images.float() if images.dtype != torch.uint8 else images
    labels = s["key"].labels.to(torch.int64).numpy()
    blobs = {
        "trigger images (float32)": _windows((x.float() / (255.0 if images.dtype == torch.uint8 else 1.0)).numpy().astype(np.float32).tobytes()),
        "trigger labels (int64)": [labels.tobytes()],
        "trigger labels (JSON)": [json.dumps(labels.tolist()).encode(), json.dumps(labels.tolist(), separators=(",", ":")).encode()],
        "key seed": [str(KEY_SEED).encode()],
    }
    if images.dtype == torch.uint8:
        blobs["trigger images (uint8)"] = _windows(images.numpy().tobytes())
    for f in sorted(Path(s["fragile_dir"]).rglob("*")):  # the fragile key and record as stored
        if f.is_file():
            blobs[f"fragile store {f.name}"] = _windows(f.read_bytes())
    for f in sorted(Path(s["vault"]).rglob("*")):  # every vault file as stored
        if f.is_file() and "fragile" not in f.parts:
            blobs[f"vault {f.name}"] = _windows(f.read_bytes())
    return blobs


@pytest.mark.parametrize("which", ["fp32", "int8", "defended"])
def test_no_owner_secret_ships(shipped, which):
    path = Path(shipped["files"][which])
    data = path.read_bytes()
    leaks = [name for name, blobs in _secret_blobs(shipped).items() if any(b and b in data for b in blobs)]
    assert leaks == [], f"{path.name} carries {leaks}"
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta, "edgeguard records public metadata (classes, shape, stages)"
    text = json.dumps(meta)
    for word in ("key_seed", "trigger_labels", "labels.txt", str(KEY_SEED), "fragile"):
        assert word not in text, f"{path.name} metadata mentions {word!r}"


def test_the_search_would_find_a_leak(shipped, tmp_path):
    """The search itself can fail: a file that embeds a trigger image is caught."""
    blobs = _secret_blobs(shipped)
    leaky = Path(shipped["files"]["fp32"]).read_bytes() + blobs["trigger images (float32)"][1]
    assert any(b in leaky for b in blobs["trigger images (float32)"])


def test_same_seed_same_bundle_and_onnx(tmp_path, monkeypatch):
    from collections import OrderedDict

    from edgeguard.api import export_bundle, train_bundle
    from edgeguard.config import DataConfig, ModelConfig
    from edgeguard.export import onnx as export_mod
    from edgeguard.training import TrainConfig

    shas, onnxes = [], []
    for i in range(2):
        # each export traces the network itself: two runs in the same second have the same manifest, and the
        # exported-graph cache (keyed by it) would hand the second run the first one's graph
        monkeypatch.setattr(export_mod, "_BACKBONES", OrderedDict())
        out = tmp_path / f"run{i}"
        train_bundle(DataConfig("digits"), ModelConfig("smallcnn"), TrainConfig(epochs=1, max_steps=8, seed=3), out)
        shas.append(json.loads((out / "manifest.json").read_text())["files"]["model.pt"]["sha256"])
        onnxes.append(onnx.load(export_bundle(out, tmp_path / f"run{i}.onnx").path).graph.SerializeToString())
    assert shas[0] == shas[1]  # the weights file, byte for byte (the manifest also records when it was written)
    assert onnxes[0] == onnxes[1]  # the graph, byte for byte (its metadata names the bundle's manifest hash)
    train_bundle(DataConfig("digits"), ModelConfig("smallcnn"), TrainConfig(epochs=1, max_steps=8, seed=4), tmp_path / "other")
    other = json.loads((tmp_path / "other" / "manifest.json").read_text())["files"]["model.pt"]["sha256"]
    assert other != shas[0]  # the check can fail: another seed, other weights
