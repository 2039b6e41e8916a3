"""A real Triton Inference Server (``edgeguard serve``, PyTriton's tritonserver on CPU) on 127.0.0.1, checked through
HTTP and gRPC with the same Runner interface as a file: parity with ONNX Runtime, watermark and fragile verdicts,
the extraction budget against Triton's own statistics, SIGTERM mid-load, bad input.

Every request goes to 127.0.0.1 with bounded counts and timeouts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from edgeguard.cli import main  # noqa: E402
from edgeguard.errors import BadInput, RemoteError  # noqa: E402
from edgeguard.runtime import open_runner, remote_settings  # noqa: E402
from edgeguard.serve import ServeConfig, ServerProcess, free_ports  # noqa: E402

pytestmark = pytest.mark.slow


class Server(ServerProcess):
    """``edgeguard serve`` in a child process on free loopback ports, model name ``m``."""

    def __init__(self, artifact, tmp=None):
        http, grpc, metrics = free_ports(3)
        super().__init__(artifact, ServeConfig(name="m", http_port=http, grpc_port=grpc, metrics_port=metrics))

    def stop(self) -> float:
        return super().stop(kill_after=20)


def _cmdline_has(proc: Path, needle: bytes) -> bool:
    try:
        return needle in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def tritonservers_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _survivors(pids: list[int], grace_s: float = 5.0) -> list[int]:
    # a zombie (an orphan the container's init has not reaped yet) counts as gone
    from edgeguard.serve.triton import _running

    deadline = time.monotonic() + grace_s
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.fixture(scope="module")
def protected(tiny_bundle, tmp_path_factory):
    """A watermarked bundle exported to ONNX, with a vault holding the watermark key and a fragile enrolment."""
    from edgeguard.api import export_bundle
    from edgeguard.protect import WatermarkConfig, embed_watermark
    from edgeguard.protect.fragile import FragileConfig, protect_fragile

    tmp = tmp_path_factory.mktemp("served")
    wm = embed_watermark(tiny_bundle, tmp / "wm", WatermarkConfig(n_triggers=30, epochs=12), key_seed=7)
    onnx_path = tmp / "wm.onnx"
    export_bundle(wm.bundle, onnx_path)
    vault = tmp / "vault"
    shutil.copytree(Path(wm.bundle) / "vault", vault)
    protect_fragile(onnx_path, vault / "fragile", FragileConfig(n=20, steps=100))
    return onnx_path, vault


@pytest.fixture(scope="module")
def server(protected, tmp_path_factory):
    srv = Server(protected[0])
    yield srv
    took = srv.stop()
    assert srv.proc.returncode == 0 and took < 10, (srv.proc.returncode, took)


def test_http_and_grpc_answer_like_onnx_runtime(server, protected, digits_test):
    x = digits_test.images[:200].numpy()
    with open_runner(protected[0]) as r:
        ref = r.predict(x)
    for url in (server.ready["http"], server.ready["grpc"]):
        with open_runner(url) as remote:
            assert remote.info.sha256 and remote.info.classes == r.info.classes
            assert remote.info.input_shape == r.info.input_shape and remote.info.precision == "fp32"
            got = remote.predict(x)
            assert remote.rows_sent == 200
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
        assert (got.argmax(1) == ref.argmax(1)).all()


def test_model_config_carries_public_info_and_no_secret(server, protected):
    """The config's edgeguard parameter: precision, defense, shape, classes, sha256; nothing from the vault."""
    import urllib.request

    from edgeguard.fileio import sha256_file

    cfg = json.loads(urllib.request.urlopen(server.ready["http"] + "/config", timeout=10).read())
    pub = json.loads(cfg["parameters"]["edgeguard"]["string_value"])
    assert pub["sha256"] == sha256_file(protected[0]) and pub["precision"] == "fp32" and pub["defense"]["name"] == "none"
    assert cfg["max_batch_size"] == 64 and "max_queue_delay_microseconds" in cfg["dynamic_batching"]
    text = json.dumps(cfg)
    for secret in ("key_seed", "trigger", "labels", "fragile", "vault"):
        assert secret not in text


