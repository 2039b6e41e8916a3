"""``edgeguard serve``: a real Triton Inference Server hosting an artifact's Runner, through NVIDIA PyTriton.

PyTriton starts the ``tritonserver`` binary its wheel ships (CPU here; GPU on a server or a Jetson) with a
Python-backend stub that hands each batch to this process, where the artifact's Runner answers: ONNX Runtime
FP32/INT8, a TensorRT engine, host-side defenses included.  Triton does the serving: HTTP and gRPC (Open Inference
Protocol), dynamic batching, readiness, statistics, metrics.

- The model config's ``parameters["edgeguard"]`` holds :func:`edgeguard.runtime.metadata.public_info` (precision,
  defense and public parameters, input shape, classes, artifact sha256) -- never anything from a vault.
- PyTriton guards statistics, the repository API, tracing and logging with a token (header
  ``triton-access-token``); ``token_file`` writes it (mode 0600) for the owner.
- SIGTERM or SIGINT drains: Triton stops taking requests, lets in-flight ones finish for ``exit_timeout_s``,
  exits; this process follows.
- PyTriton's Python-backend stub links ``libpython3.X.so``; with an interpreter that is not the system's (pyenv,
  conda) it can pick up the wrong one, and the model fails to load (``'_thread.RLock' object has no attribute
  '_recursion_count'``).  :func:`server_env` puts this interpreter's ``LIBDIR`` first on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeguard.config import Config, require
from edgeguard.errors import BackendUnavailable, BadInput, ServerExited
from edgeguard.export.triton_repo import check_model_settings
from edgeguard.fileio import atomic_write_bytes
from edgeguard.progress import log
from edgeguard.results import Result
from edgeguard.runtime import is_remote, open_runner
from edgeguard.runtime.endpoint import PARAMETER
from edgeguard.runtime.metadata import public_info

INPUT, OUTPUT = "input", "probabilities"


@dataclass(frozen=True)
class ServeConfig(Config):
    name: str = "model"
    host: str = "127.0.0.1"  # bind address of all three endpoints; 0.0.0.0 serves every interface
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 64  # largest batch Triton's dynamic batcher forms
    max_queue_delay_us: int = 100  # how long the batcher waits to fill a batch
    instances: int = 1  # model instances, each with its own Runner
    exit_timeout_s: int = 3  # drain time for in-flight requests after SIGTERM

    def __post_init__(self) -> None:
        check_model_settings(self.name, self.max_batch, self.max_queue_delay_us, self.instances)
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        require(all(1 <= p <= 65535 for p in ports), f"ports must lie in 1..65535, got {ports}")
        require(len(set(ports)) == 3, f"the HTTP, gRPC and metrics ports must differ, got {ports}")
        require(0 <= self.exit_timeout_s <= 60, "exit_timeout_s must lie in 0..60")

    def urls(self) -> dict[str, str]:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return {"http": f"http://{host}:{self.http_port}/v2/models/{self.name}",
                "grpc": f"grpc://{host}:{self.grpc_port}/v2/models/{self.name}",
                "metrics": f"http://{host}:{self.metrics_port}/metrics"}


@dataclass(frozen=True)
class ServeResult(Result):
    """What a server did, returned when it has stopped."""

    artifact: str
    urls: dict[str, str]
    info: dict[str, Any]
    requests: int
    rows: int
    batches: int
    failed_batches: int
    seconds: float
    stopped_by: str
    passed: bool = True

    def summary(self) -> str:
        """One JSON line (stdout of a server is machine-read)."""
        return json.dumps({"event": "stopped", "requests": self.requests, "rows": self.rows, "batches": self.batches,
                           "failed_batches": self.failed_batches, "seconds": self.seconds, "stopped_by": self.stopped_by})


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this interpreter's LIBDIR first on LD_LIBRARY_PATH (see the module)."""
    env = dict(os.environ if env is None else env)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    env["LD_LIBRARY_PATH"] = ":".join(([libdir] if libdir else []) + parts)
    return env


