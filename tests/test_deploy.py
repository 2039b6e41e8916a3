"""deploy/jetson: Python 3.10 syntax, shell syntax, the unit and container files, and the parts that run on CPU
(device_check.py's argument and power-file handling; serving is `edgeguard serve`, tested in tests/serve).  The device itself is not here."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

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
    assert {"Dockerfile", "README.md", "device_check.py", "run.sh", "edgeguard-serve.service"} <= names


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
                "WantedBy=multi-user.target", "--runtime nvidia", "edgeguard serve /models/model.engine",
                "docker stop -t 15"):
        assert key in text, key


def test_dockerfile():
    text = (JETSON / "Dockerfile").read_text()
    assert "ARG BASE=nvcr.io/nvidia/l4t-jetpack:r36.4.0" in text and "FROM ${BASE}" in text
    assert "python3-libnvinfer" in text and "cuda-python>=12.6,<13" in text
    assert "USER edgeguard" in text and "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert '"/opt/edgeguard[serve]"' in text and '"edgeguard", "serve", "/models/model.engine"' in text


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


# --- deploy/gpu_check.sh (issue 15): the one-shot GPU check ---------------------------------------------------

GPU_CHECK = JETSON.parent / "gpu_check.sh"


def test_gpu_check_shell_syntax():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0


def _gpu_check_env(tmp_path, **extra):
    import os
    import sys

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    smi = fake_bin / "nvidia-smi"  # a host whose driver answers "no devices"
    smi.write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    smi.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", GPU_CHECK_BASE_PYTHON=sys.executable, **extra)
    env.pop("OUT", None)
    return env


def test_gpu_check_without_gpu_exits_3_after_the_probe(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run(["bash", str(GPU_CHECK), str(out)], env=_gpu_check_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 3, p.stderr
    env = json.loads((out / "gpu_env.json").read_text())
    assert env["gpu_found"] is False and env["gpus"] == []
    assert env["nvidia_smi"].startswith("No devices")
    assert "torch" in env["python"] and "tensorrt" in env["python"]
    assert not (out / "gpu_check.json").exists()  # nothing past the probe ran
    assert "no usable NVIDIA GPU" in p.stderr


def test_gpu_check_install_stage_reports_missing_tensorrt(tmp_path):
    import sys

    spec = importlib.util.spec_from_file_location("deploy_gpu_check", JETSON.parent / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    assert gc.install(tmp_path) == 3
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is False and "tensorrt" in report["blocked"]
    assert report["stages"]["install"]["python"]["executable"] == sys.executable


@pytest.mark.slow
def test_gpu_check_end_to_end_with_fake_tensorrt(tmp_path):
    """Every stage of the script on CPU against the fake tensorrt/cuda-python (tests/fake_trt_site): the commands,
    paths and JSON plumbing are exercised; TensorRT numerics are not (the fake engine is ONNX Runtime)."""
    import sys

    out, work = tmp_path / "out", tmp_path / "work"
    site = Path(__file__).resolve().parent / "fake_trt_site"
    env = _gpu_check_env(tmp_path, GPU_CHECK_ALLOW_CPU="1", GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_MODELS="demo",
                         GPU_CHECK_QUICK="1", GPU_CHECK_FRAGILE="0", GPU_CHECK_WORK=str(work), PYTHONPATH=str(site))
    p = subprocess.run(["bash", str(GPU_CHECK), str(out)], env=env, capture_output=True, text=True, timeout=1500)
    report = json.loads((out / "gpu_check.json").read_text())
    assert p.returncode == 0, (report.get("failures"), p.stdout[-2000:])
    engines = report["stages"]["engines"]["engines"]
    assert set(engines) == {"demo/fp32", "demo/fp32-fp16", "demo/int8", "demo/int8_heuristic", "demo/fp32_heuristic",
                            "demo/fp32_modelguard_w", "demo/fp32_magicguard", "demo/fp32_gaussian"}  # fake is 10.x
    assert engines["demo/fp32_gaussian"]["statistical"]["passed"], engines["demo/fp32_gaussian"]["statistical"]
    for key, e in engines.items():
        steps = e["device_check"]["steps"]
        assert steps["build_engine"]["rc"] == 0, key
        assert steps["golden_check"]["rc"] == 0 or key.endswith("gaussian"), key  # noise per query: no goldens
        assert e["watermark_verdict"] == e["onnx_watermark_verdict"] == "present", key
        assert e["extract"]["result"]["queries_used"] == 500, key
    rows = report["stages"]["bench"]["table"]
    assert {(r["run"], r["batch"]) for r in rows} >= {("demo/int8/trt", 1), ("demo/int8/trt", 64), ("demo/fp32/ort-cpu", 1)}
    assert "| run | backend |" in p.stdout
