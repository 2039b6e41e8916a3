"""The task functions (run in a worker process, a Ray task, or in-process) and the executors that run them."""

from __future__ import annotations

import importlib
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeguard.attacks.extraction import extract, method_config
from edgeguard.config import config_from_dict
from edgeguard.errors import BackendUnavailable, BadInput, EdgeguardError
from edgeguard.fileio import atomic_write_json
from edgeguard.grid.config import BACKENDS
from edgeguard.verbs import export_bundle

# --- the task functions (run in a worker process, a Ray task, or in-process) ---------------------------------------


def _failure(e: BaseException) -> dict[str, Any]:
    if isinstance(e, EdgeguardError):
        return {"ok": False, "error": str(e), "error_type": type(e).__name__}
    return {"ok": False, "error": f"{type(e).__name__}: {e}", "error_type": type(e).__name__,
            "traceback": traceback.format_exc()}


def failure_record(what: str, outcome: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rec = {"what": what, **extra, "error": outcome["error"]}
    if "traceback" in outcome:
        rec["traceback"] = outcome["traceback"]
    return rec


def _init_worker() -> None:
    """Each worker: one torch thread (the pool provides the parallelism) and no progress lines of its own."""
    os.environ["EDGEGUARD_QUIET"] = "1"
    import torch

    torch.set_num_threads(1)


def run_export(job: dict[str, Any]) -> dict[str, Any]:
    """Export the victim with one defense point into ``job['dir']`` (built in a temp sibling, then renamed)."""
    final = Path(job["dir"])
    tmp = final.parent / f".{final.name}.{os.getpid()}.tmp"
    t0 = time.perf_counter()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        res = export_bundle(job["bundle"], tmp / "model.onnx", defense=job["name"], defense_params=job["params"])
        rec = res.to_json()
        rec["path"] = str(final / "model.onnx")
        if rec.get("sidecar"):
            rec["sidecar"] = str(final / Path(rec["sidecar"]).name)
        atomic_write_json(tmp / "export.json", {"key": job["key"], "defense": job["spec"], "export": rec})
        if final.exists():  # an unfinished folder of an interrupted run (no export.json)
            shutil.rmtree(final)
        os.replace(tmp, final)
        return {"ok": True, "export": rec, "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as e:  # noqa: BLE001 - reported per defense point, the grid goes on
        shutil.rmtree(tmp, ignore_errors=True)
        return _failure(e)


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """One extraction attack against one defended artifact; returns the result dict (never raises)."""
    t0 = time.perf_counter()
    try:
        cfg = method_config(job["method"], job["config"])
        eval_data = config_from_dict(job["eval"])
        res = extract(job["artifact"], None, job["method"], cfg, eval_data=eval_data, quiet=True)  # type: ignore[arg-type]
        return {"ok": True, "result": res.to_json(), "seconds": round(time.perf_counter() - t0, 2), "pid": os.getpid()}
    except Exception as e:  # noqa: BLE001 - reported per cell, the grid goes on
        return _failure(e)


def _ray_entry(fn: Callable[[dict[str, Any]], dict[str, Any]], job: dict[str, Any]) -> dict[str, Any]:
    _init_worker()
    return fn(job)


# --- backends -------------------------------------------------------------------------------------------------------


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise BadInput(f"unknown grid backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "ray":
        try:
            importlib.import_module("ray")
        except ImportError:
            raise BackendUnavailable("the ray backend needs ray: pip install 'edgeguard[dist]'") from None


Job = dict[str, Any]
TaskFn = Callable[[Job], dict[str, Any]]


class Executor:
    """Runs task functions and hands back ``(fn, job, outcome)`` as each finishes; one pool for the whole grid.

    ``local`` with one worker runs the tasks here, in submission order, with the workers' single torch thread
    (the same numbers as a pool); more workers: a ``spawn`` process pool; ``ray``: Ray tasks of one CPU each.
    """

    def __init__(self, backend: str, workers: int):
        self.backend, self.workers = backend, workers
        self._pending: dict[Any, tuple[TaskFn, Job]] = {}
        self._queue: list[tuple[TaskFn, Job]] = []
        self._pool: Any = None
        self._ray: Any = None
        self._remote: Any = None
        if backend == "ray":
            self._ray = importlib.import_module("ray")
            if not self._ray.is_initialized():
                self._ray.init(ignore_reinit_error=True, log_to_driver=False)  # RAY_ADDRESS selects a running cluster
            self._remote = self._ray.remote(num_cpus=1)(_ray_entry)
        elif workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker)

    def __len__(self) -> int:
        return len(self._pending) + len(self._queue)

    def submit(self, fn: TaskFn, job: Job) -> None:
        if self._ray is not None:
            self._pending[self._remote.remote(fn, job)] = (fn, job)
        elif self._pool is not None:
            self._pending[self._pool.submit(fn, job)] = (fn, job)
        else:
            self._queue.append((fn, job))

    def next_done(self) -> tuple[TaskFn, Job, dict[str, Any]]:
        if self._queue:
            fn, job = self._queue.pop(0)
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn, job, fn(job)
            finally:
                torch.set_num_threads(threads)
        if self._ray is not None:
            done, _ = self._ray.wait(list(self._pending), num_returns=1)
            handle, get = done[0], self._ray.get
        else:
            from concurrent.futures import FIRST_COMPLETED, wait

            done, _ = wait(list(self._pending), return_when=FIRST_COMPLETED)
            handle = next(f for f in self._pending if f in done)  # the earliest submitted of those done

            def get(f: Any) -> Any:
                return f.result()

        fn, job = self._pending.pop(handle)
        try:
            outcome = get(handle)
        except Exception as e:  # noqa: BLE001 - a worker, task or node died (out of memory, killed)
            outcome = _failure(e)
        return fn, job, outcome

    def close(self, *, cancel: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=not cancel, cancel_futures=cancel)
        if self._ray is not None and cancel:
            for ref in self._pending:
                try:
                    self._ray.cancel(ref)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