def check_ports(cfg: ServeConfig) -> None:
    """One sentence before anything starts when a port is taken (Triton itself would fail deep in its log)."""
    for what, port in (("--http-port", cfg.http_port), ("--grpc-port", cfg.grpc_port), ("metrics", cfg.metrics_port)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((cfg.host, port))
            except OSError as e:
                reason = "is already in use" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
                raise BadInput(f"port {port} on {cfg.host} ({what}) {reason}") from None


class _Batches:
    """The inference callable of one model instance: Triton's batch of requests -> one Runner call."""

    def __init__(self, runner, counters: dict[str, int], lock: threading.Lock):
        self.runner, self.counters, self.lock = runner, counters, lock

    def __call__(self, requests: list) -> list[dict[str, np.ndarray]]:
        xs = [np.asarray(r[INPUT], dtype=np.float32) for r in requests]
        sizes = [len(x) for x in xs]
        try:
            probs = self.runner.predict(np.concatenate(xs) if len(xs) > 1 else xs[0])
        except Exception:
            with self.lock:
                self.counters["failed_batches"] += 1
            raise  # PyTriton answers the batch's requests with the error (its last line is our sentence)
        with self.lock:
            self.counters["batches"] += 1
            self.counters["requests"] += len(requests)
            self.counters["rows"] += sum(sizes)
        out, i = [], 0
        for n in sizes:
            out.append({OUTPUT: probs[i : i + n]})
            i += n
        return out


def _pytriton():
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError:
        raise BackendUnavailable("edgeguard serve needs NVIDIA PyTriton: pip install 'edgeguard[serve]'") from None
    return DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig, TritonSecurityConfig


def _log_tail(path: Path, n: int = 400) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln[:1] == "E" or "error" in ln.lower()]
    return (errors or lines or [""])[-1][-n:]


def _bind(cfg: ServeConfig, runners, public: dict[str, Any], log_path: Path, counters: dict[str, int], lock):
    """A PyTriton server for ``runners`` (one per instance) with the model bound and edgeguard's public info in its
    config; not started.  Returns it and its security config (the generated access token)."""
    DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig, TritonSecurityConfig = _pytriton()
    info = runners[0].info
    os.environ.update(server_env())  # PyTriton passes this process's environment to tritonserver
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    tconf = TritonConfig(http_address=cfg.host, grpc_address=cfg.host, metrics_address=cfg.host,
                         http_port=cfg.http_port, grpc_port=cfg.grpc_port, metrics_port=cfg.metrics_port,
                         exit_timeout_secs=cfg.exit_timeout_s, strict_readiness=True, log_verbose=0,
                         log_file=log_path)
    _quiet_resource_tracker()
    security = TritonSecurityConfig()  # PyTriton's default: statistics & co. behind a generated token
    triton = Triton(config=tconf, security_config=security)
    infer = [_Batches(r, counters, lock) for r in runners]
    triton.bind(
        model_name=cfg.name,
        infer_func=infer if len(infer) > 1 else infer[0],
        inputs=[Tensor(name=INPUT, dtype=np.float32, shape=tuple(int(d) for d in info.input_shape))],
        outputs=[Tensor(name=OUTPUT, dtype=np.float32, shape=(info.num_classes,))],
        config=ModelConfig(max_batch_size=cfg.max_batch,
                           batcher=DynamicBatcher(max_queue_delay_microseconds=cfg.max_queue_delay_us)),
        strict=True,
    )
    _publish(triton, cfg.name, public)
    return triton, security


def serve(artifact: str | Path, cfg: ServeConfig | None = None, *, device: str | None = None,
          ready: Callable[[dict[str, Any]], None] | None = None, stop: threading.Event | None = None,
          token_file: str | Path | None = None, log_file: str | Path | None = None) -> ServeResult:
    """Serve ``artifact`` until ``stop`` is set, SIGTERM/SIGINT arrive (main thread) or the server dies.

    ``ready`` is called once with the endpoints and the public info when Triton answers ``/v2/health/ready``.
    """
    cfg = cfg or ServeConfig()
    if is_remote(artifact):
        raise BadInput(f"serve takes a local artifact (bundle, .onnx, .engine), not a URL: {artifact}")
    _pytriton()  # BackendUnavailable before any port or runner is taken
    check_ports(cfg)
    runners = [open_runner(artifact, device=device, batch_size=cfg.max_batch) for _ in range(cfg.instances)]
    stop = stop or threading.Event()
    stopped_by = ["stop event"]
    previous: dict[int, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="edgeguard-serve-")
    log_path = Path(log_file) if log_file else Path(tmp.name) / "tritonserver.log"
    t0 = time.perf_counter()
    counters = {"requests": 0, "rows": 0, "batches": 0, "failed_batches": 0}
    lock = threading.Lock()
    triton = None
    try:
        info = runners[0].info
        public = public_info(runners[0])
        if any(d is None for d in info.input_shape):
            raise BadInput(f"{artifact} has a dynamic input shape {info.input_shape}; serve needs fixed C x H x W")
        triton, security = _bind(cfg, runners, public, log_path, counters, lock)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda s, _f: (stopped_by.__setitem__(0, signal.Signals(s).name),
                                                                  stop.set()))
        log(f"serve: starting Triton Inference Server for {artifact} on {cfg.host} "
            f"(HTTP {cfg.http_port}, gRPC {cfg.grpc_port}, metrics {cfg.metrics_port})")
        try:
            with _quiet_tritonserver():
                triton.run()
        except Exception as e:
            tail = _log_tail(log_path)
            raise BadInput(f"Triton Inference Server did not start: {tail or type(e).__name__ + ': ' + str(e)[:200]}") from None
        if stop.is_set():
            raise KeyboardInterrupt
        if token_file is not None:
            atomic_write_bytes(Path(token_file), (security.access_token or "").encode(), mode=0o600)
        record = {"event": "ready", "pid": os.getpid(), "artifact": str(artifact), **cfg.urls(), "info": public,
                  "token_file": str(token_file) if token_file else None, "log_file": str(log_path) if log_file else None}
        if ready is not None:
            ready(record)
        while not stop.wait(0.2):
            if not triton.is_alive():  # killed, crashed, out of memory: not a clean stop, so not exit 0
                raise ServerExited(f"Triton Inference Server exited unexpectedly while serving {artifact} "
                                   f"({_log_tail(log_path) or 'no message in its log'}); serve stopped and "
                                   "cleaned up its processes")
    finally:
        if triton is not None:
            with contextlib.suppress(Exception):
                triton.stop()
            _reap_leftovers(f"pytrtion{os.getpid()}-")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for r in runners:
            with contextlib.suppress(Exception):
                r.close()
        tmp.cleanup()
    return ServeResult(artifact=str(artifact), urls=cfg.urls(), info=public, requests=counters["requests"],
                       rows=counters["rows"], batches=counters["batches"], failed_batches=counters["failed_batches"],
                       seconds=round(time.perf_counter() - t0, 2), stopped_by=stopped_by[0])


