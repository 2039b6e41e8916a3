"""A small Open Inference Protocol (KServe v2) server on 127.0.0.1 that misbehaves on request: the other side of the
misbehaving-server fault table (tests/faults/test_remote.py).  One model ``m``, input FP32 [-1, 1, 32, 32] (digits),
10 classes, max_batch_size 32; its honest answer is a softmax of fixed random projections of the image.

``behaviour`` (settable while it runs) picks what goes wrong; every wait inside the server checks ``stop`` so the
server thread ends with the test.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

K, SHAPE, MAX_BATCH = 10, (1, 32, 32), 32
_W = np.random.default_rng(0).normal(size=(int(np.prod(SHAPE)), K)).astype(np.float32) / 8


def honest(x: np.ndarray) -> np.ndarray:
    z = x.reshape(len(x), -1) @ _W
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


class OipServer:
    def __init__(self, behaviour: str = "ok"):
        self.behaviour = behaviour
        self.stop = threading.Event()
        self.infers = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                outer._get(self)

            def do_POST(self):  # noqa: N802
                outer._post(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v2/models/m"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OipServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- answers ----------------------------------------------------------------------------------------
    def _send(self, h, status: int, body: bytes, headers: dict | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {"Content-Type": "application/json"}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, status: int, doc) -> None:
        self._send(h, status, json.dumps(doc).encode())

    def _metadata(self) -> dict:
        out_type = "BYTES" if self.behaviour == "bytes_declared" else "FP32"
        platform = "onnxruntime_onnx"
        if self.behaviour == "metadata_changes" and self.infers >= 5:
            platform = "pytorch_libtorch"  # another model swapped in behind the same URL
        return {"name": "m", "versions": ["1"], "platform": platform,
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *SHAPE]}],
                "outputs": [{"name": "y", "datatype": out_type, "shape": [-1, K]}]}

    def _get(self, h) -> None:
        b = self.behaviour
        path = h.path.split("?")[0]
        if b == "redirect":
            return self._send(h, 307, b"", {"Location": "http://203.0.113.9/v2/models/m"})
        if b == "malformed_json" and path == "/v2/models/m":
            return self._send(h, 200, b'{"name": "m", "inputs": [')
        if b == "error_500":
            return self._json(h, 500, {"error": "internal failure in the inference backend"})
        if path == "/v2/models/m":
            return self._json(h, 200, self._metadata())
        if path == "/v2/models/m/config":
            return self._json(h, 200, {"name": "m", "max_batch_size": MAX_BATCH, "backend": "onnxruntime"})
        if path == "/v2/models/m/ready":
            return self._send(h, 200, b"")
        return self._json(h, 404, {"error": f"no route {path}"})

    def _read_request(self, h) -> np.ndarray:
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        n = int(h.headers.get("Inference-Header-Content-Length") or len(body))
        doc = json.loads(body[:n])
        shape = doc["inputs"][0]["shape"]
        return np.frombuffer(body[n:], dtype=np.float32).reshape(shape)

    def _post(self, h) -> None:
        x = self._read_request(h)
        b = self.behaviour
        self.infers += 1
        if b == "disappears" and self.infers > 1:
            return self._json(h, 400, {"error": "Request for unknown model: 'm' is not found"})
        y = honest(x)
        dtype, shape = "FP32", [len(x), K]
        if b == "nan":
            y[1, 3] = np.nan
        elif b == "negative":
            y[2] = y[2] - 0.2
        elif b == "unnormalised":
            y[0] *= 0.5
        elif b == "logits":
            y = np.log(y) * 3.0  # an honest server that returns logits
        elif b == "wrong_shape":
            y, shape = y[:, :9].copy(), [len(x), 9]
        elif b == "wrong_dtype":
            y, dtype = y.astype(np.float64), "FP64"
        blob = np.ascontiguousarray(y).tobytes()
        header = json.dumps({"model_name": "m", "model_version": "1",
                             "outputs": [{"name": "y", "datatype": dtype, "shape": shape,
                                          "parameters": {"binary_data_size": len(blob)}}]}).encode()
        body = header + blob
        heads = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
        if b == "never":
            while not self.stop.wait(0.05):
                pass
            return
        if b in ("trickle", "closes_mid_body", "huge"):
            h.send_response(200)
            for k, v in heads.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(200 << 20 if b == "huge" else len(body)))
            h.end_headers()
            h.wfile.flush()
            if b == "closes_mid_body":
                h.wfile.write(body[: len(body) // 3])
                h.wfile.flush()
                h.connection.shutdown(socket.SHUT_RDWR)
                h.close_connection = True
                return
            chunk = body[:4] if b == "trickle" else b"\0" * (1 << 20)
            try:
                for i in range(0, len(body) if b == "trickle" else 200, 1):
                    if self.stop.is_set():
                        return
                    h.wfile.write(body[4 * i : 4 * i + 4] if b == "trickle" else chunk)
                    h.wfile.flush()
                    if b == "trickle":
                        time.sleep(0.05)
            except OSError:  # the client gave up, as it should
                h.close_connection = True
            return
        self._send(h, 200, body, heads)
