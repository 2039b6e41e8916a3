"""The fault corpus: every command against bad files, tampered bundles, bad data, bad configs and bad output paths.

Each case runs ``edgeguard.cli.main`` in-process inside one workspace whose path holds a space and non-ASCII
letters, and asserts the exit code, exactly one ``edgeguard: error:`` line on stderr naming the bad thing (for a
click usage error: click's usage block, then one ``Error:`` line naming it), no traceback, and that the workspace is byte-for-byte as before (nothing written, no temp file left, every previous
output intact).  Interruption, concurrency, secrets and determinism are in ``test_interrupt.py`` and
``test_secrets.py``; the README's reliability section counts the cases.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeguard.cli import main

MARKER = "PWNED-by-pickle"


def _onnx_model(path: Path, in_shape, outputs, nodes, inits=()) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], outs, list(inits)),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))


def _linear_classifier(path: Path, in_shape, k: int, *, softmax: bool = True, batch="N") -> None:
    from onnx import TensorProto, helper

    d = int(np.prod(in_shape))
    w = helper.make_tensor("w", TensorProto.FLOAT, [d, k], np.random.default_rng(0).random(d * k).astype(np.float32) - 0.5)
    s = helper.make_tensor("s", TensorProto.INT64, [2], [-1, d])
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["m" if softmax else "y"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["m"], ["y"], axis=1))
    _onnx_model(path, [batch, *in_shape], [("y", [batch, k])], nodes, [w, s])


def _rehash(bundle: Path) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / "model.pt").read_bytes()
    m["files"]["model.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(m))


_USER_MODELS = """
import torch
from torch import nn


