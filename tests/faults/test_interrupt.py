"""Interruption and concurrency, with real ``python -m edgeguard`` processes.

SIGINT or SIGTERM in the middle of train, quantize (QAT), export (a defense that trains), protect fragile and a grid
cell: the process exits 130 / 143 with one line, the previous output is byte-for-byte intact, no temp folder or
file is left beside it, nothing partial loads as valid, and a rerun succeeds.  Two processes writing one ``--out``
at once: the survivor is one whole bundle, and each process either succeeded or failed with one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Proc:
    """A running ``edgeguard`` command whose stderr is read line by line in a thread."""

    def __init__(self, *args: str, cwd: Path):
        env = {k: v for k, v in os.environ.items() if k != "EDGEGUARD_QUIET"}  # progress lines tell where it is
        env["OMP_NUM_THREADS"] = "1"
        # Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, and an ignored signal stays
        # ignored across exec (Python then installs no KeyboardInterrupt handler), so a suite run in the background
        # would see SIGINT do nothing; the child gets the default disposition back
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeguard", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(re.search(pattern, line) for line in self.lines):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"never saw {pattern!r}; stderr: {self.lines[-5:]}")

    def finish(self, timeout: float = 120.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc


def _tmp_siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.") and p.name.endswith(".tmp"))


def _interrupt(cwd: Path, args: list[str], pattern: str, sig: signal.Signals, out: Path, snapshot) -> None:
    before = snapshot(out) if out.is_dir() else out.read_bytes() if out.exists() else None
    p = Proc(*args, cwd=cwd)
    p.wait_for(pattern)
    p.proc.send_signal(sig)
    rc = p.finish()
    words = [line for line in p.lines if line.strip()]
    assert rc == EXIT[sig], p.lines[-5:]
    assert "Traceback" not in "\n".join(p.lines)
    assert words[-1].startswith("edgeguard: " + ("interrupted" if sig == signal.SIGINT else "terminated")), words[-1]
    after = snapshot(out) if out.is_dir() else out.read_bytes() if out.exists() else None
    assert after == before, "the previous output changed"
    assert _tmp_siblings(out) == [], "a temp file or folder was left behind"


@pytest.fixture
def work(tiny_bundle, tiny_onnx, tmp_path):
    shutil.copytree(tiny_bundle, tmp_path / "b")
    shutil.copy(tiny_onnx, tmp_path / "b.onnx")
    return tmp_path


def _loads(bundle: Path) -> None:
    from edgeguard.bundle import load_bundle

    load_bundle(bundle).load_model()  # verifies every hash


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_interrupted_keeps_the_previous_bundle(work, sig, snapshot):
    out = work / "model"
    shutil.copytree(work / "b", out)  # a previous run's bundle
    _interrupt(work, ["train", "--dataset", "digits", "--epochs", "40", "--out", str(out)], r"epoch 1/40", sig, out, snapshot)
    _loads(out)
    p = Proc("train", "--dataset", "digits", "--epochs", "1", "--max-steps", "3", "--out", str(out), cwd=work)
    assert p.finish() == 0, p.lines[-3:]
    _loads(out)


def test_train_interrupted_without_a_previous_output_leaves_nothing(work, snapshot):
    out = work / "fresh"
    _interrupt(work, ["train", "--dataset", "digits", "--epochs", "40", "--out", str(out)], r"epoch 1/40", signal.SIGINT, out, snapshot)
    assert not out.exists()


def test_qat_interrupted(work, snapshot):
    out = work / "int8"
    _interrupt(work, ["quantize", "b", "--mode", "qat", "--epochs", "30", "--out", str(out)], r"QAT: epoch 1/30",
               signal.SIGTERM, out, snapshot)
    assert not out.exists()


def test_export_interrupted_while_its_defense_trains(work, snapshot):
    out = work / "am.onnx"
    out.write_bytes(b"previous file")
    _interrupt(work, ["export", "b", "--defense", "adaptive_misinformation", "--defense-param", "epochs=40",
                      "--out", str(out)], r"misinformation model: epoch 1/40", signal.SIGINT, out, snapshot)
    assert out.read_bytes() == b"previous file"


def test_fragile_interrupted(work, snapshot):
    out = work / "vault-fragile"
    _interrupt(work, ["protect", "fragile", "b.onnx", "--out", str(out)], r"fragile generator: epoch 3/", signal.SIGTERM, out, snapshot)
    assert not out.exists()


def test_grid_interrupted_mid_cell_then_resumed(work):
    import yaml

    cfg = work / "grid.yaml"
    cfg.write_text(yaml.safe_dump({
        "victim": {"bundle": str(work / "b")}, "defenses": ["none", {"name": "rounding", "params": {"decimals": 1}}],
        "attacks": [{"method": "knockoff", "params": {"budget": 300, "epochs": 6, "query_options": {"n": 400}}}],
        "seeds": [0, 1], "workers": 1}))
    out = work / "grid"
    p = Proc("evaluate", "grid", "--config", str(cfg), "--out", str(out), "--workers", "1", cwd=work)
    p.wait_for(r"x knockoff.* seed 0: ")  # the first cell is done; the next one is running
    p.proc.send_signal(signal.SIGINT)
    assert p.finish() == 130, p.lines[-5:]
    cells = sorted((out / "cells").glob("*.json"))
    assert 1 <= len(cells) < 4
    for c in cells:  # every cell on disk is whole
        rec = json.loads(c.read_text())
        assert rec["cell_id"] == c.stem and 0.0 <= rec["result"]["fidelity"] <= 1.0
    assert not list((out / "cells").glob(".*.tmp"))
    done = {c.name: c.stat().st_mtime_ns for c in cells}
    p = Proc("evaluate", "grid", "--config", str(cfg), "--out", str(out), "--workers", "1", cwd=work)
    assert p.finish(timeout=300) == 0, p.lines[-5:]
    report = json.loads((out / "grid.json").read_text())
    assert report["counts"]["done"] == 4 and report["counts"]["reused"] == len(done)
    assert {c.name: c.stat().st_mtime_ns for c in (out / "cells").glob("*.json") if c.name in done} == done


def test_two_trains_into_one_out_leave_one_whole_bundle(work):
    out = work / "shared"
    procs = [Proc("train", "--dataset", "digits", "--epochs", "1", "--max-steps", "5", "--seed", str(s), "--out", str(out),
                  "--json", str(work / f"r{s}.json"), cwd=work) for s in (1, 2)]
    rcs = [p.finish(timeout=300) for p in procs]
    for p, rc in zip(procs, rcs, strict=True):
        errors = [line for line in p.lines if line.startswith("edgeguard: error:")]
        assert rc == 0 or (rc == 2 and len(errors) == 1 and "Traceback" not in "\n".join(p.lines)), p.lines[-5:]
    assert 0 in rcs
    _loads(out)  # whole: every hash in its manifest matches
    import hashlib

    survivor = hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()  # pins model.pt's hash too
    winners = [json.loads((work / f"r{s}.json").read_text())["sha256"] for s, rc in zip((1, 2), rcs, strict=True) if rc == 0]
    assert survivor in winners  # the survivor is one of the two runs, whole, not a mix
    assert _tmp_siblings(out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_network_request_ends_with_one_line(sig):
    """Mid-flight: a server (tests/faults/oip_server.py) has the request and never answers; the signal ends the
    command at once, with no thread or connection left to wait for."""
    sys.path.insert(0, str(Path(__file__).parent))
    from oip_server import OipServer

    with OipServer("never") as srv:
        p = subprocess.Popen([sys.executable, "-m", "edgeguard", "-q", "evaluate", srv.url, "--timeout", "60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        end = time.monotonic() + 60
        while srv.infers == 0 and time.monotonic() < end and p.poll() is None:
            time.sleep(0.05)
        assert srv.infers == 1, "the request never reached the server"
        t0 = time.monotonic()
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
        took = time.monotonic() - t0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == EXIT[sig], err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("edgeguard: "), err
    assert took < 5, took
