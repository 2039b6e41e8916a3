"""Fast checks without a server: endpoint URLs, client settings, missing extras, and the Triton model repository
(its config.pbtxt parsed by tritonclient's own protobuf, dims against the ONNX graph)."""

from __future__ import annotations

import builtins
import json

import onnx
import pytest

from edgeguard.cli import main
from edgeguard.errors import BadInput
from edgeguard.runtime import artifact_kind, is_remote, open_runner, remote_settings
from edgeguard.runtime.remote import RemoteRunner, RemoteSettings, parse_endpoint


def test_endpoint_urls_parse_or_fail_with_one_sentence():
    ep = parse_endpoint("http://127.0.0.1:8000/v2/models/m")
    assert (ep.scheme, ep.host, ep.port, ep.model, ep.version) == ("http", "127.0.0.1", 8000, "m", "")
    ep = parse_endpoint("grpc://gpu-box:9001/v2/models/res.net-1/versions/3?max_qps=5&timeout=2")
    assert (ep.port, ep.model, ep.version, dict(ep.query)) == (9001, "res.net-1", "3", {"max_qps": "5", "timeout": "2"})
    assert parse_endpoint("grpc://h/v2/models/m").port == 8001
    for bad, words in [("ftp://h/v2/models/m", "unsupported endpoint scheme"), ("http:///v2/models/m", "names no host"),
                       ("http://h:1/v1/models/m", "no model path"), ("http://h:99999/v2/models/m", "bad endpoint URL"),
                       ("http://h/v2/models/m?speed=9", "unknown endpoint option"),
                       ("http://h/v2/models/m?max_qps=fast", "is not a number")]:
        with pytest.raises(BadInput, match=words):
            artifact_kind(bad)
    assert is_remote("http://h/v2/models/m") and not is_remote("model.onnx")


def test_settings_come_from_the_context_and_the_url():
    with remote_settings(timeout_s=3.0, max_qps=2.0):
        r = RemoteRunner("http://127.0.0.1:1/v2/models/m?retries=0")
    assert (r.settings.timeout_s, r.settings.max_qps, r.settings.retries) == (3.0, 2.0, 0)
    assert RemoteRunner("http://127.0.0.1:1/v2/models/m").settings == RemoteSettings()
    for kw in ({"timeout_s": 0}, {"retries": -1}, {"max_qps": 0.0}, {"deadline_s": 0}, {"outputs": "scores"},
               {"max_response_mb": 0}, {"recheck_every": 0}):
        with pytest.raises(BadInput):
            RemoteSettings(**kw)


def test_unreachable_server_fails_within_its_retries(capsys):
    import time

    t0 = time.perf_counter()
    assert main(["evaluate", "http://127.0.0.1:9/v2/models/m?retries=1&backoff=0.05", "--timeout", "2"]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach" in err[0] and "after 2 attempt(s)" in err[0]
    assert time.perf_counter() - t0 < 10


@pytest.fixture
def no_module(monkeypatch):
    real = builtins.__import__

    def block(*names):
        def fake(name, *a, **kw):
            if any(name == n or name.startswith(n + ".") for n in names):
                raise ImportError(f"No module named {name!r}")
            return real(name, *a, **kw)

        monkeypatch.setattr(builtins, "__import__", fake)

    return block


def test_missing_extras_exit_3(no_module, tiny_onnx, capsys):
    no_module("tritonclient", "pytriton")
    assert main(["evaluate", "grpc://127.0.0.1:9/v2/models/m"]) == 3  # HTTP needs no extra: edgeguard's own client
    assert main(["serve", str(tiny_onnx)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("pip install 'edgeguard[serve]'" in line for line in err)


def test_undefended_view_and_device_do_not_apply_to_a_url():
    with pytest.raises(BadInput, match="not an ONNX graph"):
        open_runner("http://127.0.0.1:9/v2/models/m", undefended=True)


def _parse(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_triton_repo_config_parses_and_matches_the_onnx(tiny_bundle, tmp_path):
    repo = tmp_path / "repo"
    assert main(["-q", "export", str(tiny_bundle), "--format", "triton-repo", "--out", str(repo), "--name", "digits",
                 "--defense", "heuristic", "--instances", "2", "--json", str(tmp_path / "r.json")]) == 0
    cfg = _parse(repo / "digits" / "config.pbtxt")
    graph = onnx.load(str(repo / "digits" / "1" / "model.onnx")).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert cfg.name == "digits" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    assert cfg.input[0].name == graph.input[0].name and list(cfg.input[0].dims) == dims[1:]
    assert cfg.output[0].name == graph.output[0].name and list(cfg.output[0].dims) == [10]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == cfg.instance_group[0].KIND_CPU
    pub = json.loads(cfg.parameters["edgeguard"].string_value)
    assert pub["defense"]["name"] == "heuristic" and pub["defense"]["placement"] == "graph"
    assert pub["sha256"] == json.loads((tmp_path / "r.json").read_text())["sha256"]
    ops = {n.op_type for n in graph.node}
    assert "Softmax" in ops or len(ops) > 5  # the defense head is part of the shipped graph
    # the same name again: refused, the first repository intact
    assert main(["-q", "export", str(tiny_bundle), "--format", "triton-repo", "--out", str(repo), "--name", "digits"]) == 2
    assert _parse(repo / "digits" / "config.pbtxt").instance_group[0].count == 2


def test_triton_repo_refuses_a_host_side_defense(tiny_bundle, tmp_path, capsys):
    onnx_path = tmp_path / "mad.onnx"
    assert main(["-q", "export", str(tiny_bundle), "--out", str(onnx_path), "--defense", "modelguard_w",
                 "--defense-param", "solver=lp"]) in (0, 3)
    if not onnx_path.exists():
        pytest.skip("the LP solver extra is missing")
    capsys.readouterr()
    assert main(["-q", "export", str(onnx_path), "--format", "triton-repo", "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert "edgeguard serve" in err and "undefended" in err and not (tmp_path / "repo" / "model").exists()


def test_triton_repo_from_an_exported_onnx(tiny_onnx, tmp_path):
    res_dir = tmp_path / "repo"
    assert main(["-q", "export", str(tiny_onnx), "--format", "triton-repo", "--out", str(res_dir), "--max-batch", "8"]) == 0
    assert _parse(res_dir / "model" / "config.pbtxt").max_batch_size == 8
    assert main(["-q", "export", str(tiny_onnx), "--format", "triton-repo", "--out", str(res_dir), "--name", "x",
                 "--defense", "heuristic"]) == 2  # an exported graph already carries its defense



def test_triton_repo_from_an_engine_reads_its_manifest(tiny_onnx, tmp_path, fake_trt):
    """A .plan repository (tensorrt_plan, KIND_GPU) built from the engine's manifest: names, dims, profile bound."""
    from edgeguard.export.tensorrt import EngineConfig, build_engine

    fake_trt("10.3.0.26")
    engine = tmp_path / "m.engine"
    build_engine(tiny_onnx, engine, EngineConfig(max_batch=32))
    repo = tmp_path / "repo"
    assert main(["-q", "export", str(engine), "--format", "triton-repo", "--out", str(repo), "--max-batch", "64"]) == 2
    assert main(["-q", "export", str(engine), "--format", "triton-repo", "--out", str(repo), "--max-batch", "32"]) == 0
    cfg = _parse(repo / "model" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    assert list(cfg.input[0].dims) == [1, 32, 32] and list(cfg.output[0].dims) == [10] and cfg.max_batch_size == 32
    assert (repo / "model" / "1" / "model.plan").read_bytes() == engine.read_bytes()
