"""A small HTTP/1.1 client for the Open Inference Protocol that a hostile server cannot hold up.

Every request has one absolute deadline (connect + send + receive); each socket operation waits at most what is
left of it, so a server that answers a byte at a time, or never, ends at the deadline instead of resetting a
per-read timeout.  A body larger than ``max_bytes`` is refused from its ``Content-Length`` (or, chunked or
unframed, as soon as it grows past the bound) before it is held in memory.  Redirects are not followed.  No
threads and no event loop: SIGINT / SIGTERM interrupt a blocked read like any other call and the socket is
closed on the way out.

Failures are :class:`~edgeguard.errors.RemoteError` subclasses carrying ``transient`` (a retry may help:
connection refused or reset before any answer, HTTP 502/503/504) and ``status``; callers decide on those,
never on message text.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeguard.errors import DeadlineExceeded, OutputContractError, ProtocolViolation, Unreachable
from edgeguard.runtime.endpoint import NUMERIC

MAX_HEADER_BYTES = 64 * 1024
TRANSIENT_STATUS = frozenset({502, 503, 504})
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self, what: str, where: str) -> Any:
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolViolation(f"{where} answered {what} with malformed JSON ({type(e).__name__}: "
                                    f"{str(e)[:80]})", status=self.status) from None


class HttpClient:
    """One keep-alive connection to ``host:port``; :meth:`request` is the only entry point."""

    def __init__(self, host: str, port: int, *, tls: bool = False, max_bytes: int = 64 << 20, where: str = ""):
        self.host, self.port, self.tls, self.max_bytes = host, int(port), bool(tls), int(max_bytes)
        self.where = where or f"{host}:{port}"
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    # --- the request ----------------------------------------------------------------------------------
    def request(self, method: str, path: str, *, body: bytes = b"", headers: dict[str, str] | None = None,
                deadline: float, what: str = "a request") -> Answer:
        """Send one request and read its whole answer before ``deadline`` (``time.monotonic()`` seconds)."""
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", "Accept: */*",
                f"Content-Length: {len(body)}", "User-Agent: edgeguard"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        reused = self._sock is not None
        try:
            try:
                return self._exchange(data, method, deadline, what)
            except _StaleConnection:
                if not reused:
                    raise Unreachable(f"{self.where} closed the connection before answering {what}",
                                      transient=True) from None
                self.close()  # a kept-alive connection the server dropped meanwhile: one fresh connection
                return self._exchange(data, method, deadline, what)
        except _StaleConnection:
            raise Unreachable(f"{self.where} closed the connection before answering {what}", transient=True) from None
        except BaseException:
            self.close()  # never reuse a connection left mid-answer (also on SIGINT / SIGTERM)
            raise

    def _exchange(self, data: bytes, method: str, deadline: float, what: str) -> Answer:
        sock = self._connect(deadline, what)
        try:
            self._wait(deadline, what)
            sock.sendall(data)
        except TimeoutError:
            raise self._late(what) from None
        except (ConnectionResetError, BrokenPipeError) as e:
            raise _StaleConnection() from e
        reader = _Reader(sock, deadline, self, what)
        status, reason, headers = reader.head()
        body = reader.body(headers, method)
        if headers.get("connection", "").lower() == "close" or reader.http10:
            self.close()
        return Answer(status, reason, headers, body)

    def _connect(self, deadline: float, what: str) -> socket.socket:
        if self._sock is not None:
            return self._sock
        left = self._wait(deadline, what)
        try:
            sock = socket.create_connection((self.host, self.port), timeout=left)
        except TimeoutError:
            raise self._late(what) from None
        except socket.gaierror as e:
            raise Unreachable(f"cannot resolve {self.host} ({e.strerror or e})") from None
        except ConnectionRefusedError:
            raise Unreachable(f"{self.where} refused the connection", transient=True) from None
        except OSError as e:
            raise Unreachable(f"cannot connect to {self.where}: {e.strerror or e}",
                              transient=isinstance(e, ConnectionError)) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls:
            try:
                sock.settimeout(self._wait(deadline, what))
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            except TimeoutError:
                sock.close()
                raise self._late(what) from None
            except (ssl.SSLError, OSError) as e:
                sock.close()
                raise Unreachable(f"TLS with {self.where} failed: {e}") from None
        self._sock = sock
        return sock

    def _wait(self, deadline: float, what: str) -> float:
        """Seconds left before the deadline; the socket waits at most that long."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._late(what)
        if self._sock is not None:
            self._sock.settimeout(left)
        return left

    def _late(self, what: str) -> DeadlineExceeded:
        return DeadlineExceeded(f"{self.where} did not finish answering {what} within its deadline")


