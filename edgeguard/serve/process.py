"""``launch``: ``edgeguard serve`` in a child process, for the pipeline's serve stage, the load benchmark and tests.

The child runs in its own session; ``ready`` is the JSON line it prints once Triton answers.  ``stop()`` sends
SIGTERM and returns the seconds until the child (and its tritonserver) is gone; a child still alive after
``kill_after`` seconds is killed with its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edgeguard.errors import BadInput
from edgeguard.serve.triton import ServeConfig


def free_ports(n: int = 3, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports the OS reports free on ``host`` right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class ServerProcess:
    def __init__(self, artifact: str | Path, cfg: ServeConfig, *, startup_s: float = 120.0,
                 extra: tuple[str, ...] = ()):
        self.cfg = cfg
        self._tmp = tempfile.TemporaryDirectory(prefix="edgeguard-launch-")
        self.token_file = Path(self._tmp.name) / "token"
        cmd = [sys.executable, "-m", "edgeguard", "-q", "serve", str(artifact), "--name", cfg.name, "--host", cfg.host,
               "--http-port", str(cfg.http_port), "--grpc-port", str(cfg.grpc_port),
               "--metrics-port", str(cfg.metrics_port), "--max-batch", str(cfg.max_batch),
               "--max-queue-delay-us", str(cfg.max_queue_delay_us), "--instances", str(cfg.instances),
               "--token-file", str(self.token_file), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.ready = self._wait_ready(startup_s)

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def read() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                if line.startswith('{"event": "ready"'):
                    found.append(json.loads(line))
                    return

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not found:
            self.kill()
            err = (self.proc.stderr.read() if self.proc.stderr else "").strip().splitlines()
            raise BadInput(f"edgeguard serve did not get ready within {timeout:g} s: "
                           f"{err[-1] if err else 'no message'}")
        return found[0]

    @property
    def token(self) -> str:
        return self.token_file.read_text()

    @property
    def http(self) -> str:
        return self.ready["http"]

    @property
    def grpc(self) -> str:
        return self.ready["grpc"]

    def stop(self, kill_after: float = 20.0) -> float:
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                self.kill()
        self._tmp.cleanup()
        return time.perf_counter() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def launch(artifact: str | Path, cfg: ServeConfig | None = None, **kw: Any) -> ServerProcess:
    """Start ``edgeguard serve`` on loopback with free ports (unless ``cfg`` names them); use as a context manager."""
    if cfg is None:
        http, grpc, metrics = free_ports(3)
        cfg = ServeConfig(http_port=http, grpc_port=grpc, metrics_port=metrics)
    return ServerProcess(artifact, cfg, **kw)


__all__ = ["ServerProcess", "free_ports", "launch"]
