"""A Runner over the Open Inference Protocol (KServe v2): Triton, KServe, Seldon MLServer.

``open_runner("http://HOST:PORT/v2/models/NAME")`` (or ``grpc://HOST:PORT/v2/models/NAME``) returns a
:class:`RemoteRunner`; every check takes it unchanged.  The model is read from the server: its metadata gives
the input and output tensors, and its config's ``parameters["edgeguard"]`` (written by ``edgeguard serve`` and
``export --format triton-repo``) gives the public info (precision, defense, classes, artifact sha256).  A model
served by someone else has none: its classes are numbered, its precision and defense ``unknown``.

The server may be slow, broken or hostile (an owner checks a suspect's API), so, client side:

* **deadlines**: every request has one total deadline (``timeout_s``: connect + send + receive, its retries
  included) that holds whatever the server does (HTTP: :mod:`edgeguard.runtime.oip_http`; gRPC: the call's own
  deadline), and each check against an endpoint a whole deadline (``deadline_s``; default derived from the
  check's request count, see :meth:`RemoteRunner.expect`);
* **bounded answers**: a body over ``max_response_mb`` is refused before it is read; redirects are not followed;
* **an output contract**: the declared output is FP32/FP16/FP64 of shape (N, classes); every answer has that
  datatype and shape, is finite, and -- from a server edgeguard did not set up -- non-negative rows summing to 1
  within 1e-3, unless ``outputs="logits"`` says it returns logits (the softmax is then applied here, and the
  runner's details say so).  A violation is an :class:`~edgeguard.errors.OutputContractError` naming the row;
* **identity**: each answer must name the model asked for, in the version first seen; every ``recheck_every``
  inference requests the metadata, config and advertised sha256 are read again, and a change stops the check;
* **failures** are :class:`~edgeguard.errors.RemoteError` (exit 4): unreachable, deadline, protocol violation.
  Retries (``retries``, exponential backoff from ``backoff_s``) happen only for errors marked transient
  (connection refused or reset before an answer, HTTP 502/503/504, gRPC UNAVAILABLE), within the deadline.

Settings come from :func:`remote_settings` (the CLI's ``--timeout``, ``--deadline``, ``--max-qps``,
``--outputs``) and can be overridden per URL with a query string (``...?max_qps=5&timeout=10&retries=2``).
``rows_sent`` counts every image sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgeguard.errors import (
    BackendUnavailable,
    BadInput,
    DeadlineExceeded,
    OutputContractError,
    ProtocolViolation,
    RemoteError,
    Unreachable,
)
from edgeguard.runtime.base import DEFAULT_BATCH, DefenseRecord, Runner, RunnerInfo
from edgeguard.runtime.endpoint import (
    _GRPC_HTTP,
    _GRPC_STATUS,
    _QUERY,
    _SETTINGS,
    NUMERIC,
    PARAMETER,
    TOKEN_ENV,
    TOKEN_HEADER,
    Endpoint,
    RemoteSettings,
    _first_line,
    _names_missing_model,
    declared_io,
    is_remote,
    parse_endpoint,
    remote_settings,
)
from edgeguard.runtime.graph import PROBE_TOL, contract_violation
from edgeguard.runtime.oip_http import (
    TRANSIENT_STATUS,
    HttpClient,
    decode_infer,
    encode_infer,
    triton_statistics,
)


class RemoteRunner(Runner):
    """A model behind an Open Inference Protocol endpoint; see the module docstring.  ``info.backend`` and
    ``info.device`` are the server's own (published by edgeguard; ``remote`` otherwise)."""

    backend = "remote"

    def __init__(self, url: str, *, batch_size: int = DEFAULT_BATCH, settings: RemoteSettings | None = None):
        super().__init__(url, batch_size=batch_size)
        self.url = url
        self.path = url  # type: ignore[assignment]  # messages name the URL, not a mangled Path
        self.endpoint = parse_endpoint(url)
        base = settings or _SETTINGS.get()
        over = {_QUERY[k][0]: _QUERY[k][1](v) for k, v in self.endpoint.query}
        if base.access_token is None and os.environ.get(TOKEN_ENV):
            over["access_token"] = os.environ[TOKEN_ENV]
        self.settings = dataclasses.replace(base, **over)
        self.requests = 0  # inference requests answered
        self.rows_sent = 0  # images in those requests
        self.retried = 0  # attempts repeated after a transient failure
        self.public: dict[str, Any] = {}
        self._client: Any = None
        self._grpc = self.endpoint.scheme == "grpc"
        self._next_slot = 0.0
        self._lock = threading.Lock()
        self._check_end: float | None = None  # the whole check's deadline (time.monotonic)
        self._check_budget: float | None = None
        self._identity: str | None = None
        self._version: str | None = None
        self._max_batch = 0

    # --- connection ----------------------------------------------------------------------------------
    def _connect(self):
        ep = self.endpoint
        if not self._grpc:
            return HttpClient(ep.host, ep.port, tls=ep.scheme == "https",
                              max_bytes=int(self.settings.max_response_mb * (1 << 20)), where=self.url)
        try:
            import tritonclient.grpc as tc
            from tritonclient.utils import InferenceServerException
        except ImportError:
            raise BackendUnavailable(
                f"talking to {self.url} needs tritonclient: pip install 'edgeguard[serve]'") from None
        self._tc = tc
        self._server_error = InferenceServerException
        limit = int(self.settings.max_response_mb * (1 << 20))
        return tc.InferenceServerClient(url=ep.address, channel_args=[("grpc.max_receive_message_length", limit)])

    def _headers(self) -> dict[str, str]:
        if not self.settings.access_token:
            return {}
        key = "triton-grpc-protocol-" + TOKEN_HEADER if self._grpc else TOKEN_HEADER  # Triton's gRPC restriction key
        return {key: self.settings.access_token}

    # --- deadlines and retries -----------------------------------------------------------------------
    def expect(self, rows: int, *, batch: int | None = None) -> None:
        """A check announces how many images it will send (in batches of at most ``batch``); the whole-check
        deadline is ``--deadline`` or, by default, (its requests + 2) x the per-request deadline (plus the
        ``--max-qps`` spacing), counted from now."""
        if self.settings.deadline_s is not None:
            budget = self.settings.deadline_s
        else:
            per = min(b for b in (batch or self.batch_size, self._max_batch or self.batch_size, self.batch_size) if b > 0)
            requests = math.ceil(max(int(rows), 1) / max(per, 1))
            requests += 2 + 2 * (requests // self.settings.recheck_every)  # identity re-checks
            budget = requests * self.settings.timeout_s + (requests / self.settings.max_qps if self.settings.max_qps else 0)
        self._check_budget = budget
        self._check_end = time.monotonic() + budget

    def _call(self, what: str, fn: Callable[[float], Any], *, retry: bool = True) -> Any:
        """``fn(deadline)`` with the per-request deadline (inside the check's), retried on transient failures."""
        self._pace()
        now = time.monotonic()
        end = now + self.settings.timeout_s
        if self._check_end is not None:
            if now >= self._check_end:
                raise DeadlineExceeded(f"the check against {self.url} did not finish within its deadline of "
                                       f"{self._check_budget:g} s (--deadline); {self.requests} inference "
                                       f"request(s) answered")
            end = min(end, self._check_end)
        attempts = 1 + (self.settings.retries if retry else 0)
        for attempt in range(attempts):
            try:
                return fn(end)
            except DeadlineExceeded:
                if self._check_end is not None and end >= self._check_end:
                    raise DeadlineExceeded(f"the check against {self.url} did not finish within its deadline of "
                                           f"{self._check_budget:g} s (--deadline); {self.requests} inference "
                                           f"request(s) answered") from None
                raise DeadlineExceeded(f"{self.url} did not answer {what} within {self.settings.timeout_s:g} s "
                                       f"(--timeout: connect + send + receive, retries included)") from None
            except RemoteError as e:
                wait = self.settings.backoff_s * (2**attempt)
                if not e.transient or attempt + 1 >= attempts or time.monotonic() + wait >= end:
                    kind = "cannot reach" if isinstance(e, Unreachable) else "failed"
                    raise type(e)(f"{kind} {self.url} ({what}): {e} after {attempt + 1} attempt(s)",
                                  transient=e.transient, status=e.status) from None
                self.retried += 1
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _pace(self) -> None:
        qps = self.settings.max_qps
        if not qps:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next_slot - now
            self._next_slot = max(now, self._next_slot) + 1.0 / qps
        if wait > 0:
            time.sleep(wait)

    # --- one request per protocol ----------------------------------------------------------------------
    def _http(self, method: str, path: str, what: str, *, body: bytes = b"", headers: dict | None = None,
              retry: bool = True):
        """(answer, status): an HTTP request under the deadline; statuses mapped to error classes."""

        def go(end: float):
            a = self._client.request(method, path, body=body, headers={**self._headers(), **(headers or {})},
                                     deadline=end, what=what)
            if 200 <= a.status < 300:
                return a
            if 300 <= a.status < 400:
                raise ProtocolViolation(f"answered with a redirect (HTTP {a.status} to "
                                        f"{a.headers.get('location', '?')[:120]}); redirects are not followed",
                                        status=a.status)
            try:
                msg = _first_line(json.loads(a.body.decode("utf-8")).get("error") or a.reason)
            except (ValueError, UnicodeDecodeError, AttributeError):
                msg = _first_line(a.body.decode("utf-8", "replace")[:300] or a.reason)
            raise ProtocolViolation(f"HTTP {a.status}: {msg}", status=a.status,
                                    transient=a.status in TRANSIENT_STATUS)

        return self._call(what, go, retry=retry)

    def _grpc_call(self, what: str, method: str, *args: Any, retry: bool = True, **kw: Any):
        def go(end: float):
            try:
                return getattr(self._client, method)(*args, headers=self._headers() or None,
                                                     client_timeout=max(end - time.monotonic(), 1e-3), **kw)
            except self._server_error as e:
                code = str(e.status() or "").rsplit(".", 1)[-1]
                cls, transient = _GRPC_STATUS.get(code, (ProtocolViolation, False))
                msg = _first_line(e.message() if e.message() else str(e))
                raise cls(f"{code or 'error'}: {msg}", transient=transient, status=_GRPC_HTTP.get(code)) from None

        return self._call(what, go, retry=retry)

    # --- Runner ----------------------------------------------------------------------------------------
    def _open_impl(self) -> RunnerInfo:
        self._client = self._connect()
        ep = self.endpoint
        self._max_batch = 0
        try:
            meta, config = self._read_model(opening=True)
        except BaseException:
            self._close_client()
            raise
        io = declared_io(self.url, meta, config)
        self._input_name, self._output_name, self._out_dtype = io.input, io.output, io.datatype
        max_batch, shape, k = io.max_batch, io.shape, io.classes
        self._max_batch = max_batch
        if max_batch > 0:
            self.batch_size = min(self.batch_size, max_batch)
        pub = self.public
        classes = tuple(pub.get("classes") or [str(i) for i in range(k)])
        if len(classes) != k:
            raise BadInput(f"{self.url} declares {len(classes)} classes but outputs {k} values per image")
        c_h_w = tuple(None if d < 0 else d for d in shape[1:])
        if pub.get("input_shape"):
            c_h_w = tuple(pub["input_shape"])
        record = DefenseRecord.from_record(pub.get("defense"), default="unknown")  # a foreign server says nothing
        self._classes = k
        self._declared = pub.get("output") == "probabilities"  # edgeguard set this server up
        if self._declared and self.settings.outputs == "logits":
            raise BadInput(f"{self.url} is an edgeguard server and declares probabilities; --outputs logits does "
                           "not apply to it")
        self._outputs = self.settings.outputs
        # The numerics are the server's: an edgeguard server publishes the backend and device that compute the
        # answers (what a fragile enrolment compares); the transport is in the details.
        return RunnerInfo(
            backend=str(pub.get("backend") or self.backend),
            precision=str(pub.get("precision") or "unknown"),
            defense=record.name,
            defense_record=record,
            input_shape=c_h_w,  # type: ignore[arg-type]
            classes=classes,
            sha256=str(pub.get("sha256") or ""),
            path=self.url,
            device=str(pub.get("device") or f"remote:{ep.address}"),
            details=(
                ("transport", "triton-grpc" if self._grpc else "triton-http"),
                ("endpoint", ep.url),
                ("protocol", "grpc" if self._grpc else "http"),
                ("platform", meta.get("platform") or config.get("backend") or ""),
                ("max_batch_size", max_batch),
                ("edgeguard_version", pub.get("version")),
                ("outputs", "logits: the softmax is applied by edgeguard" if self._outputs == "logits"
                 else "probabilities (checked on every answer)"),
            ),
        )

    def _read_model(self, *, opening: bool = False) -> tuple[dict, dict]:
        ep = self.endpoint
        try:
            if self._grpc:
                meta = self._grpc_call("a metadata request", "get_model_metadata", ep.model, ep.version, as_json=True)
                config = self._grpc_call("a config request", "get_model_config", ep.model, ep.version,
                                         as_json=True).get("config", {})
            else:
                meta = self._http("GET", ep.path, "a metadata request").json("a metadata request", self.url)
                try:
                    config = self._http("GET", ep.path + "/config", "a config request").json("a config request",
                                                                                         self.url)
                except ProtocolViolation as e:
                    if e.status not in (400, 404, 501):  # KServe / MLServer have no config endpoint
                        raise
                    config = {}
        except RemoteError as e:
            if _names_missing_model(e.status, str(e)):
                if opening:
                    raise BadInput(f"the server at {ep.address} has no model {ep.model!r}"
                                   f"{' version ' + ep.version if ep.version else ''}") from None
                raise ProtocolViolation(f"the model {ep.model!r} disappeared from the server at {ep.address} "
                                        "mid-run; the check stopped", status=e.status) from None
            raise
        if not isinstance(meta, dict) or not isinstance(config, dict):
            raise ProtocolViolation(f"{self.url} answered its metadata or config with JSON that is not an object")
        raw = ((config.get("parameters") or {}).get(PARAMETER) or {}).get("string_value")
        public = {}
        if raw:
            try:
                public = json.loads(raw)
            except json.JSONDecodeError:
                raise BadInput(f"{self.url} carries a malformed edgeguard parameter (not JSON)") from None
        identity = hashlib.sha256(json.dumps([meta, config], sort_keys=True, default=str).encode()).hexdigest()
        if opening:
            self.public, self._identity = public, identity
            if not self._model_ready():
                raise BadInput(f"the model {ep.model!r} at {ep.address} is not ready")
        elif identity != self._identity:
            what = "advertised sha256" if public.get("sha256") != self.public.get("sha256") else "metadata or config"
            raise ProtocolViolation(f"the model behind {self.url} changed mid-run (its {what} differs from when the "
                                    f"check began, after {self.requests} inference requests); the check stopped")
        return meta, config

    def _model_ready(self) -> bool:
        ep = self.endpoint
        if self._grpc:
            return bool(self._grpc_call("a readiness request", "is_model_ready", ep.model, ep.version))
        try:
            self._http("GET", ep.path + "/ready", "a readiness request")
        except ProtocolViolation as e:
            if e.status is not None and 400 <= e.status < 500 or e.status == 503:
                return False
            raise
        return True

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        cap = self._max_batch or len(x) or 1  # callers may ask for larger batches than the server's max_batch_size
        if len(x) > cap:
            return np.concatenate([self._request(x[i : i + cap]) for i in range(0, len(x), cap)])
        return self._request(x)

    def _request(self, x: np.ndarray) -> np.ndarray:
        if self.requests and self.requests % self.settings.recheck_every == 0:
            self._read_model()
        try:
            out, name, version, dtype, shape = (self._infer_grpc if self._grpc else self._infer_http)(x)
        except RemoteError as e:
            if _names_missing_model(e.status, str(e)):
                raise ProtocolViolation(f"the model {self.endpoint.model!r} disappeared from the server at "
                                        f"{self.endpoint.address} mid-run ({e}); the check stopped") from None
            raise
        self.requests += 1
        self.rows_sent += len(x)
        if name and name != self.endpoint.model:
            raise ProtocolViolation(f"{self.url} answered for another model ({name!r})")
        if version:
            if self._version is None:
                self._version = version
            elif version != self._version:
                raise ProtocolViolation(f"the model behind {self.url} changed mid-run (version {self._version} -> "
                                        f"{version} after {self.requests - 1} inference requests); the check stopped")
        return self._contract(out, dtype, shape, len(x))

    def _infer_http(self, x: np.ndarray):
        ep = self.endpoint
        body, headers = encode_infer(self._input_name, self._output_name, x)
        a = self._http("POST", ep.path + "/infer", "an inference request", body=body, headers=headers)
        return decode_infer(a, self.url, self._output_name, self._out_dtype)

    def _infer_grpc(self, x: np.ndarray):
        tc, ep = self._tc, self.endpoint
        inp = tc.InferInput(self._input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = self._grpc_call("an inference request", "infer", ep.model, [inp], model_version=ep.version,
                                 outputs=[tc.InferRequestedOutput(self._output_name)])
        o = result.get_output(self._output_name)  # the protobuf message (its as_json form drops the tensor)
        if o is None:
            raise OutputContractError(f"{self.url} answered without its output {self._output_name!r}")
        dtype = str(o.datatype)
        if dtype not in NUMERIC:
            raise OutputContractError(f"{self.url} answered its output {self._output_name!r} as {dtype}; declared "
                                      f"{self._out_dtype}")
        resp = result.get_response()
        return (np.asarray(result.as_numpy(self._output_name)), resp.model_name, str(resp.model_version or ""),
                dtype, [int(d) for d in o.shape])

    def _contract(self, arr: np.ndarray, dtype: str, shape: Any, n: int) -> np.ndarray:
        """The output contract (module docstring) on one answer; returns (n, classes) float32 probabilities."""
        k = self._classes
        where = f"{self.url} (inference request {self.requests})"
        if dtype != self._out_dtype:
            raise OutputContractError(f"{where} answered {dtype} where its metadata declares {self._out_dtype}")
        if not isinstance(shape, list) or [int(d) for d in shape] != [n, k] or arr.size != n * k:
            raise OutputContractError(f"{where} answered shape {shape} ({arr.size} values) for {n} images; expected "
                                      f"[{n}, {k}]")
        y = arr.reshape(n, k).astype(np.float64)
        if self._outputs == "logits":
            bad = contract_violation(y, probabilities=False)
            if bad:
                raise OutputContractError(f"{where}: {bad}; a classifier returns finite numbers")
            z = np.exp(y - y.max(1, keepdims=True))
            return (z / z.sum(1, keepdims=True)).astype(np.float32)
        # an edgeguard server may round its probabilities (the rounding defense): only [0, 1] is checked there
        bad = contract_violation(y, sums=not self._declared)
        if bad:
            hint = "; if the server returns logits, pass --outputs logits (edgeguard then applies the softmax)"
            raise OutputContractError(f"{where}: {bad}; probabilities must be finite, non-negative and sum to 1 "
                                      f"within {PROBE_TOL:g}" + ("" if self._declared else hint))
        return y.astype(np.float32)

    def server_statistics(self) -> dict[str, int] | None:
        """Triton's own counters for this model (rows inferred, batches executed, requests ok/failed); None when
        the server keeps them behind a token this client does not have."""
        ep = self.endpoint
        opened_here = self._client is None
        if opened_here:
            self._client = self._connect()
        try:
            if self._grpc:
                stats = self._grpc_call("a statistics request", "get_inference_statistics", ep.model, ep.version,
                                        as_json=True, retry=False)
            else:
                stats = self._http("GET", ep.path + "/stats", "a statistics request",
                                   retry=False).json("a statistics request", self.url)
        except ProtocolViolation as e:
            if e.status in (401, 403):
                return None
            raise
        finally:
            if opened_here:
                self._close_client()
        return triton_statistics(stats)

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _close_impl(self) -> None:
        self._close_client()
        self._check_end = None


__all__ = ["Endpoint", "RemoteRunner", "RemoteSettings", "is_remote", "parse_endpoint", "remote_settings"]
