"""Engine build (``edgeguard.export.tensorrt``) without a GPU: input checks, exit 3, and the build logic against a
fake tensorrt (10.x and 11.x flavours, tests/fake_tensorrt.py).  The real builds are the ``tensorrt``-marked tests
at the end, which skip without tensorrt and a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from edgeguard.cli import main
from edgeguard.errors import BackendUnavailable, BadInput, CheckFailed
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
    assert "removed in 11" in one_error(err)
    assert list(tmp_path.iterdir()) == [] and trt.calls["create_network"] == []


def test_fp16_trt10_pins_defense_layers_to_fp32(tmp_path, defended_onnx, fake_trt):
    trt, _ = fake_trt("10.3.0.26")
    res = build_engine(defended_onnx, tmp_path / "d.engine", EngineConfig(fp16=True))
    assert trt.calls["create_network"] == [0]  # weakly typed
    assert trt.calls["flags"] == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    pinned = trt.calls["pinned"]
    head = {name for name, (md, *_) in pinned.items() if md.startswith("[ONNX Layer: defense/")}
    assert head, "the defended graph has head layers"
    helpers = {name for name, (md, *_) in pinned.items() if not md}
    assert helpers, "the fake parser adds helper layers without metadata"
    for name, (_md, prec, outs, has_float) in pinned.items():
        if name in head and has_float:
            assert prec == "FLOAT" and set(outs.values()) == {"FLOAT"}, name
        elif name in helpers and has_float and prec is not None:  # a helper inside the head: pinned too
            assert prec == "FLOAT" and set(outs.values()) == {"FLOAT"}, name
        else:  # the backbone is left to FP16; index/shape layers carry no float precision
            assert prec is None and outs == {}, name
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


# --- issue 30: what would break on the first real build, and a fake as strict as TensorRT ---------------------


def test_fp32_engines_do_not_compute_in_tf32(tmp_path, tiny_onnx, fake_trt):
    """TensorRT turns TF32 on by default for FP32 Conv/Gemm; an FP32 engine clears it (and says so)."""
    trt, _ = fake_trt("10.3.0.26")
    build_engine(tiny_onnx, tmp_path / "m.engine")
    assert trt.calls["tf32_at_build"] is False and "TF32" in trt.calls["cleared"]
    assert json.loads(manifest_path(tmp_path / "m.engine").read_text())["flags"]["tf32"] is False


def test_fp16_pinning_covers_the_helper_layers_inside_the_head(tmp_path, defended_onnx, fake_trt):
    trt, _ = fake_trt("10.3.0.26")
    build_engine(defended_onnx, tmp_path / "d.engine", EngineConfig(fp16=True))
    pinned = trt.calls["pinned"]
    # the shuffle the parser adds after the head's Softmax has no metadata; its input comes from a pinned layer
    inside = [n for n, (md, prec, _, has_float) in pinned.items() if not md and has_float and prec == "FLOAT"]
    assert inside, pinned
    assert json.loads(manifest_path(tmp_path / "d.engine").read_text())["flags"]["fp32_helper_layers"] == len(inside)


def test_fp16_pinning_reads_local_function_metadata_and_refuses_uncovered_nodes(tmp_path, defended_onnx, fake_trt):
    trt, _ = fake_trt("10.3.0.26")
    trt.calls["metadata_format"] = "[ONNX Layer: model/defense_fn/{}]"  # a node inside an ONNX local function
    build_engine(defended_onnx, tmp_path / "f.engine", EngineConfig(fp16=True))
    assert any(prec == "FLOAT" for md, prec, _, _ in trt.calls["pinned"].values() if "defense/" in md)
    trt.calls["metadata_format"] = "[ONNX Layer: renamed_{}]"  # a parser that names layers another way
    with pytest.raises(CheckFailed, match="would not cover .* node"):
        build_engine(defended_onnx, tmp_path / "g.engine", EngineConfig(fp16=True))
    assert not (tmp_path / "g.engine").exists()


def test_fp16_flag_is_refused_from_10_12(capsys, tmp_path, tiny_onnx, fake_trt):
    fake_trt("10.12.0.36")
    rc, _, err = run(capsys, "build-engine", tiny_onnx, "--out", tmp_path / "m.engine", "--fp16")
    assert rc == 3 and "deprecated since 10.12" in one_error(err)
    assert list(tmp_path.iterdir()) == []
    assert main(["build-engine", str(tiny_onnx), "--out", str(tmp_path / "m.engine")]) == 0  # strongly typed: fine


def _qdq_edit(src: Path, dst: Path, edit) -> Path:
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    inits = {i.name: i for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:  # a weight's DQ (per-channel)
            edit(proto, n, inits, numpy_helper)
            break
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("rule, words", [
    ("asymmetric", "zero point must be 0"),
    ("uint8", "only INT8 quantization"),
    ("negative_scale", "Scale coefficients must all be positive"),
    ("axis", "does not match axis"),
    ("opset", "Unsupported ONNX opset 8"),
])
def test_the_fake_parser_rejects_what_tensorrt_rejects(rule, words, capsys, tmp_path, tiny_int8, fake_trt):
    import numpy as np

    qdq = Path(tiny_int8) / "model.onnx"

    def edit(proto, n, inits, nh):
        scale, zp = inits[n.input[1]], inits[n.input[2]]
        if rule == "asymmetric":
            zp.CopyFrom(nh.from_array(np.full(nh.to_array(zp).shape, 3, np.int8), zp.name))
        elif rule == "uint8":
            zp.CopyFrom(nh.from_array(np.zeros(nh.to_array(zp).shape, np.uint8), zp.name))
        elif rule == "negative_scale":
            s = nh.to_array(scale).copy()
            s.flat[0] = -s.flat[0]
            scale.CopyFrom(nh.from_array(s, scale.name))
        elif rule == "axis":
            n.attribute.append(onnx.helper.make_attribute("axis", 1))
            del n.attribute[:-1]
        elif rule == "opset":
            proto.opset_import[0].version = 8

    bad = _qdq_edit(qdq, tmp_path / f"{rule}.onnx", edit)
    fake_trt("10.3.0.26")
    rc, _, err = run(capsys, "build-engine", bad, "--out", tmp_path / "b.engine")
    assert rc == 2 and "TensorRT's ONNX parser rejected" in one_error(err) and words in err, err
    assert not (tmp_path / "b.engine").exists()


def test_the_cpu_targets_asymmetric_qdq_graph_is_refused(capsys, tmp_path, tiny_bundle, fake_trt):
    """ONNX Runtime's U8S8 layout (target cpu) is not a TensorRT graph: the parser refuses it, so does the fake."""
    from edgeguard.quantize import PtqConfig, quantize_bundle

    q = quantize_bundle(tiny_bundle, tmp_path / "cpu8", PtqConfig(target="cpu", calib_samples=64))
    fake_trt("10.3.0.26")
    rc, _, err = run(capsys, "build-engine", Path(q.bundle) / "model.onnx", "--out", tmp_path / "c.engine")
    assert rc == 2 and "only INT8 quantization" in one_error(err)


def test_the_fake_network_types_outputs_and_skips_constants_as_tensorrt_does(tmp_path, defended_onnx, fake_trt):
    trt, _ = fake_trt("10.3.0.26")
    build_engine(defended_onnx, tmp_path / "d.engine")
    proto = onnx.load(str(defended_onnx))
    layers = trt.calls["pinned"]
    consts = [n.name for n in proto.graph.node if n.op_type == "Constant"]
    assert all(f"[ONNX Layer: {c}]" not in {md for md, *_ in layers.values()} for c in consts)
    kinds = {name.rsplit("[", 1)[1].rstrip("]") for name in layers}
    assert "Constant" not in kinds and ("Cast" in kinds or "Shuffle" in kinds)