class Good(nn.Module):
    def __init__(self, k=10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


class BadShape(Good):
    def forward(self, x):
        return super().forward(x).unsqueeze(-1)


def good(k=10):
    return Good(k)


def other():
    return nn.Sequential(nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(), nn.Linear(64, 10))


def badshape():
    return BadShape()


def raises():
    raise RuntimeError("no GPU named cuda:7")
"""


class _Evil:
    """A pickle whose loading would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def ws(tiny_bundle, tiny_onnx, tmp_path_factory):
    """The workspace: good artifacts, and one bad thing of each kind beside them."""
    from edgeguard.api import export_bundle

    root = tmp_path_factory.mktemp("faults") / "work space ü"
    root.mkdir()
    p: dict[str, Path] = {"root": root}

    def at(name: str) -> Path:
        p[name.replace(".", "_").replace(" ", "_").replace("/", "_")] = root / name
        return root / name

    shutil.copytree(tiny_bundle, at("b"))
    shutil.copy(tiny_onnx, at("b.onnx"))
    rc = main(["-q", "golden", str(p["b_onnx"]), "--out", str(at("b.golden.npz")), "--n", "16"])
    assert rc == 0
    # files
    at("empty.onnx").write_bytes(b"")
    data = p["b_onnx"].read_bytes()
    at("trunc.onnx").write_bytes(data[: len(data) // 2])
    at("random.onnx").write_bytes(np.random.default_rng(1).bytes(4096))
    at("dir.onnx").mkdir()
    os.symlink("loop.onnx", at("loop.onnx"))
    os.symlink("nowhere.onnx", at("dangling.onnx"))
    _linear_classifier(at("rgb8.onnx"), [3, 8, 8], 10)  # another input shape
    _linear_classifier(at("seven.onnx"), [1, 32, 32], 7)  # another class count
    _linear_classifier(at("logits.onnx"), [1, 32, 32], 10, softmax=False)  # someone else's graph, logits out
    _linear_classifier(at("batch1.onnx"), [1, 32, 32], 10, batch=1)  # a fixed batch of one
    from onnx import helper

    _onnx_model(at("twoout.onnx"), ["N", 1, 32, 32], [("y", ["N", 1, 32, 32]), ("z", ["N", 1, 32, 32])],
                [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["z"])])
    _onnx_model(at("image2image.onnx"), ["N", 1, 32, 32], [("y", ["N", 1, 32, 32])], [helper.make_node("Relu", ["x"], ["y"])])
    at("text.npz").write_text("not an archive")
    # bundles
    for name in ("tampered", "hashbad", "missing", "evil", "badjson", "noclasses"):
        shutil.copytree(p["b"], at(name))
    m = json.loads((p["tampered"] / "manifest.json").read_text())
    m["arch"] = "resnet18"
    (p["tampered"] / "manifest.json").write_text(json.dumps(m))
    with open(p["hashbad"] / "model.pt", "ab") as f:
        f.write(b"\0")
    (p["missing"] / "model.pt").unlink()
    p["marker"] = root.parent / MARKER
    torch.save({"weight": _Evil(p["marker"])}, p["evil"] / "model.pt")
    _rehash(p["evil"])  # the hash matches: only weights_only loading stands between the pickle and the shell
    (p["badjson"] / "manifest.json").write_text('{"arch": "smallcnn", ')
    m = json.loads((p["noclasses"] / "manifest.json").read_text())
    m["num_classes"] = 0
    (p["noclasses"] / "manifest.json").write_text(json.dumps(m))
    # data
    rng = np.random.default_rng(0)
    x = rng.random((20, 1, 8, 8)).astype(np.float32)
    y = np.arange(20) % 10
    bad = {
        "nan": dict(x=np.where(np.arange(x.size).reshape(x.shape) == 3, np.nan, x).astype(np.float32), y=y),
        "inf": dict(x=np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x).astype(np.float32), y=y),
        "complex": dict(x=x.astype(np.complex64), y=y),
        "rank2": dict(x=x[:, 0, 0, :], y=y),
        "highlabels": dict(x=x, y=y + 100),
        "neglabels": dict(x=x, y=y - 5),
        "floatlabels": dict(x=x, y=y + 0.5),
        "emptyarrays": dict(x=x[:0], y=y[:0]),
        "mismatch": dict(x=x, y=y[:5]),
        "noy": dict(x=x),
        "toobright": dict(x=x * 3, y=y),
    }
    for name, arrays in bad.items():
        np.savez(at(f"{name}.npz"), **arrays)
    with open(at("pickled.npz"), "wb") as f:  # a pickled object array under an .npz name
        np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    from PIL import Image

    for folder in ("corrupt", "fakepng"):
        for split in ("train", "test"):
            for c in ("a", "b"):
                d = root / folder / split / c
                d.mkdir(parents=True)
                for i in range(2):
                    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
        p[folder] = root / folder
    (p["corrupt"] / "train" / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"truncated" * 4)
    (p["fakepng"] / "train" / "b" / "notes.png").write_text("a text file with an image's name")
    (p["fakepng"] / "train" / "b" / "notes.txt").write_text("a text file: skipped, not an image")
    # configs
    import yaml

    for name, body in {"unknownkey.yaml": {"data": {"name": "digits"}, "trian": {"epochs": 1}},
                       "wrongtype.yaml": {"train": {"epochs": "many"}},
                       "negepochs.yaml": {"train": {"epochs": -3}},
                       "list.yaml": [1, 2, 3],
                       "grid_budget.yaml": {"attacks": [{"method": "knockoff", "params": {"budget": -1}}]},
                       "grid_nodefense.yaml": {"defenses": ["nonesuch"], "attacks": ["knockoff"]},
                       "pipe_lr.yaml": {"train": {"lr": -0.1}}}.items():
        at(name).write_text(yaml.safe_dump(body))
    at("broken.yaml").write_text("train: {epochs: 1\n  lr: [")
    # imports (bring your own model)
    at("user_models.py").write_text(_USER_MODELS)
    at("changing.py").write_text(_USER_MODELS)
    from edgeguard.importing import import_model

    import_model(f"{p['changing_py']}:good", out=at("changed"), input_shape=(1, 32, 32), classes=10)
    with open(p["changing_py"], "a") as f:
        f.write("\n# edited after the import\n")
    spec = importlib.util.spec_from_file_location("faults_user_models", p["user_models_py"])
    um = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(um)
    torch.save(um.other().state_dict(), at("other_arch.pt"))
    import sys

    sys.modules["faults_user_models"] = um  # pickling a whole model needs its class importable, as in user code
    try:
        torch.save(um.good(), at("whole_model.pt"))  # a pickled nn.Module, as torch.save(model) writes it
    finally:
        del sys.modules["faults_user_models"]
    h = torch.export.Dim("h", min=8, max=64)
    ep = torch.export.export(um.good().eval(), (torch.rand(2, 1, 32, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1), 2: h, 3: h},))
    torch.export.save(ep, at("dynamic.pt2"))
    # outputs that must survive
    at("notes").mkdir()
    (p["notes"] / "keep.txt").write_text("mine")
    at("file.txt").write_text("mine")
    # sanity: a path with a space and non-ASCII letters works end to end
    export_bundle(p["b"], root / "exports ü" / "m.onnx")
    p["exported"] = root / "exports ü" / "m.onnx"
    p["demo_yaml"] = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    return {k: str(v) for k, v in p.items()}