def _reap_leftovers(shm_prefix: str, grace_s: float = 5.0) -> list[int]:
    """Kill this server's tritonserver and Python-backend stubs (and their children) if they outlived ``stop``.

    When in-flight requests outlast Triton's exit timeout, tritonserver exits without unloading the model, and the
    stub -- which does not watch its parent -- polls on forever.  A stub is recognised by its shared-memory prefix
    argument, which PyTriton derives from this process's pid.  PyTriton's stop gives up silently when tritonserver
    ignores SIGINT and then SIGKILL within its wait (a loaded machine), so a tritonserver child still running is
    killed here too, and the call waits up to ``grace_s`` for every killed process to be gone."""
    me = os.getpid()
    procs: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(entry.name)] = (ppid, cmd)
    doomed = [pid for pid, (ppid, cmd) in procs.items()
              if ("triton_python_backend_stub" in cmd and shm_prefix in cmd)
              or (ppid == me and "tritonserver" in cmd.split(" ", 1)[0])]
    frontier = list(doomed)
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _) in procs.items() if ppid == parent and pid not in doomed]
        doomed += kids
        frontier += kids
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while doomed and any(_running(p) for p in doomed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return doomed


def _running(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie waiting for its parent to reap it has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _quiet_resource_tracker() -> None:
    """Start this process's multiprocessing resource tracker with its "leaked shared_memory objects" warning off.

    PyTriton's tensor store registers its shared-memory segments with the tracker; when tritonserver dies the store
    is not closed, and the tracker unlinks the segments at exit (the cleanup we want) but also prints a warning
    after serve's one-sentence error.  The filter applies to the tracker process only."""
    from multiprocessing import resource_tracker

    before = os.environ.get("PYTHONWARNINGS")
    rule = "ignore:resource_tracker:UserWarning"
    os.environ["PYTHONWARNINGS"] = f"{before},{rule}" if before else rule
    try:
        resource_tracker.ensure_running()
    finally:
        if before is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = before


@contextlib.contextmanager
def _quiet_tritonserver():
    """PyTriton echoes tritonserver's console (e.g. "Failed to initialize NVML" on a CPU machine) onto stdout, where
    serve's JSON lines go; start the process with echo off (its log still goes to the log file)."""
    import pytriton.triton as pt

    original = pt.TritonServer
    pt.TritonServer = functools.partial(original, verbose=False)
    try:
        yield
    finally:
        pt.TritonServer = original


def _publish(triton, name: str, public: dict[str, Any]) -> None:
    """Put the public info into the model config's ``parameters`` (Triton's place for user key/values).  PyTriton
    has no public argument for it, so the bound model's generated config is amended before the server loads it."""
    try:
        model = next(m for m in triton._model_manager.models if m.model_name == name)
        model._get_triton_model_config().backend_parameters[PARAMETER] = json.dumps(public, sort_keys=True)
    except (AttributeError, StopIteration, TypeError) as e:
        raise BackendUnavailable(f"this nvidia-pytriton version is not supported by edgeguard serve ({e}); "
                                 "install the one the [serve] extra pins") from None


__all__ = ["ServeConfig", "ServeResult", "check_ports", "serve", "server_env"]