def test_verify_through_the_server_matches_the_file(server, protected, tmp_path):
    onnx_path, vault = protected
    assert main(["verify", str(onnx_path), "--vault", str(vault), "--json", str(tmp_path / "file.json")]) == 0
    for url in (server.ready["http"], server.ready["grpc"]):
        assert main(["verify", url, "--vault", str(vault), "--timeout", "20", "--json", str(tmp_path / "srv.json")]) == 0
        f, s = (json.loads((tmp_path / n).read_text()) for n in ("file.json", "srv.json"))
        assert s["watermark"]["matches"] == f["watermark"]["matches"] and s["watermark"]["verdict"] == "present"
        assert s["watermark"]["p_value"] == f["watermark"]["p_value"]
        assert s["fragile"]["verdict"] == "intact" and s["artifact"]["path"] == url
        assert s["artifact"]["details"]["transport"] in ("triton-http", "triton-grpc")


def test_extraction_budget_agrees_with_tritons_statistics(server, protected, tmp_path, capsys):
    url = server.ready["http"]
    os.environ["EDGEGUARD_TRITON_TOKEN"] = server.token
    try:
        with open_runner(url) as r:
            before = r.server_statistics()["inference_count"]
        rc = main(["-q", "attack", "extract", url, "--method", "knockoff", "--budget", "500", "--epochs", "3",
                   "--reference", str(protected[0]), "--out", str(tmp_path / "stolen"), "--json", str(tmp_path / "a.json")])
        assert rc == 0, capsys.readouterr().err
        with open_runner(url) as r:
            after = r.server_statistics()["inference_count"]
    finally:
        del os.environ["EDGEGUARD_TRITON_TOKEN"]
    res = json.loads((tmp_path / "a.json").read_text())
    assert res["queries_used"] <= 500 and after - before <= 500
    assert res["server"]["inference_rows"] == res["queries_used"] == after - before == res["server"]["rows_sent"]
    assert res["fidelity"] is not None and 0 <= res["fidelity"] <= 1


def test_sigterm_mid_load_ends_every_call_and_the_server(protected, tmp_path, digits_test):
    srv = Server(protected[0])
    children = [c for c in tritonservers_of(srv.proc.pid) if _cmdline_has(Path(f"/proc/{c}"), b"tritonserver")]
    assert children, "serve started no tritonserver"
    x = digits_test.images[:64].numpy()
    outcomes: list[tuple[str, float]] = []
    stop = threading.Event()

    def client(url):
        with remote_settings(timeout_s=5.0, retries=1, backoff_s=0.1):
            try:
                r = open_runner(url)
            except (BadInput, RemoteError) as e:
                outcomes.append((f"open: {e}", 0.0))
                return
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r.predict(x)
                except RemoteError as e:  # the server went away: exit 4's class, never a bad-input error
                    outcomes.append((str(e), time.perf_counter() - t0))
                    break
            r.close()

    threads = [threading.Thread(target=client, args=(u,)) for u in (srv.ready["http"], srv.ready["grpc"]) * 2]
    for t in threads:
        t.start()
    time.sleep(1.5)
    took = srv.stop()
    stop.set()
    for t in threads:
        t.join(timeout=15)
    assert not any(t.is_alive() for t in threads), "a client call hung"
    assert took < 10 and srv.proc.returncode == 0
    assert all(secs <= 5.0 * 2 + 1 for _, secs in outcomes), outcomes  # each call: its timeout, one retry
    assert all("Traceback" not in msg for msg, _ in outcomes)
    assert not _survivors(children), "tritonserver outlived serve"
    prefix = f"pytrtion{srv.proc.pid}-".encode()
    stubs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, prefix)]
    assert not stubs, "a Python-backend stub outlived serve"


