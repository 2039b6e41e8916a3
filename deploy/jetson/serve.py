#!/usr/bin/env python3
"""A small prediction server over a TensorRT engine: Python 3.10 standard library + edgeguard's TensorRT runner.

    python3 serve.py --engine /models/model.engine [--host 0.0.0.0] [--port 8080]

GET  /health   -> 200 {"status": "ok", engine, sha256, tensorrt_version, compute_capability, gpu, precision,
                       defense, classes, edgeguard_version, source_onnx_sha256}
POST /predict  -> 200 {"probabilities": [[...]], "top1": [...]}
                  body: JSON {"inputs": N x C x H x W (or C x H x W) numbers, uint8 0-255 or floats 0-1,
                  "dtype": "uint8" | "float32" (default: uint8 if every value is an integer, else float32)}
                  or a raw .npy array with Content-Type application/x-npy.
Bad input -> 400 {"error": one sentence}.  The engine is opened once at start (the runner refuses an engine built
for another TensorRT or GPU: exit 2, rebuild with device_check.py); one inference runs at a time.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

MAX_BODY = 64 << 20


def _to_array(body: bytes, content_type: str) -> np.ndarray:
    if content_type.startswith("application/x-npy"):
        return np.load(io.BytesIO(body), allow_pickle=False)
    req = json.loads(body)
    if not isinstance(req, dict) or "inputs" not in req:
        raise ValueError('the JSON body must be an object with "inputs"')
    arr = np.asarray(req["inputs"])
    dtype = req.get("dtype") or ("uint8" if np.issubdtype(arr.dtype, np.integer) else "float32")
    if dtype not in ("uint8", "float32"):
        raise ValueError('"dtype" must be "uint8" or "float32"')
    if dtype == "uint8" and (arr.min() < 0 or arr.max() > 255):
        raise ValueError("uint8 inputs must lie in 0..255")
    return arr.astype(dtype)


def make_handler(runner: Any, health: dict[str, Any]):
    from edgeguard.errors import EdgeguardError

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        server_version = "edgeguard-serve/1"

        def _send(self, code: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") == "/health":
                self._send(200, health)
            else:
                self._send(404, {"error": f"no route {self.path}; use GET /health or POST /predict"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/predict":
                self._send(404, {"error": f"no route {self.path}; use POST /predict"})
                return
            n = int(self.headers.get("Content-Length") or 0)
            if n <= 0 or n > MAX_BODY:
                self._send(400 if n <= 0 else 413, {"error": f"the body must hold 1..{MAX_BODY} bytes"})
                return
            try:
                x = _to_array(self.rfile.read(n), self.headers.get("Content-Type", "application/json"))
                with lock:
                    probs = runner.predict(x)
            except (ValueError, EdgeguardError) as e:
                self._send(400, {"error": str(e)})
                return
            self._send(200, {"probabilities": probs.tolist(), "top1": probs.argmax(1).tolist()})

        def log_message(self, format: str, *args: Any) -> None:  # one line per request on stderr
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return Handler


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description="Serve predictions from a TensorRT engine.")
    ap.add_argument("--engine", required=True)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    a = ap.parse_args(argv)

    from edgeguard.errors import EdgeguardError
    from edgeguard.runtime import open_runner

    try:
        runner = open_runner(a.engine)
        info = runner.info
        runner.predict(np.zeros((1, *info.input_shape), np.uint8))  # warm-up (CUDA lazy loading)
    except EdgeguardError as e:
        print(f"serve: error: {e}", file=sys.stderr)
        return e.exit_code
    m = getattr(runner, "manifest", {}) or {}
    details = dict(info.details)
    health = {
        "status": "ok",
        "engine": a.engine,
        "sha256": info.sha256,
        "tensorrt_version": details.get("tensorrt_version"),
        "compute_capability": details.get("compute_capability"),
        "gpu": info.device,
        "precision": info.precision,
        "defense": info.defense,
        "classes": list(info.classes),
        "input_shape": list(info.input_shape),
        "edgeguard_version": m.get("edgeguard_version"),
        "source_onnx_sha256": m.get("source_onnx_sha256"),
        "built_at": m.get("built_at"),
    }
    server = ThreadingHTTPServer((a.host, a.port), make_handler(runner, health))
    print(f"serving {a.engine} ({info.precision}, {info.device}) on http://{a.host}:{a.port}", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
