"""ONNX export: parity with PyTorch on the whole test split, dynamic batch, checker, metadata."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgeguard.bundle import ModelSpec, save_bundle
from edgeguard.errors import BadInput
from edgeguard.evaluate import compare_runners, evaluate_accuracy
from edgeguard.export import ExportConfig, export_onnx
from edgeguard.models import MODELS
from edgeguard.runtime import open_runner
from edgeguard.testing import assert_parity


def test_parity_on_the_whole_digits_test_split(tiny_bundle, tiny_onnx, digits_test):
    """Issue #2 acceptance: max |Δprob| <= 1e-5 and identical top-1 on every test image."""
    x, _ = digits_test.tensors()
    with open_runner(tiny_bundle) as tb, open_runner(tiny_onnx) as to:
        res = compare_runners(tb, to, x.numpy(), atol=1e-5)
        assert res.n == 540
        assert res.passed, res
        acc_b = evaluate_accuracy(tb, digits_test)
        acc_o = evaluate_accuracy(to, digits_test)
    assert acc_b.accuracy == acc_o.accuracy
    assert acc_o.accuracy >= 0.95  # the tiny model (4 epochs) already clears the demo's bar


def test_graph_is_valid_with_dynamic_batch_and_metadata(tiny_onnx, tiny_bundle):
    proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 20
    (inp,) = proto.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["edgeguard.output"] == "probabilities"
    assert meta["edgeguard.precision"] == "fp32"
    assert '"0"' in meta["edgeguard.classes"] and meta["edgeguard.source_sha256"]
    assert not any(init.external_data for init in proto.graph.initializer)  # one self-contained file
    assert "Softmax" in {n.op_type for n in proto.graph.node}
    with open_runner(tiny_onnx) as r:
        for n in (1, 3, 257):
            assert r.predict(np.random.default_rng(n).random((n, 1, 32, 32), dtype=np.float32)).shape == (n, 10)


def test_export_contains_nothing_from_the_vault(tiny_bundle, tmp_path):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    from edgeguard.bundle import load_bundle

    secret = "owner-secret-7f3a9c"
    load_bundle(b).vault.put_json("keys", {"secret": secret})
    out = tmp_path / "m.onnx"
    export_onnx(b, out, ExportConfig(check_samples=4))
    assert secret.encode() not in out.read_bytes()


@pytest.mark.parametrize("arch", MODELS.names())
def test_every_model_exports_with_parity(arch, tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(arch, 10, tuple(map(str, range(10))), (3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), {})
    model = spec.build().eval()
    b = save_bundle(tmp_path / "b", model, spec, stages=[])
    res = export_onnx(b, tmp_path / "m.onnx", ExportConfig(check_samples=8))
    assert res.self_check_max_abs_diff <= 1e-5
    x = np.random.default_rng(0).random((8, 3, 32, 32), dtype=np.float32)
    with open_runner(b.path) as tb, open_runner(tmp_path / "m.onnx") as to:
        assert_parity(tb.predict(x), to.predict(x), atol=1e-5)


def test_export_refuses_wrong_suffix_and_writes_nothing(tiny_bundle, tmp_path):
    with pytest.raises(BadInput, match=r"must end in \.onnx"):
        export_onnx(tiny_bundle, tmp_path / "m.bin")
    assert list(tmp_path.iterdir()) == []


def test_a_broken_model_fails_the_self_check_and_writes_nothing(tmp_path):
    from edgeguard.errors import CheckFailed

    spec = ModelSpec("smallcnn", 10, tuple(map(str, range(10))), (1, 32, 32), (0.5,), (0.25,), {"width": 8})
    model = spec.build().eval()
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    b = save_bundle(tmp_path / "b", model, spec, stages=[])
    with pytest.raises(CheckFailed, match="disagrees"):
        export_onnx(b, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(CheckFailed, match="non-finite"):
        open_runner(b.path).predict(np.zeros((1, 1, 32, 32), np.float32))


def test_backbone_graph_is_reused_for_the_same_bundle_and_settings(tiny_bundle, tmp_path, monkeypatch):
    """Exports of one bundle in a row (one per defense) trace the network once; the files are identical."""
    from edgeguard.export import onnx as export_mod

    monkeypatch.setattr(export_mod, "_BACKBONES", type(export_mod._BACKBONES)())
    calls = []
    real = export_mod.to_onnx_proto
    monkeypatch.setattr(export_mod, "to_onnx_proto", lambda *a, **k: calls.append(1) or real(*a, **k))
    export_onnx(tiny_bundle, tmp_path / "a.onnx", ExportConfig(check_samples=4))
    export_onnx(tiny_bundle, tmp_path / "b.onnx", ExportConfig(check_samples=4))
    assert len(calls) == 1 and (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    export_onnx(tiny_bundle, tmp_path / "c.onnx", ExportConfig(check_samples=4, opset=18))  # other settings: traced
    assert len(calls) == 2