def test_serve_bad_input_is_one_sentence(protected, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cases = [
            (["serve", str(protected[0]), "--http-port", str(port)], 2, f"port {port}"),
            (["serve", str(tmp_path / "missing.onnx")], 2, "does not exist"),
            (["serve", str(protected[0]), "--name", "a/b"], 2, "model name"),
            (["serve", str(protected[0]), "--http-port", "9000", "--grpc-port", "9000"], 2, "must differ"),
            (["serve", "http://127.0.0.1:1/v2/models/m"], 2, "local artifact"),
        ]
        for argv, code, words in cases:
            p = subprocess.run([sys.executable, "-m", "edgeguard", *argv], capture_output=True, text=True, timeout=120)
            assert p.returncode == code, (argv, p.stderr)
            err = p.stderr.strip().splitlines()
            assert len(err) == 1 and words in err[0] and "Traceback" not in p.stderr, (argv, p.stderr)
    finally:
        busy.close()


def test_remote_bad_input_is_one_sentence(server, protected, tmp_path, capsys):
    http, grpc = server.ready["http"], server.ready["grpc"]
    dead = f"http://127.0.0.1:{free_ports(1)[0]}/v2/models/m"
    assert main(["evaluate", dead, "--timeout", "2"]) == 4  # the server failed, not the user
    assert "cannot reach" in capsys.readouterr().err
    cases = [
        (["evaluate", http.replace("/models/m", "/models/nope")], "has no model 'nope'"),
        (["evaluate", grpc.replace("/models/m", "/models/nope")], "has no model 'nope'"),
        (["evaluate", "http://127.0.0.1:8000/v1/models/m"], "no model path"),
        (["evaluate", "ftp://127.0.0.1/v2/models/m"], "unsupported endpoint scheme"),
        (["evaluate", http, "--dataset", "synthetic"], "takes"),  # a 3x32x32 dataset against a 1x32x32 model
        (["verify", http], "needs the owner's vault"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    with open_runner(http) as r, pytest.raises(BadInput, match=r"does not match http.*.s N x 1x32x32"):
        r.predict(np.zeros((2, 1, 8, 8), np.float32))


def test_max_qps_spaces_requests(server, digits_test):
    x = digits_test.images[:10].numpy()
    with remote_settings(max_qps=20.0), open_runner(server.ready["grpc"], batch_size=1) as r:
        t0 = time.perf_counter()
        r.predict(x)
        took = time.perf_counter() - t0
    assert r.requests == 10 and took >= 9 / 20.0 - 0.02, took


def test_serve_under_pressure_then_tritonserver_killed(protected, digits_test):
    """32 concurrent clients for 30 s, then tritonserver SIGKILLed under them: every call ends within its deadline
    with a RemoteError (exit 4's class), a CLI client exits 4 with one line, serve exits 4 with one sentence and
    leaves no process behind; a restarted server answers again."""
    srv = Server(protected[0])
    url = srv.ready["http"]
    x = digits_test.images[:8].numpy()
    timeout = 5.0
    ok, errors, calls_after = [0] * 32, [], []
    killed_at: list[float] = []
    done = threading.Event()

    def client(i):
        with remote_settings(timeout_s=timeout, retries=1, backoff_s=0.1), open_runner(url) as r:
            while not done.is_set():
                t0 = time.monotonic()
                try:
                    r.predict(x)
                    ok[i] += 1
                except RemoteError as e:
                    errors.append((i, type(e).__name__, time.monotonic() - t0, str(e)))
                    return
                except Exception as e:  # anything else is a bug
                    errors.append((i, type(e).__name__, time.monotonic() - t0, str(e)))
                    return
                if killed_at:
                    calls_after.append(time.monotonic() - t0)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(32)]
    for t in threads:
        t.start()
    cli = subprocess.Popen([sys.executable, "-m", "edgeguard", "-q", "evaluate", url, "--dataset", "mnist5k",
                            "--data-option", "size=32", "--timeout", str(timeout)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(30)
    assert sum(ok) > 100 and all(ok), ok  # every client was served under load
    assert not errors, errors[:3]
    tritons = [c for c in tritonservers_of(srv.proc.pid) if _cmdline_has(Path(f"/proc/{c}"), b"tritonserver")]
    assert tritons, "no tritonserver child found"
    for pid in tritons:
        os.kill(pid, 9)
    killed_at.append(time.monotonic())
    for t in threads:
        t.join(timeout=3 * timeout)
    done.set()
    assert not any(t.is_alive() for t in threads), "a client call hung past its deadline"
    assert len(errors) == 32 and {e[1] for e in errors} <= {"Unreachable", "DeadlineExceeded", "ProtocolViolation"}, \
        errors[:3]
    assert max(e[2] for e in errors) <= timeout + 1.0, sorted(e[2] for e in errors)[-3:]
    out, err = cli.communicate(timeout=60)
    if cli.returncode != 0:  # it may have finished its 5,000 images before the kill
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert cli.returncode == 4 and len(lines) == 1 and "Traceback" not in err, (cli.returncode, err)
    rc = srv.proc.wait(timeout=30)
    serve_err = srv.proc.stderr.read()
    lines = [ln for ln in serve_err.splitlines() if ln.strip()]
    assert rc == 4 and "Traceback" not in serve_err, (rc, serve_err[-2000:])
    assert lines and "exited unexpectedly" in lines[-1], lines[-3:]
    srv.stop()
    time.sleep(0.5)
    prefix = f"pytrtion{srv.proc.pid}-".encode()
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, prefix)]
    assert not left, "a Python-backend stub outlived serve"
    again = Server(protected[0])
    try:
        with open_runner(again.ready["http"]) as r:
            assert r.predict(x).shape == (8, 10)
    finally:
        assert again.stop() < 10 and again.proc.returncode == 0
