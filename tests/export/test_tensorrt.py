"""Engine build (``edgeguard.export.tensorrt``) without a GPU: input checks, exit 3, and the build logic against a
fake tensorrt (10.x and 11.x flavours, tests/fake_tensorrt.py).  The real builds are the ``tensorrt``-marked tests
at the end, which skip without tensorrt and a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from edgeguard.cli import main
from edgeguard.errors import BackendUnavailable, BadInput
from edgeguard.export.tensorrt import EngineConfig, build_engine, inspect_onnx, layer_node, resolve_profile
from edgeguard.runtime.trt_env import manifest_path

REMOVED_IN_11 = ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeguard: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def defended_onnx(tiny_bundle, tmp_path_factory):
    from edgeguard.api import export_bundle

    out = tmp_path_factory.mktemp("defended") / "d.onnx"
    export_bundle(tiny_bundle, out, defense="heuristic", defense_params={"beta": 0.6})
    return out


# --- pure helpers ------------------------------------------------------------------------------------------


def test_engine_config_validation():
    with pytest.raises(BadInput, match="min-batch <= opt-batch <= max-batch"):
        EngineConfig(min_batch=8, max_batch=4)
    with pytest.raises(BadInput, match="workspace"):
        EngineConfig(workspace_mib=0)
    with pytest.raises(BadInput, match="optimization level"):
        EngineConfig(optimization_level=6)
    assert EngineConfig().replace(max_batch=16).max_batch == 16


def test_resolve_profile():
    assert resolve_profile(None, EngineConfig()) == (1, 8, 64)
    assert resolve_profile(None, EngineConfig(max_batch=4)) == (1, 4, 4)
    assert resolve_profile(None, EngineConfig(min_batch=16)) == (16, 16, 64)
    assert resolve_profile(None, EngineConfig(opt_batch=128)) == (1, 128, 128)
    assert resolve_profile(1, EngineConfig()) == (1, 1, 1)
    with pytest.raises(BadInput, match="fixed batch of 1"):
        resolve_profile(1, EngineConfig(max_batch=8))


def test_layer_node_matching():
    nodes = {"node_Mul_3", "node_Sin_4"}
    assert layer_node("(Unnamed Layer* 7) [ElementWise]", "[ONNX Layer: node_Sin_4]", nodes) == "node_Sin_4"
    assert layer_node("node_Mul_3", "", nodes) == "node_Mul_3"
    assert layer_node("node_Mul_3_1", "", nodes) == "node_Mul_3"  # second layer the parser made for that node
    assert layer_node("defense/Softmax", "", nodes) == "defense/Softmax"  # every defense layer, listed or not
    assert layer_node("x", "[ONNX Layer: defense/node_Div]", set()) == "defense/node_Div"
    assert layer_node("/conv1/Conv", "[ONNX Layer: /conv1/Conv]", nodes) is None
    assert layer_node("node_Mul_30", "", nodes) is None


def test_inspect_onnx(tiny_onnx, defended_onnx, tiny_int8):
    f = inspect_onnx(tiny_onnx)
    assert f.batch_dim is None and f.output == "probabilities" and not f.has_qdq and f.precision == "fp32"
    assert all(n.startswith("defense/") for n in f.fp32_nodes)  # "none" is a softmax head
    d = inspect_onnx(defended_onnx)
    assert len(d.fp32_nodes) > len(f.fp32_nodes) and all(n.startswith("defense/") for n in d.fp32_nodes)
    assert set(d.fp32_nodes) == {n.name for n in onnx.load(str(defended_onnx)).graph.node if n.name.startswith("defense/")}
    q = inspect_onnx(Path(tiny_int8) / "model.onnx")
    assert q.has_qdq and q.precision == "int8"


def test_inspect_onnx_lists_magicguard_nodes(tiny_onnx, tmp_path):
    proto = onnx.load(str(tiny_onnx))
    names = [n.name for n in proto.graph.node[:2]]
    proto.metadata_props.add(key="edgeguard.magicguard", value=json.dumps({"site": "logits", "nodes": names}))
    p = tmp_path / "g.onnx"
    onnx.save(proto, str(p))
    nodes = inspect_onnx(p).fp32_nodes
    assert set(names) <= set(nodes) and set(nodes) - set(names) == set(inspect_onnx(tiny_onnx).fp32_nodes)


# --- refusals before tensorrt, and exit 3 ------------------------------------------------------------------


def test_bad_inputs_are_exit_2_before_tensorrt(capsys, tmp_path, tiny_onnx, no_tensorrt):
    (tmp_path / "m.txt").write_text("hi")
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 20)
    cases = [
        ([tmp_path / "missing.onnx", "--out", tmp_path / "m.engine"], "does not exist"),
        ([tmp_path / "m.txt", "--out", tmp_path / "m.engine"], "is not an ONNX file"),
        ([tmp_path / "junk.onnx", "--out", tmp_path / "m.engine"], "not a valid ONNX model"),
        ([tiny_onnx, "--out", tmp_path / "m.bin"], "must end in .engine or .plan"),
        ([tiny_onnx, "--out", tmp_path / "m.engine", "--min-batch", "8", "--max-batch", "2"], "min-batch <= opt-batch"),
        ([tiny_onnx, "--out", tmp_path / "m.engine", "--workspace", "0"], "workspace"),
    ]
    for args, msg in cases:
        rc, _, err = run(capsys, "build-engine", *args)
        assert rc == 2, err
        assert msg in one_error(err)
    assert not list(tmp_path.glob("m.*engine*"))


def test_no_tensorrt_is_exit_3_and_writes_nothing(capsys, tmp_path, tiny_onnx, no_tensorrt):
    out, j = tmp_path / "m.engine", tmp_path / "r.json"
    rc, stdout, err = run(capsys, "build-engine", tiny_onnx, "--out", out, "--json", j)
    assert rc == 3 and stdout == ""
    assert "TensorRT is not installed" in one_error(err)
    assert list(tmp_path.iterdir()) == []


def test_no_gpu_is_exit_3_and_writes_nothing(capsys, tmp_path, tiny_onnx, fake_trt):
    fake_trt(devices=0)
    rc, _, err = run(capsys, "build-engine", tiny_onnx, "--out", tmp_path / "m.engine", "--timing-cache", tmp_path / "tc")
    assert rc == 3
    assert "no CUDA GPU" in one_error(err)
    assert list(tmp_path.iterdir()) == []


# --- the build logic against a fake tensorrt ------------------------------------------------------------


def test_strongly_typed_fp32_build_trt10(tmp_path, tiny_onnx, fake_trt):
    trt, _ = fake_trt("10.3.0.26")
    out, tc = tmp_path / "m.engine", tmp_path / "tc.bin"
    res = build_engine(tiny_onnx, out, EngineConfig(timing_cache=str(tc), max_batch=32, workspace_mib=256))
    assert trt.calls["create_network"] == [1 << 1]  # STRONGLY_TYPED
    assert trt.calls["flags"] == set()  # no precision flags in a strongly typed network
    assert trt.calls["workspace"] == 256 << 20
    (name, shapes), = trt.calls["profiles"][0].items()
    assert name == "input" and shapes == ((1, 1, 32, 32), (8, 1, 32, 32), (32, 1, 32, 32))
    m = json.loads(manifest_path(out).read_text())
    assert manifest_path(out).name == "m.engine.json"
    assert m["format"] == "edgeguard-engine" and m["tensorrt_version"] == "10.3.0.26"
    assert m["gpu_name"] == "Fake Orin" and m["compute_capability"] == "8.7" and m["cuda_version"] == "12.6"
    from edgeguard.fileio import sha256_file

    assert m["engine_sha256"] == sha256_file(out) == res.sha256
    assert m["source_onnx_sha256"] == sha256_file(tiny_onnx)
    assert m["flags"]["strongly_typed"] and not m["flags"]["fp16"] and m["precision"] == "fp32"
    assert m["profile"]["max"] == [32, 1, 32, 32] and m["output"] == "probabilities"
    assert m["metadata"]["classes"] == [str(i) for i in range(10)] and m["edgeguard_version"]
    assert tc.read_bytes() == b"CACHE" and m["timing_cache"]["status"] == "created"
    build_engine(tiny_onnx, out, EngineConfig(timing_cache=str(tc)))  # second build: the cache is read back
    assert tc.read_bytes() == b"CACHE+"
    assert json.loads(manifest_path(out).read_text())["timing_cache"]["status"] == "loaded"


def test_foreign_timing_cache_is_replaced(tmp_path, tiny_onnx, fake_trt):
    fake_trt()
    tc = tmp_path / "tc.bin"
    tc.write_bytes(b"OTHERGPU cache")
    build_engine(tiny_onnx, tmp_path / "m.engine", EngineConfig(timing_cache=str(tc)))
    assert tc.read_bytes() == b"CACHE"
    assert "replaced" in json.loads(manifest_path(tmp_path / "m.engine").read_text())["timing_cache"]["status"]


def test_trt11_build_uses_no_removed_api(tmp_path, tiny_onnx, fake_trt):
    trt, _ = fake_trt("11.4.0.106")
    assert not any(hasattr(trt.BuilderFlag, f) for f in REMOVED_IN_11)
    build_engine(tiny_onnx, tmp_path / "m.engine")
    assert trt.calls["create_network"] == [0]  # strongly typed is implicit; the deprecated flag is not passed
    assert trt.calls["flags"] == set()


def test_trt11_refuses_fp16_flag_and_writes_nothing(capsys, tmp_path, tiny_onnx, fake_trt):
    trt, _ = fake_trt("11.4.0.106")
    rc, _, err = run(capsys, "build-engine", tiny_onnx, "--out", tmp_path / "m.engine", "--fp16")
    assert rc == 3
    assert "removed in TensorRT 11" in one_error(err)
    assert list(tmp_path.iterdir()) == [] and trt.calls["create_network"] == []


def test_fp16_trt10_pins_defense_layers_to_fp32(tmp_path, defended_onnx, fake_trt):
    trt, _ = fake_trt("10.3.0.26")
    res = build_engine(defended_onnx, tmp_path / "d.engine", EngineConfig(fp16=True))
    assert trt.calls["create_network"] == [0]  # weakly typed
    assert trt.calls["flags"] == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    pinned = trt.calls["pinned"]
    head = {md for md in pinned if md.startswith("[ONNX Layer: defense/")}
    assert head, "the defended graph has head layers"
    for md, (prec, outs, has_float) in pinned.items():
        if md in head and has_float:
            assert prec == "FLOAT" and set(outs.values()) == {"FLOAT"}, md
        else:  # the backbone is left to FP16; index/shape layers carry no float precision
            assert prec is None and outs == {}, md
    m = json.loads(manifest_path(tmp_path / "d.engine").read_text())
    assert m["precision"] == "fp16" and m["flags"]["precision_constraints"] == "obey" and m["fp32_by"] == "precision constraints"
    assert len(m["fp32_layers"]) == len(res.fp32_layers) > 0 and m["metadata"]["defense"]["name"] == "heuristic"


def test_int8_qdq_builds(tmp_path, tiny_int8, fake_trt):
    qdq = Path(tiny_int8) / "model.onnx"
    trt, _ = fake_trt("10.3.0.26")
    res = build_engine(qdq, tmp_path / "q.engine")
    assert res.precision == "int8" and trt.calls["flags"] == set() and trt.calls["create_network"] == [2]
    build_engine(qdq, tmp_path / "q16.engine", EngineConfig(fp16=True))
    assert {"FP16", "INT8"} <= trt.calls["flags"]  # weakly typed Q/DQ needs the INT8 flag
    assert json.loads(manifest_path(tmp_path / "q16.engine").read_text())["precision"] == "int8+fp16"


def test_cli_build_engine_json(capsys, tmp_path, tiny_onnx, fake_trt):
    fake_trt()
    j = tmp_path / "b.json"
    rc, stdout, err = run(capsys, "build-engine", tiny_onnx, "--out", tmp_path / "m.plan", "--max-batch", "16", "--json", j)
    assert rc == 0, err
    r = json.loads(j.read_text())
    assert r["profile"]["max"][0] == 16 and r["compute_capability"] == "8.7" and Path(r["manifest"]).name == "m.plan.json"
    assert "TensorRT 10.3.0.26 on Fake Orin" in stdout


def test_host_defense_graph_is_refused(tmp_path, tiny_onnx, no_tensorrt):
    proto = onnx.load(str(tiny_onnx))
    proto.metadata_props.add(key="edgeguard.defense", value=json.dumps({"name": "mad", "placement": "host"}))
    p = tmp_path / "h.onnx"
    onnx.save(proto, str(p))
    with pytest.raises(BadInput, match="on the host"):
        build_engine(p, tmp_path / "h.engine")


# --- real TensorRT (skipped without tensorrt and a GPU) ----------------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8"])
def test_real_engine_matches_golden(kind, tmp_path, tiny_onnx, tiny_int8):
    from edgeguard.evaluate.golden import GoldenConfig, check_golden, record_golden
    from edgeguard.runtime import open_runner

    src = Path(tiny_int8) / "model.onnx" if kind == "int8" else tiny_onnx
    golden = tmp_path / "g.npz"
    record_golden(src, golden, GoldenConfig(n=256))
    try:
        res = build_engine(src, tmp_path / "m.engine", EngineConfig(fp16=kind == "fp16", max_batch=64))
    except BackendUnavailable as e:  # --fp16 on TensorRT 11
        assert kind == "fp16" and "TensorRT 11" in str(e)
        return
    assert res.precision == {"fp32": "fp32", "fp16": "fp16", "int8": "int8"}[kind]
    with open_runner(tmp_path / "m.engine") as r:
        assert r.info.backend == "tensorrt" and r.info.precision == res.precision
    check = check_golden(tmp_path / "m.engine", golden)
    assert check.rule["rule"] == kind and check.passed, check.summary()