class _StaleConnection(Exception):
    """The connection was closed before any byte of the answer (a dropped keep-alive, or a refusing server)."""


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float, client: HttpClient, what: str):
        self.sock, self.deadline, self.client, self.what = sock, deadline, client, what
        self.buf = bytearray()
        self.got_any = False
        self.http10 = False

    def _more(self) -> bool:
        self.client._wait(self.deadline, self.what)
        try:
            chunk = self.sock.recv(_CHUNK)
        except TimeoutError:
            raise self.client._late(self.what) from None
        except (ConnectionResetError, BrokenPipeError):
            if not self.got_any:
                raise _StaleConnection() from None
            chunk = b""
        if not chunk:
            if not self.got_any:
                raise _StaleConnection()
            return False
        self.got_any = True
        self.buf += chunk
        return True

    def head(self) -> tuple[int, str, dict[str, str]]:
        where = self.client.where
        while b"\r\n\r\n" not in self.buf:
            if len(self.buf) > MAX_HEADER_BYTES:
                raise ProtocolViolation(f"{where} sent more than {MAX_HEADER_BYTES // 1024} KiB of headers answering "
                                        f"{self.what}")
            if not self._more():
                raise ProtocolViolation(f"{where} closed the connection in the middle of the headers answering "
                                        f"{self.what}")
        end = self.buf.index(b"\r\n\r\n")
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        del self.buf[: end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolViolation(f"{where} answered {self.what} with something that is not HTTP/1.x "
                                    f"({lines[0][:60]!r})")
        self.http10 = parts[0] == "HTTP/1.0"
        headers: dict[str, str] = {}
        for ln in lines[1:]:
            k, sep, v = ln.partition(":")
            if not sep:
                raise ProtocolViolation(f"{where} sent a malformed header line answering {self.what}")
            headers[k.strip().lower()] = v.strip()
        return int(parts[1]), parts[2] if len(parts) > 2 else "", headers

    def _exactly(self, n: int, what_part: str) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise ProtocolViolation(f"{self.client.where} closed the connection after {len(self.buf):,} of "
                                        f"{n:,} bytes of {what_part} answering {self.what}")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def _too_big(self, size: str) -> ProtocolViolation:
        return ProtocolViolation(f"{self.client.where} answered {self.what} with {size}, more than the "
                                 f"{self.client.max_bytes / (1 << 20):g} MiB allowed (max_response_mb); not read")

    def body(self, headers: dict[str, str], method: str) -> bytes:
        limit = self.client.max_bytes
        if method == "HEAD":
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                while b"\r\n" not in self.buf:
                    if len(self.buf) > 1024 or not self._more():
                        raise ProtocolViolation(f"{self.client.where} sent a malformed chunked body answering "
                                                f"{self.what}")
                line, _, _ = bytes(self.buf).partition(b"\r\n")
                del self.buf[: len(line) + 2]
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise ProtocolViolation(f"{self.client.where} sent a malformed chunk size answering "
                                            f"{self.what}") from None
                if size == 0:
                    self._exactly(2, "the body")  # the final CRLF (no trailers expected)
                    return bytes(out)
                if len(out) + size > limit:
                    raise self._too_big("a chunked body")
                out += self._exactly(size, "the body")
                self._exactly(2, "the body")
        if "content-length" in headers:
            try:
                n = int(headers["content-length"])
            except ValueError:
                raise ProtocolViolation(f"{self.client.where} sent a malformed Content-Length answering "
                                        f"{self.what}") from None
            if n < 0:
                raise ProtocolViolation(f"{self.client.where} sent a negative Content-Length answering {self.what}")
            if n > limit:
                raise self._too_big(f"a {n / (1 << 20):.1f} MiB body")
            return self._exactly(n, "the body")
        while self._more():  # no framing: the body ends when the server closes the connection
            if len(self.buf) > limit:
                raise self._too_big("an unframed body")
        self.client.close()
        return bytes(self.buf)


def deadline_in(seconds: float) -> float:
    return time.monotonic() + float(seconds)


__all__ = ["Answer", "HttpClient", "TRANSIENT_STATUS", "deadline_in"]


def decode_infer(a: Answer, url: str, output: str, declared: str) -> tuple[Any, Any, str, str, Any]:
    """An OIP inference answer with the binary tensor extension (a JSON header of
    ``Inference-Header-Content-Length`` bytes, then the tensors' bytes) or JSON ``data``: the ``output`` tensor
    (flat), the answering model's name and version, the datatype and the shape it states."""
    n_json = a.headers.get("inference-header-content-length")
    try:
        n = int(n_json) if n_json is not None else len(a.body)
        if not 0 <= n <= len(a.body):
            raise ValueError
        doc = json.loads(a.body[:n].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ProtocolViolation(f"{url} answered an inference request with a malformed body") from None
    outs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outs, list):
        raise ProtocolViolation(f"{url} answered an inference request without an outputs list")
    offset, found = n, None
    for o in outs:
        size = int(((o.get("parameters") or {}).get("binary_data_size")) or 0) if isinstance(o, dict) else 0
        if isinstance(o, dict) and o.get("name") == output:
            found = (o, a.body[offset : offset + size] if size else None)
        offset += size
    if found is None:
        raise OutputContractError(f"{url} answered without its output {output!r}")
    o, blob = found
    dtype, shape = str(o.get("datatype")), o.get("shape")
    if dtype not in NUMERIC:
        raise OutputContractError(f"{url} answered its output {output!r} as {dtype}; declared "
                                  f"{declared}")
    if blob is not None:
        if offset > len(a.body):
            raise ProtocolViolation(f"{url} answered with {len(a.body) - n} bytes of tensor data where its "
                                    f"header announces {offset - n}")
        arr = np.frombuffer(blob, dtype=np.dtype(NUMERIC[dtype]).newbyteorder("<"))
    else:
        data = o.get("data")
        if not isinstance(data, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                 for v in data):
            raise OutputContractError(f"{url} answered its output {output!r} with data that are "
                                      f"not {dtype} numbers")
        arr = np.asarray(data, dtype=np.float64)
    return arr, doc.get("model_name"), str(doc.get("model_version") or ""), dtype, shape


def encode_infer(input: str, output: str, x: Any) -> tuple[bytes, dict[str, str]]:
    """An OIP inference request for one FP32 batch with the binary tensor extension: body and headers."""
    header = {"inputs": [{"name": input, "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": int(x.nbytes)}}],
              "outputs": [{"name": output, "parameters": {"binary_data": True}}]}
    j = json.dumps(header).encode()
    return j + np.ascontiguousarray(x).tobytes(), {"Content-Type": "application/octet-stream",
                                                   "Inference-Header-Content-Length": str(len(j))}


def triton_statistics(stats: Any) -> dict[str, int]:
    """Triton's statistics answer (HTTP ``/stats`` or gRPC as JSON) -> rows inferred, batches executed, requests
    ok / failed for the first model listed."""
    rows = (stats.get("model_stats") or [{}]) if isinstance(stats, dict) else [{}]
    s = rows[0] if rows else {}
    inf = s.get("inference_stats") or {}
    return {
        "inference_count": int(s.get("inference_count") or 0),
        "execution_count": int(s.get("execution_count") or 0),
        "success": int((inf.get("success") or {}).get("count") or 0),
        "fail": int((inf.get("fail") or {}).get("count") or 0),
    }