# (id, argv, exit code, pattern the one stderr line must match).  {name} is a workspace path; OUT is a fresh path.
CASES = [
    ("import-other-architecture", "import {user_models_py}:good --weights {other_arch_pt} --input-shape 1,32,32 "
     "--classes 10 --out OUT", 2, r"other_arch\.pt does not fit the model: 4 missing \('conv\.weight', 'conv\.bias', "
     r"'fc\.weight', \.\.\.\); 4 unexpected \('1\.weight', '1\.bias', '3\.weight', \.\.\.\)"),
    ("import-factory-raises", "import {user_models_py}:raises --input-shape 1,32,32 --classes 10 --out OUT", 2,
     r"factory .*user_models\.py:raises raised RuntimeError: no GPU named cuda:7"),
    ("import-output-not-n-classes", "import {user_models_py}:badshape --input-shape 1,32,32 --classes 10 --out OUT", 2,
     r"outputs shape \(4, 10, 1\) for 4 images, not \(N, classes\)"),
    ("import-wrong-classes", "import {user_models_py}:good --input-shape 1,32,32 --classes 7 --out OUT", 2,
     r"the head fc has 10 outputs but the model has 7 classes"),
    ("import-wrong-classes-dataset", "import {user_models_py}:good --factory-arg k=7 --dataset digits --out OUT", 2,
     r"the head fc has 7 outputs but the model has 10 classes"),
    ("import-pickled-whole-model", "import {user_models_py}:good --weights {whole_model_pt} --input-shape 1,32,32 "
     "--classes 10 --out OUT", 2, r"whole_model\.pt is a pickled Python object \(a whole model\), not a state dict"),
    ("import-pickled-as-pt2", "import {whole_model_pt} --input-shape 1,32,32 --classes 10 --out OUT", 2,
     r"whole_model\.pt is a saved PyTorch file, not a model source: a pickled whole model is refused"),
    ("import-factory-changed", "export {changed} --out OUT.onnx", 2,
     r"factory file .*changing\.py changed since the model was imported"),
    ("import-dynamic-spatial", "import {dynamic_pt2} --classes 10 --out OUT", 2,
     r"dynamic\.pt2 has dynamic spatial dimensions: give --input-shape C,H,W"),
    ("import-bad-source", "import nonsense --classes 10 --out OUT", 2, r"'nonsense' is not a model source"),
    # --- files: empty, truncated, random bytes, a folder, links, other models ---------------------------------
    ("info-empty-onnx", "info {empty_onnx}", 2, r"empty\.onnx is not a valid ONNX model"),
    ("info-truncated-onnx", "info {trunc_onnx}", 2, r"trunc\.onnx is not a valid ONNX model"),
    ("info-random-bytes", "info {random_onnx}", 2, r"random\.onnx is not a valid ONNX model"),
    ("info-folder-not-bundle", "info {dir_onnx}", 2, r"dir\.onnx is a folder but not an edgeguard bundle"),
    ("info-symlink-loop", "info {loop_onnx}", 2, r"loop\.onnx is a symbolic link that leads nowhere"),
    ("info-dangling-link", "info {dangling_onnx}", 2, r"dangling\.onnx is a symbolic link that leads nowhere"),
    ("info-missing", "info {root}/absent.onnx", 2, r"absent\.onnx does not exist"),
    ("evaluate-other-input-shape", "evaluate {rgb8_onnx} --dataset digits", 2, r"images are \(1, 32, 32\) but .*rgb8\.onnx takes \(3, 8, 8\)"),
    ("evaluate-other-class-count", "evaluate {seven_onnx} --dataset digits", 2, r"has 10 classes but .*seven\.onnx outputs 7"),
    ("evaluate-two-outputs", "evaluate {twoout_onnx} --dataset digits", 2, r"twoout\.onnx has 2 outputs"),
    ("evaluate-not-a-classifier", "evaluate {image2image_onnx} --dataset digits", 2, r"image2image\.onnx outputs shape .* not \(N, classes\)"),
    ("evaluate-truncated", "evaluate {trunc_onnx} --dataset digits", 2, r"trunc\.onnx is not a valid ONNX model"),
    ("bench-empty", "bench {empty_onnx} --iterations 2", 2, r"empty\.onnx is not a valid ONNX model"),
    ("bench-one-bad-of-two", "bench {b_onnx} {random_onnx} --iterations 2", 2, r"random\.onnx is not a valid ONNX model"),
    ("golden-random-bytes", "golden {random_onnx} --out OUT.npz --n 8", 2, r"random\.onnx is not a valid ONNX model"),
    ("golden-check-random-goldens", "golden-check {b_onnx} {random_onnx}", 2, r"random\.onnx is not an edgeguard golden file"),
    ("golden-check-empty-goldens", "golden-check {b_onnx} {empty_onnx}", 2, r"empty\.onnx is not an edgeguard golden file"),
    ("golden-check-other-model", "golden-check {rgb8_onnx} {b_golden_npz}", 2, r"rgb8\.onnx"),
    ("golden-check-folder", "golden-check {b_onnx} {dir_onnx}", 2, r"dir\.onnx"),
    ("build-engine-no-tensorrt", "build-engine {b_onnx} --out OUT.engine", 3, r"TensorRT is not installed"),
    ("verify-two-outputs", "verify {twoout_onnx} --vault {b}/vault", 2, r"twoout\.onnx has 2 outputs|vault"),
    ("verify-missing-vault", "verify {b_onnx} --vault {root}/novault", 2, r"novault does not exist"),
    ("verify-empty-vault", "verify {b_onnx} --vault {b}", 2, r"holds neither a watermark nor a fragile enrolment"),
    ("extract-random-bytes", "attack extract {random_onnx} --method knockoff --budget 10 --out OUT", 2, r"random\.onnx is not a valid ONNX model"),
    ("extract-other-shape", "attack extract {rgb8_onnx} --method knockoff --budget 10 --query-set digits --out OUT", 2, r"\(3, 8, 8\)"),
    ("fragile-empty-onnx", "protect fragile {empty_onnx} --out OUT", 2, r"empty\.onnx is not a valid ONNX model"),
    ("export-onnx-as-bundle", "export {b_onnx} --out OUT.onnx", 2, r"b\.onnx is already an edgeguard artifact"),
    ("export-third-party-two-outputs", "export {twoout_onnx} --out OUT.onnx", 2,
     r"twoout\.onnx has 2 outputs \(y, z\); a classifier returns one .*extract_model"),
    ("export-third-party-not-a-classifier", "export {image2image_onnx} --out OUT.onnx", 2,
     r"output 'y' has shape \[None, 1, 32, 32\], not \(N, classes\)"),
    ("export-third-party-fixed-batch", "export {batch1_onnx} --out OUT.onnx", 2, r"batch dimension is fixed at 1"),
    ("export-third-party-mean-channels", "export {rgb8_onnx} --mean 0.5,0.5 --out OUT.onnx", 2,
     r"--mean has 2 values; the input has 3 channels"),
    ("export-third-party-not-probabilities", "export {logits_onnx} --outputs probabilities --out OUT.onnx", 2,
     r"--outputs probabilities, but .*logits\.onnx does not return distributions: row \d+ (has a negative|sums to)"),
    ("export-third-party-host-defense", "export {logits_onnx} --defense modelguard_w --defense-param solver=lp "
     "--out OUT.onnx", 2, r"modelguard_w"),
    ("export-third-party-wrong-shape", "export {logits_onnx} --input-shape 3,32,32 --out OUT.onnx", 2,
     r"--input-shape 3,32,32 does not match the graph's NCHW input \[1, 32, 32\]"),
    ("export-wrap-flags-on-a-bundle", "export {b} --mean 0.5 --out OUT.onnx", 2, r"describe a third-party \.onnx"),
    ("quantize-onnx-as-bundle", "quantize {b_onnx} --out OUT", 2, r"b\.onnx"),
    # --- bundles: tampered, hash mismatch, missing file, malicious pickle, broken manifest -------------------
    ("export-tampered-manifest", "export {tampered} --out OUT.onnx", 2, r"does not fit architecture 'resnet18': \d+ missing tensors"),
    ("export-hash-mismatch", "export {hashbad} --out OUT.onnx", 2, r"model\.pt does not match the sha256 recorded"),
    ("export-missing-weights", "export {missing} --out OUT.onnx", 2, r"missing is missing model\.pt"),
    ("export-malicious-pickle", "export {evil} --out OUT.onnx", 2, r"evil/model\.pt is not a plain PyTorch state dict"),
    ("info-malicious-pickle", "info {evil}", 2, r"not a plain PyTorch state dict"),
    ("evaluate-malicious-pickle", "evaluate {evil} --dataset digits", 2, r"not a plain PyTorch state dict"),
    ("quantize-malicious-pickle", "quantize {evil} --out OUT", 2, r"not a plain PyTorch state dict"),
    ("watermark-malicious-pickle", "protect watermark {evil} --out OUT", 2, r"not a plain PyTorch state dict"),
    ("magicguard-hash-mismatch", "protect magicguard {hashbad} --out OUT", 2, r"does not match the sha256"),
    ("finetune-missing-weights", "attack finetune {missing} --mode ftll --out OUT", 2, r"is missing model\.pt"),
    ("golden-tampered", "golden {tampered} --out OUT.npz --n 4", 2, r"does not fit architecture"),
    ("export-broken-manifest", "export {badjson} --out OUT.onnx", 2, r"manifest"),
    ("export-zero-classes", "export {noclasses} --out OUT.onnx", 2, r"noclasses"),
    # --- data ---------------------------------------------------------------------------------------------------
    ("train-npz-nan", "train --dataset npz --data-root {nan_npz} --epochs 1 --out OUT", 2, r"nan\.npz: 'x' holds 1 NaN or infinite"),
    ("train-npz-inf", "train --dataset npz --data-root {inf_npz} --epochs 1 --out OUT", 2, r"inf\.npz: 'x' holds 1 NaN or infinite"),
    ("train-npz-complex", "train --dataset npz --data-root {complex_npz} --epochs 1 --out OUT", 2, r"must hold uint8 .* or float .* got complex64"),
    ("train-npz-rank", "train --dataset npz --data-root {rank2_npz} --epochs 1 --out OUT", 2, r"got shape \(20, 8\)"),
    ("train-npz-labels-out-of-range", "train --dataset npz --data-root {highlabels_npz} --data-option num_classes=10 --epochs 1 --out OUT", 2, r"'y' must lie in 0\.\.9, found 109"),
    ("train-npz-negative-labels", "train --dataset npz --data-root {neglabels_npz} --epochs 1 --out OUT", 2, r"negative label \(-5\)"),
    ("train-npz-float-labels", "train --dataset npz --data-root {floatlabels_npz} --epochs 1 --out OUT", 2, r"integer class labels, got float64"),
    ("train-npz-empty", "train --dataset npz --data-root {emptyarrays_npz} --epochs 1 --out OUT", 2, r"holds no labels"),
    ("train-npz-length-mismatch", "train --dataset npz --data-root {mismatch_npz} --epochs 1 --out OUT", 2, r"20 images in 'x' but 5 labels"),
    ("train-npz-no-labels", "train --dataset npz --data-root {noy_npz} --epochs 1 --out OUT", 2, r"noy\.npz"),
    ("train-npz-out-of-range-pixels", "train --dataset npz --data-root {toobright_npz} --epochs 1 --out OUT", 2, r"must lie in \[0, 1\]"),
    ("train-npz-pickled", "train --dataset npz --data-root {pickled_npz} --epochs 1 --out OUT", 2, r"pickled\.npz is not a readable \.npz archive"),
    ("train-npz-text", "train --dataset npz --data-root {text_npz} --epochs 1 --out OUT", 2, r"text\.npz is not a readable \.npz archive"),
    ("train-imagefolder-corrupt-jpeg", "train --dataset imagefolder --data-root {corrupt} --epochs 1 --out OUT", 2, r"broken\.jpg is not an image Pillow can decode"),
    ("train-imagefolder-text-as-png", "train --dataset imagefolder --data-root {fakepng} --epochs 1 --out OUT", 2, r"notes\.png is not an image Pillow can decode"),
    ("evaluate-npz-class-count", "evaluate {b_onnx} --dataset npz --data-root {highlabels_npz}", 2, r"has 110 classes but .* outputs 10"),
    ("evaluate-npz-nan", "evaluate {b_onnx} --dataset npz --data-root {nan_npz}", 2, r"NaN or infinite"),
    ("quantize-calibration-nan", "quantize {b} --calib-dataset npz --data-root {nan_npz} --out OUT", 2, r"NaN or infinite"),
    # --- configs ------------------------------------------------------------------------------------------------
    ("train-config-unknown-key", "train --config {unknownkey_yaml} --out OUT", 2, r"unknown parameter 'trian'"),
    ("train-config-wrong-type", "train --config {wrongtype_yaml} --out OUT", 2, r"'epochs' must be an int \(got 'many'\)"),
    ("train-config-negative-epochs", "train --config {negepochs_yaml} --out OUT", 2, r"epochs must be at least 1"),
    ("train-config-not-a-mapping", "train --config {list_yaml} --out OUT", 2, r"must hold a mapping at the top level"),
    ("train-config-broken-yaml", "train --config {broken_yaml} --out OUT", 2, r"broken\.yaml is not valid YAML"),
    ("train-config-missing", "train --config {root}/absent.yaml --out OUT", 2, r"absent\.yaml does not exist"),
    ("train-negative-epochs-flag", "train --dataset digits --epochs -1 --out OUT", 2, r"epochs must be at least 1"),
    ("pipeline-broken-yaml", "pipeline --config {broken_yaml} --out OUT", 2, r"is not valid YAML"),
    ("pipeline-unknown-key", "pipeline --config {unknownkey_yaml} --out OUT", 2, r"unknown parameter 'trian'"),
    ("pipeline-negative-lr", "pipeline --config {pipe_lr_yaml} --out OUT", 2, r"lr"),
    ("grid-negative-budget", "evaluate grid --config {grid_budget_yaml} --out OUT", 2, r"budget must be a positive integer"),
    ("grid-unknown-defense", "evaluate grid --config {grid_nodefense_yaml} --out OUT", 2, r"unknown defense 'nonesuch'"),
    # --- outputs: existing folders and files, unwritable places --------------------------------------------------
    ("train-out-nonempty-folder", "train --dataset digits --epochs 1 --out {notes}", 2, r"refusing to overwrite .*notes"),
    ("train-out-a-file", "train --dataset digits --epochs 1 --out {file_txt}", 2, r"refusing to overwrite .*file\.txt"),
    ("train-out-unwritable", "train --dataset digits --epochs 1 --max-steps 1 --out /proc/edgeguard-bundle", 2, r"/proc/edgeguard-bundle"),
    ("export-out-unwritable", "export {b} --out /proc/edgeguard.onnx", 2, r"cannot access /proc/edgeguard\.onnx"),
    ("export-out-not-onnx", "export {b} --out {file_txt}", 2, r"must end in \.onnx"),
    ("export-out-under-a-file", "export {b} --out {file_txt}/m.onnx", 2, r"file\.txt"),
    ("quantize-out-nonempty-folder", "quantize {b} --out {notes}", 2, r"refusing to overwrite .*notes"),
    ("watermark-out-a-file", "protect watermark {b} --out {file_txt}", 2, r"refusing to overwrite .*file\.txt"),
    ("finetune-out-nonempty-folder", "attack finetune {b} --mode ftll --out {notes}", 2, r"refusing to overwrite .*notes"),
    ("extract-out-a-file", "attack extract {b_onnx} --method knockoff --budget 10 --out {file_txt}", 2, r"file\.txt"),
    ("pipeline-out-nonempty-folder", "pipeline --config {demo_yaml} --out {notes}", 2, r"notes.* not an edgeguard run"),
    ("grid-out-nonempty-folder", "evaluate grid --config {root}/../grid_ok.yaml --out {notes}", 2, r"not an edgeguard grid run"),
    ("json-unwritable", "info {b_onnx} --json /proc/edgeguard.json", 2, r"/proc/edgeguard\.json"),
    ("golden-out-under-a-file", "golden {b_onnx} --out {file_txt}/g.npz --n 4", 2, r"file\.txt"),
    ("fragile-out-a-file", "protect fragile {b_onnx} --out {file_txt}", 2, r"file\.txt"),
    # --- serve: refused before any server starts --------------------------------------------------------------
    ("serve-empty-onnx", "serve {empty_onnx}", 2, r"empty\.onnx is not a valid ONNX model"),
    ("serve-two-outputs", "serve {twoout_onnx}", 2, r"twoout\.onnx has 2 outputs"),
    ("serve-malicious-pickle", "serve {evil}", 2, r"not a plain PyTorch state dict"),
    ("serve-bad-name", "serve {b_onnx} --name bad/name", 2, r"--name 'bad/name'"),
    ("serve-bad-port", "serve {b_onnx} --http-port 0", 2, r"ports must lie in 1\.\.65535"),
]


