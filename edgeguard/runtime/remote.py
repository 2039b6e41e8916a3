"""A Runner over the Open Inference Protocol (KServe v2): Triton, KServe, Seldon MLServer.

``open_runner("http://HOST:PORT/v2/models/NAME")`` (or ``grpc://HOST:PORT/v2/models/NAME``) returns a
:class:`RemoteRunner`; every check takes it unchanged.  The model is read from the server: its metadata gives
the input and output tensors, and its config's ``parameters["edgeguard"]`` (written by ``edgeguard serve`` and
``export --format triton-repo``) gives the public info (precision, defense, classes, artifact sha256).  A model
served by someone else has none: its classes are numbered, its precision and defense ``unknown``.

Politeness and failure, client side: every request has a timeout; connection resets, refusals and 502/503/504
answers are retried ``retries`` times with exponential backoff; ``max_qps`` spaces requests out.  Settings come
from :func:`remote_settings` (the CLI's ``--timeout`` / ``--max-qps``) and can be overridden per URL with a
query string (``...?max_qps=5&timeout=10&retries=2``).  ``rows_sent`` counts every image sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from edgeguard.errors import BackendUnavailable, BadInput
from edgeguard.runtime.base import DEFAULT_BATCH, Runner, RunnerInfo

SCHEMES = ("http", "https", "grpc")
PARAMETER = "edgeguard"  # the model config parameter that carries edgeguard's public info (JSON)
TOKEN_HEADER = "triton-access-token"  # PyTriton's header for its restricted endpoints (statistics)
TOKEN_ENV = "EDGEGUARD_TRITON_TOKEN"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TRANSIENT = ("503", "502", "504", "unavailable", "connection reset", "broken pipe", "connection aborted",
              "remote end closed", "connection refused", "server disconnected", "eof occurred")


def is_remote(target: Any) -> bool:
    """True for a URL (``scheme://...``); a ``Path`` never is (it collapses the double slash)."""
    return isinstance(target, str) and bool(_URL.match(target))


@dataclass(frozen=True)
class RemoteSettings:
    timeout_s: float = 30.0  # each request, connect included
    retries: int = 3  # extra attempts on a transient failure
    backoff_s: float = 0.25  # first wait; doubles per retry
    max_qps: float | None = None  # requests per second, client side; None: as fast as answers come
    access_token: str | None = None  # for PyTriton's restricted endpoints (statistics); env EDGEGUARD_TRITON_TOKEN

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise BadInput(f"the remote timeout must be > 0 seconds, got {self.timeout_s}")
        if self.retries < 0:
            raise BadInput(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise BadInput(f"backoff must be >= 0 seconds, got {self.backoff_s}")
        if self.max_qps is not None and not self.max_qps > 0:
            raise BadInput(f"--max-qps must be > 0, got {self.max_qps}")


_SETTINGS: ContextVar[RemoteSettings] = ContextVar("edgeguard_remote_settings", default=RemoteSettings())  # noqa: B039 (frozen)


@contextlib.contextmanager
def remote_settings(**overrides: Any) -> Iterator[RemoteSettings]:
    """Settings for every RemoteRunner opened inside the block (None values keep the current ones)."""
    current = _SETTINGS.get()
    new = dataclasses.replace(current, **{k: v for k, v in overrides.items() if v is not None})
    token = _SETTINGS.set(new)
    try:
        yield new
    finally:
        _SETTINGS.reset(token)


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    model: str
    version: str = ""
    query: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        v = f"/versions/{self.version}" if self.version else ""
        return f"{self.scheme}://{self.address}/v2/models/{self.model}{v}"


_QUERY = {"timeout": ("timeout_s", float), "retries": ("retries", int), "backoff": ("backoff_s", float),
          "max_qps": ("max_qps", float)}


def parse_endpoint(url: str) -> Endpoint:
    """``http://HOST:PORT/v2/models/NAME[/versions/V][?max_qps=..&timeout=..&retries=..]``; grpc:// alike."""
    shape = "expected http://HOST:PORT/v2/models/NAME (or grpc://HOST:PORT/v2/models/NAME)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise BadInput(f"bad endpoint URL {url!r}: {e}; {shape}") from None
    if parts.scheme not in SCHEMES:
        raise BadInput(f"unsupported endpoint scheme {parts.scheme!r} in {url!r}; {shape}")
    if not parts.hostname:
        raise BadInput(f"endpoint URL {url!r} names no host; {shape}")
    m = re.fullmatch(r"/v2/models/([A-Za-z0-9._-]+)(?:/versions/(\d+))?/?", parts.path or "")
    if not m:
        raise BadInput(f"endpoint URL {url!r} has no model path; {shape}")
    query = tuple(parse_qsl(parts.query, keep_blank_values=True))
    for k, v in query:
        if k not in _QUERY:
            raise BadInput(f"unknown endpoint option {k!r} in {url!r} (known: {', '.join(_QUERY)})")
        try:
            _QUERY[k][1](v)
        except ValueError:
            raise BadInput(f"endpoint option {k}={v!r} in {url!r} is not a number") from None
    default_port = {"http": 80, "https": 443, "grpc": 8001}[parts.scheme]
    return Endpoint(parts.scheme, parts.hostname, port or default_port, m.group(1), m.group(2) or "", query)


def _first_line(text: str) -> str:
    """The meaningful line of a server error (PyTriton sends a whole traceback: keep its last line)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return "no message"
    line = lines[-1] if lines[0].startswith("Traceback") or len(lines) > 1 and "Error" in lines[-1] else lines[0]
    return line[:300]


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
        self._client = None
        self._grpc = self.endpoint.scheme == "grpc"
        self._next_slot = 0.0
        self._lock = threading.Lock()

    # --- connection ----------------------------------------------------------------------------------
    def _connect(self):
        try:
            if self._grpc:
                import tritonclient.grpc as tc
            else:
                import tritonclient.http as tc
            from tritonclient.utils import InferenceServerException
        except ImportError:
            raise BackendUnavailable(
                f"talking to {self.url} needs tritonclient: pip install 'edgeguard[serve]'") from None
        self._tc = tc
        self._server_error = InferenceServerException
        ep, t = self.endpoint, self.settings.timeout_s
        if self._grpc:
            return tc.InferenceServerClient(url=ep.address)
        return tc.InferenceServerClient(url=ep.address, connection_timeout=t, network_timeout=t,
                                        ssl=ep.scheme == "https")

    def _headers(self) -> dict[str, str] | None:
        if not self.settings.access_token:
            return None
        key = "triton-grpc-protocol-" + TOKEN_HEADER if self._grpc else TOKEN_HEADER  # Triton's gRPC restriction key
        return {key: self.settings.access_token}

    def _call(self, what: str, fn, *args, retry: bool = True, **kw):
        """One request with the timeout, bounded retries with backoff on transient failures, and the QPS limit."""
        if self._grpc:
            kw["client_timeout"] = self.settings.timeout_s
        attempts = 1 + (self.settings.retries if retry else 0)
        for attempt in range(attempts):
            self._pace()
            try:
                return fn(*args, **kw)
            except self._server_error as e:
                msg = _first_line(e.message() if hasattr(e, "message") and e.message() else str(e))
                status = str(e.status() or "") if hasattr(e, "status") else ""
                transient = any(s in (status + " " + msg).lower() for s in _TRANSIENT)
                if "deadline" in (status + msg).lower():
                    raise BadInput(f"{self.url} did not answer {what} within {self.settings.timeout_s:g} s") from None
                if not transient:
                    raise BadInput(f"{self.url} refused {what}: {msg}") from None
                err = msg
            except BaseException as e:  # socket errors, gevent timeouts (a BaseException), resets
                if isinstance(e, KeyboardInterrupt | SystemExit):
                    raise
                name = type(e).__name__
                text = f"{name}: {e}".lower()
                if "timeout" in text or "timed out" in text:
                    raise BadInput(f"{self.url} did not answer {what} within {self.settings.timeout_s:g} s") from None
                if not isinstance(e, OSError | ConnectionError) and not any(s in text for s in _TRANSIENT):
                    raise BadInput(f"{self.url} failed {what}: {name}: {str(e)[:200]}") from None
                err = f"{name}: {str(e)[:200]}" if str(e) else name
            if attempt + 1 < attempts:
                self.retried += 1
                time.sleep(self.settings.backoff_s * (2**attempt))
        raise BadInput(f"cannot reach {self.url} ({what}): {err} after {attempts} attempt(s)")

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

    # --- Runner ----------------------------------------------------------------------------------------
    def _open_impl(self) -> RunnerInfo:
        self._client = self._connect()
        ep = self.endpoint
        try:
            meta, config = self._read_model()
        except BaseException:
            self._close_client()
            raise
        inputs, outputs = meta.get("inputs") or [], meta.get("outputs") or []
        max_batch = int(config.get("max_batch_size") or 0)
        if len(inputs) != 1:
            raise BadInput(f"{self.url} takes {len(inputs)} inputs; an image classifier takes one N x C x H x W tensor")
        inp = inputs[0]
        shape = [int(d) for d in inp.get("shape", [])]
        if max_batch > 0 and len(shape) == 3:  # some servers list dims without the batch dimension
            shape = [-1, *shape]
        if len(shape) != 4:
            raise BadInput(f"{self.url} input {inp.get('name')!r} has shape {shape}; expected N x C x H x W")
        if inp.get("datatype") != "FP32":
            raise BadInput(f"{self.url} input {inp.get('name')!r} is {inp.get('datatype')}; edgeguard sends FP32 images")
        names = [o.get("name") for o in outputs]
        if not outputs:
            raise BadInput(f"{self.url} declares no output")
        out = outputs[names.index("probabilities")] if "probabilities" in names else outputs[0]
        out_shape = [int(d) for d in out.get("shape", [])]
        if out_shape[-1:] and out_shape[-1] > 1:
            k = out_shape[-1]
        else:
            raise BadInput(f"{self.url} output {out.get('name')!r} has shape {out_shape}; expected N x classes")
        self._input_name, self._output_name = inp.get("name"), out.get("name")
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
        defense = pub.get("defense") or {}
        self._softmax = None if pub.get("output") == "probabilities" else "auto"
        # The numerics are the server's: an edgeguard server publishes the backend and device that compute the
        # answers (what a fragile enrolment compares); the transport is in the details.
        return RunnerInfo(
            backend=str(pub.get("backend") or self.backend),
            precision=str(pub.get("precision") or "unknown"),
            defense=str(defense.get("name", "unknown") if isinstance(defense, dict) else defense),
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
            ),
        )

    def _read_model(self) -> tuple[dict, dict]:
        ep, c = self.endpoint, self._client
        try:
            if self._grpc:
                meta = self._call("a metadata request", c.get_model_metadata, ep.model, ep.version, as_json=True,
                                  headers=self._headers())
                config = self._call("a config request", c.get_model_config, ep.model, ep.version, as_json=True,
                                    headers=self._headers()).get("config", {})
            else:
                meta = self._call("a metadata request", c.get_model_metadata, ep.model, ep.version,
                                  headers=self._headers())
                config = self._call("a config request", c.get_model_config, ep.model, ep.version,
                                    headers=self._headers())
        except BadInput as e:
            text = str(e).lower()
            if "unknown model" in text or "not found" in text or "no version" in text:
                raise BadInput(f"the server at {ep.address} has no model {ep.model!r}"
                               f"{' version ' + ep.version if ep.version else ''}") from None
            raise
        raw = ((config.get("parameters") or {}).get(PARAMETER) or {}).get("string_value")
        if raw:
            try:
                self.public = json.loads(raw)
            except json.JSONDecodeError:
                raise BadInput(f"{self.url} carries a malformed edgeguard parameter (not JSON)") from None
        if not self._model_ready():
            raise BadInput(f"the model {ep.model!r} at {ep.address} is not ready")
        return meta, config

    def _model_ready(self) -> bool:
        ep = self.endpoint
        return bool(self._call("a readiness request", self._client.is_model_ready, ep.model, ep.version,
                               headers=self._headers()))

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        cap = self._max_batch or len(x) or 1  # callers may ask for larger batches than the server's max_batch_size
        if len(x) > cap:
            return np.concatenate([self._request(x[i : i + cap]) for i in range(0, len(x), cap)])
        return self._request(x)

    def _request(self, x: np.ndarray) -> np.ndarray:
        tc, ep = self._tc, self.endpoint
        inp = tc.InferInput(self._input_name, list(x.shape), "FP32")
        if self._grpc:
            inp.set_data_from_numpy(x)
        else:
            inp.set_data_from_numpy(x, binary_data=True)
        outs = [tc.InferRequestedOutput(self._output_name, binary_data=True)] if not self._grpc else \
            [tc.InferRequestedOutput(self._output_name)]
        result = self._call("an inference request", self._client.infer, ep.model, [inp], model_version=ep.version,
                            outputs=outs, headers=self._headers())
        self.requests += 1
        self.rows_sent += len(x)
        out = result.as_numpy(self._output_name)
        if out is None:
            raise BadInput(f"{self.url} answered without its output {self._output_name!r}")
        out = np.asarray(out, dtype=np.float32).reshape(len(x), -1)
        if self._softmax == "auto" and out.size and (out.min() < 0 or np.abs(out.sum(1) - 1).max() > 1e-3):
            z = out - out.max(axis=1, keepdims=True)  # a foreign server answering logits
            e = np.exp(z)
            out = e / e.sum(axis=1, keepdims=True)
        return out

    def server_statistics(self) -> dict[str, int] | None:
        """Triton's own counters for this model (rows inferred, batches executed, requests ok/failed); None when
        the server keeps them behind a token this client does not have."""
        ep, c = self.endpoint, self._client if self._client is not None else self._connect()
        try:
            kw = {"as_json": True} if self._grpc else {}
            stats = self._call("a statistics request", c.get_inference_statistics, ep.model, ep.version,
                               headers=self._headers(), retry=False, **kw)
        except BadInput as e:
            if any(w in str(e).lower() for w in ("restricted", "access", "forbidden", "unauthor")):
                return None
            raise
        finally:
            if self._client is None:
                c.close()
        rows = (stats.get("model_stats") or [{}])
        s = rows[0] if rows else {}
        inf = s.get("inference_stats") or {}
        return {
            "inference_count": int(s.get("inference_count") or 0),
            "execution_count": int(s.get("execution_count") or 0),
            "success": int((inf.get("success") or {}).get("count") or 0),
            "fail": int((inf.get("fail") or {}).get("count") or 0),
        }

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _close_impl(self) -> None:
        self._close_client()


__all__ = ["Endpoint", "RemoteRunner", "RemoteSettings", "is_remote", "parse_endpoint", "remote_settings"]
