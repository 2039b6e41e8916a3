"""INT8 quantization: graph structure per target, accuracy, watermark survival, bad inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeguard.api import evaluate_artifact, export_bundle
from edgeguard.bundle import load_bundle
from edgeguard.config import DataConfig
from edgeguard.errors import BadInput
from edgeguard.protect import WatermarkConfig, embed_watermark, verify_watermark
from edgeguard.quantize import PtqConfig, QatConfig, quantize_bundle
from edgeguard.runtime import open_runner


@pytest.fixture(scope="module")
def marked(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "marked"
    embed_watermark(tiny_bundle, out, WatermarkConfig(epochs=20), key_seed=11)
    return out


@pytest.fixture(scope="module")
def int8(marked, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    return {
        "ptq_tensorrt": quantize_bundle(marked, root / "ptq_trt", PtqConfig(target="tensorrt", calib_samples=256)).bundle,
        "ptq_cpu": quantize_bundle(marked, root / "ptq_cpu", PtqConfig(target="cpu", calibration="minmax", calib_samples=256)).bundle,
        "qat_tensorrt": quantize_bundle(marked, root / "qat_trt", QatConfig(base=PtqConfig(target="tensorrt"), epochs=1)).bundle,
    }


def _qdq(path):
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return proto, inits, [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]


@pytest.mark.parametrize("variant", ["ptq_tensorrt", "qat_tensorrt"])
def test_tensorrt_target_is_int8_zero_point_zero_per_channel_weights(int8, variant):
    """Issue #4: every Q/DQ of the tensorrt target has zero point 0 and INT8 type; weights per channel."""
    proto, inits, qdq = _qdq(f"{int8[variant]}/model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert len(qdq) >= 10
    weight_dq = 0
    for n in qdq:
        assert len(n.input) == 3, f"{n.name} has no explicit zero point"
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), f"{n.name}: zero point {zp} ({zp.dtype})"
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a stored weight
            weight_dq += 1
            assert inits[n.input[0]].dtype == np.int8
            scale = inits[n.input[1]]
            assert scale.ndim == 1 and scale.size == inits[n.input[0]].shape[0] > 1  # one scale per output channel
    assert weight_dq == 6  # 4 convs + fc + classifier of the small CNN
    # the logits stay FP32: the last nodes are Gemm then Softmax, nothing quantized after the classifier
    assert [n.op_type for n in proto.graph.node[-2:]] == ["Gemm", "Softmax"]


def test_cpu_target_is_u8_activations_s8_weights(int8):
    _, inits, qdq = _qdq(f"{int8['ptq_cpu']}/model.onnx")
    acts = {str(inits[n.input[2]].dtype) for n in qdq if n.op_type == "QuantizeLinear"}
    weights = {str(inits[n.input[0]].dtype) for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    assert acts == {"uint8"} and weights == {"int8"}


def test_int8_accuracy_and_watermark_survive(int8, marked, digits_test):
    """Issue #4: the watermark verdict stays present on INT8 ONNX for PTQ and QAT; accuracy within a point."""
    fp32 = evaluate_artifact(marked, DataConfig("digits")).accuracy
    vault = load_bundle(marked).vault
    for name, bundle in int8.items():
        onnx_path = f"{bundle}.onnx"
        export_bundle(bundle, onnx_path)
        with open_runner(onnx_path) as r:
            assert r.info.precision == "int8"
            v = verify_watermark(r, vault)
        assert v.verdict == "present" and v.matches >= 95, (name, v.matches)
        acc = evaluate_artifact(onnx_path, DataConfig("digits")).accuracy
        assert acc >= fp32 - 0.01, (name, acc, fp32)


def test_quantized_bundle_records_its_lineage_and_carries_the_vault(int8, marked):
    q = load_bundle(int8["ptq_tensorrt"])
    assert q.quantized and q.manifest["precision"] == "int8"
    assert q.manifest["quantization"]["parent_sha256"] == load_bundle(marked).sha256
    assert q.manifest["quantization"]["target"] == "tensorrt" and "model.onnx" in q.manifest["files"]
    assert q.stages[-1]["stage"] == "quantize" and q.stages[-1]["config"]["type"] == "PtqConfig"
    assert "watermark" in q.vault.names()
    qat = load_bundle(int8["qat_tensorrt"])
    assert qat.stages[-1]["config"]["type"] == "QatConfig"
    assert qat.stages[-1]["config"]["params"]["base"]["type"] == "PtqConfig"


def test_bad_quantization_inputs(int8, tiny_bundle, tmp_path):
    with pytest.raises(BadInput, match="already quantized"):
        quantize_bundle(int8["ptq_cpu"], tmp_path / "again", PtqConfig())
    with pytest.raises(BadInput, match="unknown quantization target"):
        from edgeguard.quantize.quantizers import make_specs

        make_specs("gpu", "minmax", qat=False)
    with pytest.raises(BadInput, match="calibration images are"):
        quantize_bundle(tiny_bundle, tmp_path / "rgb", PtqConfig(calib_dataset="synthetic"))
    with pytest.raises(BadInput, match="INT8 bundle"):
        embed_watermark(int8["ptq_cpu"], tmp_path / "wm", WatermarkConfig())
    assert not any(p.name in ("again", "rgb", "wm") for p in tmp_path.iterdir())


def test_excluded_layers_stay_float_and_batch_stays_dynamic(marked, tmp_path):
    """Layers named in ``exclude`` (later: MagicGuard, the defense head) get no Q/DQ; any batch size runs."""
    res = quantize_bundle(marked, tmp_path / "ex", PtqConfig(target="tensorrt", calib_samples=64, exclude=("net.classifier", "net.fc")))
    proto, inits, qdq = _qdq(f"{res.bundle}/model.onnx")
    weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 4  # the four convs only: fc and classifier weights stay FP32
    gemm_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Gemm"}
    assert all(w in inits and inits[w].dtype == np.float32 for w in gemm_weights)
    with open_runner(res.bundle) as r:
        for n in (1, 5, 300):
            assert r.predict(np.random.default_rng(n).random((n, 1, 32, 32), dtype=np.float32)).shape == (n, 10)


def test_int8_bundle_integrity_and_option_errors(int8, marked, tmp_path):
    import json
    import shutil

    copy = tmp_path / "swapped"
    shutil.copytree(int8["ptq_cpu"], copy)
    man = json.loads((copy / "manifest.json").read_text())
    del man["files"]["model.onnx"]  # an edited manifest that no longer pins the graph
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BadInput, match="must list its model.onnx"):
        open_runner(copy)
    with pytest.raises(BadInput, match="calib_samples must be >= 2"):
        PtqConfig(calib_samples=1)
    from edgeguard.export import ExportConfig

    with pytest.raises(BadInput, match="export options do not apply"):
        export_bundle(int8["ptq_cpu"], tmp_path / "x.onnx", ExportConfig(opset=17))


def test_qat_observer_freezing_after_the_first_epoch(marked, tmp_path):
    res = quantize_bundle(marked, tmp_path / "qf", QatConfig(base=PtqConfig(target="tensorrt"), epochs=2, freeze_observers_epoch=1))
    assert evaluate_artifact(res.bundle, DataConfig("digits")).accuracy >= 0.95
