"""Where an Open Inference Protocol model lives and how a client talks to it: endpoint URLs (``http://`` /
``grpc://HOST:PORT/v2/models/NAME``, per-URL options in the query string), the client settings (deadlines, retries,
pacing, answer limits) and the gRPC status -> error mapping.  The runner itself: :mod:`edgeguard.runtime.remote`."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from edgeguard.errors import (
    BadInput,
    DeadlineExceeded,
    OutputContractError,
    ProtocolViolation,
    Unreachable,
)

SCHEMES = ("http", "https", "grpc")
PARAMETER = "edgeguard"  # the model config parameter that carries edgeguard's public info (JSON)
TOKEN_HEADER = "triton-access-token"  # PyTriton's header for its restricted endpoints (statistics)
TOKEN_ENV = "EDGEGUARD_TRITON_TOKEN"
OUTPUT_MODES = ("probabilities", "logits")
NUMERIC = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# gRPC status codes (the enum's names, from grpc.StatusCode) -> (error class, transient)
_GRPC_STATUS = {
    "UNAVAILABLE": (Unreachable, True),
    "DEADLINE_EXCEEDED": (DeadlineExceeded, False),
    "RESOURCE_EXHAUSTED": (ProtocolViolation, False),
    "NOT_FOUND": (ProtocolViolation, False),
    "INTERNAL": (ProtocolViolation, False),
    "UNKNOWN": (ProtocolViolation, False),
    "UNIMPLEMENTED": (ProtocolViolation, False),
    "UNAUTHENTICATED": (ProtocolViolation, False),
    "PERMISSION_DENIED": (ProtocolViolation, False),
    "INVALID_ARGUMENT": (ProtocolViolation, False),
    "CANCELLED": (Unreachable, False),
}
_GRPC_HTTP = {"NOT_FOUND": 404, "INVALID_ARGUMENT": 400, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401,
              "UNAVAILABLE": 503, "INTERNAL": 500}


def is_remote(target: Any) -> bool:
    """True for a URL (``scheme://...``); a ``Path`` never is (it collapses the double slash)."""
    return isinstance(target, str) and bool(_URL.match(target))


@dataclass(frozen=True)
class RemoteSettings:
    timeout_s: float = 30.0  # each request's total deadline: connect + send + receive, its retries included
    retries: int = 3  # extra attempts on a transient failure
    backoff_s: float = 0.25  # first wait; doubles per retry
    max_qps: float | None = None  # requests per second, client side; None: as fast as answers come
    access_token: str | None = None  # for PyTriton's restricted endpoints (statistics); env EDGEGUARD_TRITON_TOKEN
    deadline_s: float | None = None  # a whole check against one endpoint; None: derived from its request count
    max_response_mb: float = 64.0  # larger answers are refused before they are read
    outputs: str = "probabilities"  # what the endpoint returns: probabilities (checked) or logits (softmax here)
    recheck_every: int = 10  # inference requests between re-reads of the model's metadata, config and sha256

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise BadInput(f"the remote timeout must be > 0 seconds, got {self.timeout_s}")
        if self.retries < 0:
            raise BadInput(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise BadInput(f"backoff must be >= 0 seconds, got {self.backoff_s}")
        if self.max_qps is not None and not self.max_qps > 0:
            raise BadInput(f"--max-qps must be > 0, got {self.max_qps}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise BadInput(f"--deadline must be > 0 seconds, got {self.deadline_s}")
        if not self.max_response_mb > 0:
            raise BadInput(f"max_response_mb must be > 0, got {self.max_response_mb}")
        if self.outputs not in OUTPUT_MODES:
            raise BadInput(f"--outputs must be {' or '.join(OUTPUT_MODES)}, got {self.outputs!r}")
        if self.recheck_every < 1:
            raise BadInput(f"recheck_every must be >= 1, got {self.recheck_every}")


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

    @property
    def path(self) -> str:
        v = f"/versions/{self.version}" if self.version else ""
        return f"/v2/models/{self.model}{v}"


def _mode(v: str) -> str:
    if v not in OUTPUT_MODES:
        raise ValueError(v)
    return v


_QUERY: dict[str, tuple[str, Callable[[str], Any]]] = {
    "timeout": ("timeout_s", float), "retries": ("retries", int), "backoff": ("backoff_s", float),
    "max_qps": ("max_qps", float), "deadline": ("deadline_s", float), "max_response_mb": ("max_response_mb", float),
    "outputs": ("outputs", _mode), "recheck_every": ("recheck_every", int),
}


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
            what = "is not a number" if _QUERY[k][1] in (int, float) else f"must be one of {', '.join(OUTPUT_MODES)}"
            raise BadInput(f"endpoint option {k}={v!r} in {url!r} {what}") from None
    default_port = {"http": 80, "https": 443, "grpc": 8001}[parts.scheme]
    return Endpoint(parts.scheme, parts.hostname, port or default_port, m.group(1), m.group(2) or "", query)


def _first_line(text: str) -> str:
    """The meaningful line of a server error (PyTriton sends a whole traceback: keep its last line)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return "no message"
    line = lines[-1] if lines[0].startswith("Traceback") or len(lines) > 1 and "Error" in lines[-1] else lines[0]
    return line[:300]


def _names_missing_model(status: int | None, msg: str) -> bool:
    """An answer that says the model is not there (Triton: HTTP 400 'unknown model'; KServe/MLServer: 404)."""
    m = msg.lower()
    return status == 404 or status == 400 and ("unknown model" in m or "not found" in m or "no version" in m)




@dataclass(frozen=True)
class DeclaredIO:
    """What a served classifier declares: its one N x C x H x W FP32 input, its (N, classes) output."""

    input: str
    output: str
    datatype: str
    shape: list[int]  # N, C, H, W; -1 for a dynamic dimension
    classes: int
    max_batch: int


def declared_io(url: str, meta: dict, config: dict) -> DeclaredIO:
    """Read and check the input and output declared in a model's metadata (and ``max_batch_size`` in its config)."""
    inputs, outputs = meta.get("inputs") or [], meta.get("outputs") or []
    max_batch = int(config.get("max_batch_size") or 0)
    if len(inputs) != 1:
        raise BadInput(f"{url} takes {len(inputs)} inputs; an image classifier takes one N x C x H x W tensor")
    inp = inputs[0]
    shape = [int(d) for d in inp.get("shape", [])]
    if max_batch > 0 and len(shape) == 3:  # some servers list dims without the batch dimension
        shape = [-1, *shape]
    if len(shape) != 4:
        raise BadInput(f"{url} input {inp.get('name')!r} has shape {shape}; expected N x C x H x W")
    if inp.get("datatype") != "FP32":
        raise BadInput(f"{url} input {inp.get('name')!r} is {inp.get('datatype')}; edgeguard sends FP32 images")
    names = [o.get("name") for o in outputs]
    if not outputs:
        raise BadInput(f"{url} declares no output")
    out = outputs[names.index("probabilities")] if "probabilities" in names else outputs[0]
    if out.get("datatype") not in NUMERIC:
        raise OutputContractError(f"{url} declares its output {out.get('name')!r} as {out.get('datatype')}; "
                                  f"a classifier's output must be {', '.join(NUMERIC)}")
    out_shape = [int(d) for d in out.get("shape", [])]
    if out_shape[-1:] and out_shape[-1] > 1:
        k = out_shape[-1]
    else:
        raise OutputContractError(f"{url} output {out.get('name')!r} has shape {out_shape}; expected N x classes")
    return DeclaredIO(inp.get("name"), out.get("name"), out["datatype"], shape, k, max_batch)
