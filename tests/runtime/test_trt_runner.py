"""TrtRunner without a GPU: the manifest checks as pure functions, exit 3 without tensorrt, and the runner's
buffer/batching logic end to end against the fake tensorrt + cuda-python of tests/fake_tensorrt.py (whose "engine"
runs the ONNX graph in ONNX Runtime on CPU).  Real engines: tests/export/test_tensorrt.py, marked ``tensorrt``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeguard.cli import main
from edgeguard.errors import BackendUnavailable, BadInput
from edgeguard.export.tensorrt import EngineConfig, build_engine
from edgeguard.runtime import open_runner
from edgeguard.runtime.trt_env import check_compatible, manifest_path, read_manifest
from edgeguard.runtime.trt_runner import plan_batches

ENV = {"tensorrt_version": "10.3.0.26", "gpu_name": "Orin", "compute_capability": "8.7", "l4t": None}


def _manifest(**over):
    m = {"format": "edgeguard-engine", "format_version": 1, "tensorrt_version": "10.3.0.26", "gpu_name": "Orin",
         "compute_capability": "8.7", "engine_sha256": "0" * 64, "metadata": {}, "profile": {}, "flags": {}}
    m.update(over)
    return m


def test_plan_batches():
    assert plan_batches(131, 4, 64) == [(0, 64, 64), (64, 128, 64), (128, 131, 4)]  # split, last chunk padded
    assert plan_batches(2, 1, 8) == [(0, 2, 2)]
    assert plan_batches(0, 1, 8) == []
    assert plan_batches(5, 5, 5) == [(0, 5, 5)]
    with pytest.raises(BadInput):
        plan_batches(3, 4, 2)


def test_check_compatible():
    check_compatible(_manifest(), ENV)  # same TensorRT and compute capability: accepted
    check_compatible(_manifest(gpu_name="Jetson AGX Orin"), ENV)  # name differs, architecture same: accepted
    with pytest.raises(BadInput, match=r"compute capability 7\.5 .* this GPU is 8\.7.*edgeguard build-engine"):
        check_compatible(_manifest(compute_capability="7.5", gpu_name="T4"), ENV)
    with pytest.raises(BadInput, match=r"TensorRT 10\.16\.0\.1 but this machine has TensorRT 10\.3\.0\.26"):
        check_compatible(_manifest(tensorrt_version="10.16.0.1"), ENV)
    with pytest.raises(BadInput, match="TensorRT 10.3.0.20"):  # even a build number differs
        check_compatible(_manifest(tensorrt_version="10.3.0.20"), ENV)
    # a version-compatible plan runs on a newer runtime, never on an older one
    check_compatible(_manifest(tensorrt_version="10.2.0.1", flags={"version_compatible": True}), ENV)
    with pytest.raises(BadInput):
        check_compatible(_manifest(tensorrt_version="10.5.0.1", flags={"version_compatible": True}), ENV)


def test_read_manifest(tmp_path):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"plan")
    with pytest.raises(BadInput, match="has no manifest m.engine.json"):
        read_manifest(eng)
    mp = manifest_path(eng)
    mp.write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        read_manifest(eng)
    mp.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BadInput, match="not an edgeguard engine manifest"):
        read_manifest(eng)
    m = _manifest()
    del m["compute_capability"]
    mp.write_text(json.dumps(m))
    with pytest.raises(BadInput, match="lacks compute_capability"):
        read_manifest(eng)
    mp.write_text(json.dumps(_manifest()))
    assert read_manifest(eng)["tensorrt_version"] == "10.3.0.26"


def test_no_tensorrt_is_exit_3_even_with_a_manifest(capsys, tmp_path, no_tensorrt):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"plan")
    manifest_path(eng).write_text(json.dumps(_manifest()))
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        open_runner(eng)
    capsys.readouterr()
    assert main(["info", str(eng)]) == 3
    assert capsys.readouterr().err.startswith("edgeguard: error: cannot run")


@pytest.fixture
def fake_engine(tmp_path, tiny_onnx, fake_trt):
    trt, rt = fake_trt("10.3.0.26")
    eng = tmp_path / "m.engine"
    build_engine(tiny_onnx, eng, EngineConfig(min_batch=4, opt_batch=16, max_batch=64))
    return eng, trt, rt


def test_runner_matches_onnx_runtime(fake_engine, tiny_onnx, digits_test):
    eng, trt, rt = fake_engine
    x = digits_test.images[:131].numpy()
    with open_runner(tiny_onnx) as ref:
        want = ref.predict(x)
    with open_runner(eng) as r:
        info = r.info
        assert (info.backend, info.precision, info.device, info.defense) == ("tensorrt", "fp32", "Fake Orin", "none")
        assert info.input_shape == (1, 32, 32) and info.num_classes == 10
        d = dict(info.details)
        assert d["buffers"] == "cuda-python" and d["profile"] == (4, 64) and d["softmax_added_by_runner"] is False
        got = r.predict(x)  # 64 + 64 + 3 rows (padded to 4)
        one = r.predict(x[:1])  # below the profile's minimum: padded
        assert len(rt.memory) == 2  # input + output buffers, allocated once
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(one, want[:1], atol=1e-6)
    assert rt.memory == {}  # freed on close
    assert trt.calls["deserialize"] == 1


def test_runner_softmax_follows_manifest(fake_engine, digits_test):
    eng, _, _ = fake_engine
    m = json.loads(manifest_path(eng).read_text())
    x = digits_test.images[:8].numpy()
    with open_runner(eng) as r:
        probs = r.predict(x)
    m["output"] = "logits"  # as for a graph without a final softmax: the runner adds one
    manifest_path(eng).write_text(json.dumps(m))
    with open_runner(eng) as r:
        again = r.predict(x)
        assert dict(r.info.details)["softmax_added_by_runner"] is True
    z = np.exp(probs - probs.max(1, keepdims=True))
    np.testing.assert_allclose(again, z / z.sum(1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("compute_capability", "7.5", "compute capability 7.5"),
    ("tensorrt_version", "10.16.0.1", "TensorRT 10.16.0.1"),
    ("engine_sha256", "f" * 64, "sha256 differs"),
])
def test_mismatch_refused_before_deserializing(capsys, fake_engine, field, value, message):
    eng, trt, _ = fake_engine
    m = json.loads(manifest_path(eng).read_text())
    m[field] = value
    manifest_path(eng).write_text(json.dumps(m))
    with pytest.raises(BadInput, match=message):
        open_runner(eng)
    capsys.readouterr()
    assert main(["evaluate", str(eng), "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "build-engine" in err
    assert trt.calls["deserialize"] == 0


def test_engine_from_other_machine_refused(fake_engine, fake_trt):
    eng, _, _ = fake_engine
    trt, _ = fake_trt("10.3.0.26", cc=(8, 9), name="RTX 4090")  # same TensorRT, another GPU architecture
    with pytest.raises(BadInput, match=r"built for compute capability 8\.7 \(Fake Orin\) but this GPU is 8\.9"):
        open_runner(eng)
    trt, _ = fake_trt("10.4.0.1")  # same GPU, another TensorRT
    with pytest.raises(BadInput, match="built with TensorRT 10.3.0.26"):
        open_runner(eng)
    assert trt.calls["deserialize"] == 0


def test_golden_check_and_info_on_engine(capsys, fake_engine, tiny_onnx, tmp_path):
    from edgeguard.evaluate.golden import GoldenConfig, check_golden, record_golden

    eng, _, _ = fake_engine
    g = tmp_path / "g.npz"
    record_golden(tiny_onnx, g, GoldenConfig(n=100))
    res = check_golden(eng, g)
    assert res.passed and res.artifact["backend"] == "tensorrt" and res.rule["rule"] == "fp32"
    capsys.readouterr()
    assert main(["info", str(eng)]) == 0
    assert "tensorrt (Fake Orin)" in capsys.readouterr().out


def test_runner_uses_its_own_stream_and_page_locked_buffers(fake_engine, digits_test):
    eng, _, rt = fake_engine
    with open_runner(eng) as r:
        r.predict(digits_test.images[:70].numpy())
        assert len(rt.pinned) == 2  # a page-locked host buffer per device buffer, allocated once
    assert rt.copies and all(stream == 7 and pinned for _, stream, pinned in rt.copies)  # cudaStreamCreate's stream
    assert rt.pinned == {}  # freed on close


def test_a_refused_input_shape_is_one_sentence_not_stale_shapes(fake_engine, digits_test):
    """``set_input_shape`` answers False (the real binding does not raise): the runner checks it."""
    eng, trt, _ = fake_engine
    trt.calls["refuse_shapes"] = {(6, 1, 32, 32)}
    with open_runner(eng) as r:
        r.predict(digits_test.images[:5].numpy())  # accepted
        with pytest.raises(BadInput, match=r"TensorRT refused the input shape \(6, 1, 32, 32\)"):
            r.predict(digits_test.images[:6].numpy())
