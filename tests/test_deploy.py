"""deploy/jetson: Python 3.10 syntax, shell syntax, the unit and container files, and the parts that run on CPU
(serve.py over an ONNX runner, device_check.py's argument and power-file handling).  The device itself is not here."""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgeguard.runtime import open_runner

JETSON = Path(__file__).resolve().parents[1] / "deploy" / "jetson"
PY_FILES = sorted(JETSON.glob("*.py"))
SH_FILES = sorted(JETSON.glob("*.sh"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", JETSON / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_layout():
    names = {p.name for p in JETSON.iterdir()}
    assert {"Dockerfile", "README.md", "device_check.py", "serve.py", "run.sh", "edgeguard-serve.service"} <= names


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: p.name)
def test_python_files_parse_as_python_310(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
    src = path.read_text()
    for banned in ("import tomllib", "ExceptionGroup", "except*", "typing import Self"):
        assert banned not in src, f"{path.name} uses {banned} (not in Python 3.10)"


def test_feature_version_check_catches_311_syntax():
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass\n", feature_version=(3, 10))


@pytest.mark.parametrize("path", SH_FILES, ids=lambda p: p.name)
def test_shell_scripts(path):
    assert path.read_text().startswith("#!/usr/bin/env bash")
    p = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    if shutil.which("shellcheck"):
        p = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout


def test_run_sh_usage_error(tmp_path):
    p = subprocess.run(["bash", str(JETSON / "run.sh"), str(tmp_path / "missing")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("usage:")


def test_service_unit():
    text = (JETSON / "edgeguard-serve.service").read_text()
    sections = {line.strip() for line in text.splitlines() if line.startswith("[")}
    assert sections == {"[Unit]", "[Service]", "[Install]"}
    for key in ("After=docker.service network-online.target", "Restart=on-failure", "RestartSec=5",
                "WantedBy=multi-user.target", "--runtime nvidia", "serve.py --engine /models/model.engine"):
        assert key in text, key


def test_dockerfile():
    text = (JETSON / "Dockerfile").read_text()
    assert "ARG BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0" in text and "FROM ${BASE}" in text
    assert "python3-libnvinfer" in text and "cuda-python>=12.6,<13" in text
    assert "USER edgeguard" in text and "HEALTHCHECK" in text and "/health" in text
    assert "deploy/jetson/serve.py" in text


def test_device_check_missing_inputs_exit_2(tmp_path, capsys):
    dc = _load("device_check")
    rc = dc.main(["--onnx", str(tmp_path / "m.onnx"), "--golden", str(tmp_path / "g.npz"), "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_device_check_power_file_and_reuse(tmp_path, monkeypatch):
    dc = _load("device_check")
    monkeypatch.setattr(dc, "sh", lambda cmd, timeout=0: (127, "", "not found"))  # no nvpmodel in a container
    f = tmp_path / "power.txt"
    f.write_text("# nvpmodel -q\nNV Power Mode: MAXN\n0\n# jetson_clocks --show\nSOC family:tegra234\n")
    s = dc.power_state(f)
    assert s["source"] == str(f) and s["nvpmodel"] == "NV Power Mode: MAXN\n0" and s["jetson_clocks"].startswith("SOC")
    eng = tmp_path / "model.engine"
    eng.write_bytes(b"plan")
    (tmp_path / "model.engine.json").write_text(json.dumps({"source_onnx_sha256": "abc", "flags": {"fp16": False}}))
    monkeypatch.setattr(dc, "sh", lambda cmd, timeout=0: (0, "", ""))  # `edgeguard info` accepts the engine
    assert dc.reusable(eng, "abc", False)
    assert not dc.reusable(eng, "abd", False)  # another ONNX
    assert not dc.reusable(eng, "abc", True)  # another precision
    monkeypatch.setattr(dc, "sh", lambda cmd, timeout=0: (2, "", "built for compute capability 8.7"))
    assert not dc.reusable(eng, "abc", False)  # the runner refuses it here


def test_serve_over_a_cpu_runner(tiny_onnx, digits_test):
    from http.server import ThreadingHTTPServer

    serve = _load("serve")
    x = digits_test.images[:3].numpy()
    with open_runner(tiny_onnx) as runner:
        want = runner.predict(x)
        server = ThreadingHTTPServer(("127.0.0.1", 0), serve.make_handler(runner, {"status": "ok", "engine": "t"}))
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            assert json.loads(urllib.request.urlopen(base + "/health", timeout=10).read()) == {"status": "ok", "engine": "t"}
            body = json.dumps({"inputs": x.tolist(), "dtype": "float32"}).encode()
            req = urllib.request.Request(base + "/predict", data=body, headers={"Content-Type": "application/json"})
            got = json.loads(urllib.request.urlopen(req, timeout=30).read())
            np.testing.assert_allclose(np.array(got["probabilities"]), want, atol=1e-6)
            assert got["top1"] == want.argmax(1).tolist()
            buf = io.BytesIO()
            np.save(buf, x)
            req = urllib.request.Request(base + "/predict", data=buf.getvalue(), headers={"Content-Type": "application/x-npy"})
            np.testing.assert_allclose(np.array(json.loads(urllib.request.urlopen(req, timeout=30).read())["probabilities"]), want, atol=1e-6)
            bad = urllib.request.Request(base + "/predict", data=json.dumps({"inputs": [[1, 2]]}).encode(),
                                         headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bad, timeout=10)
            assert e.value.code == 400 and "N x C x H x W" in json.loads(e.value.read())["error"]
        finally:
            server.shutdown()
            server.server_close()