@pytest.fixture(scope="module")
def grid_ok(ws):
    """A valid grid config beside the workspace (for the run-folder case)."""
    import yaml

    path = Path(ws["root"]).parent / "grid_ok.yaml"
    path.write_text(yaml.safe_dump({"victim": {"bundle": ws["b"]}, "attacks": [{"method": "knockoff", "params": {"budget": 10}}]}))
    return path


def _argv(template: str, ws: dict[str, str], out: Path) -> list[str]:
    return [tok.format(**ws).replace("OUT", str(out)) for tok in shlex.split(template)]


@pytest.mark.parametrize("argv, code, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_fault(ws, grid_ok, capsys, snapshot, argv, code, pattern):
    if argv.startswith("serve") and importlib.util.find_spec("pytriton") is None:
        pytest.skip("serve needs the [serve] extra")
    root = Path(ws["root"])
    out = root / "fresh output ü"
    before = snapshot(root)
    capsys.readouterr()
    rc = main(_argv(argv, ws, out))
    _, err = capsys.readouterr()
    assert rc == code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if lines and lines[-1].startswith("Error: "):  # click's usage error: its usage block, then one Error line
        assert rc == 2 and lines[0].startswith("Usage: edgeguard "), err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert lines[0].startswith(("edgeguard: error: ", "Error: ")), err
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(root) == before, "the workspace changed"  # nothing written, no temp file left
    assert not Path(ws["marker"]).exists(), "the malicious pickle ran"


def test_the_corpus_is_large_and_names_every_command():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)) and len(CASES) >= 60
    commands = {" ".join(t for t in shlex.split(c[1])[:2] if not t.startswith(("-", "{"))) for c in CASES}
    firsts = {c.split()[0] for c in commands}
    assert {"train", "protect", "quantize", "export", "evaluate", "verify", "attack", "bench", "golden", "golden-check",
            "build-engine", "pipeline", "info", "serve"} <= firsts
    assert {"protect watermark", "protect magicguard", "protect fragile", "attack finetune", "attack extract",
            "evaluate grid"} <= commands


def test_paths_with_spaces_and_unicode_work(ws, capsys):
    root = Path(ws["root"])
    capsys.readouterr()
    assert main(["info", ws["exported"], "--json", str(root / "exports ü" / "info ü.json")]) == 0
    info = json.loads((root / "exports ü" / "info ü.json").read_text())
    assert info["kind"] == "onnx" and ws["exported"] in json.dumps(info, ensure_ascii=False)
    (root / "exports ü" / "info ü.json").unlink()
