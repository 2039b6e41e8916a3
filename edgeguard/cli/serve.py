"""``serve``: an artifact behind a real Triton Inference Server (PyTriton), until SIGTERM or Ctrl-C."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeguard.cli.options import ARTIFACT, DEVICE, JSON_OUT, emit


@click.command("serve")
@ARTIFACT
@click.option("--name", default="model", show_default=True, help="Model name: URLs end in /v2/models/NAME.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0: every interface).")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--max-batch", type=int, default=64, show_default=True, help="Largest batch the dynamic batcher forms.")
@click.option("--max-queue-delay-us", type=int, default=100, show_default=True,
              help="How long the dynamic batcher waits to fill a batch.")
@click.option("--instances", type=int, default=1, show_default=True, help="Model instances (one Runner each).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the access token of Triton's guarded endpoints (statistics) here, mode 0600.")
@click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keep Triton's own log in this file (default: a temporary file, removed at exit).")
@DEVICE
@JSON_OUT
def serve_cmd(artifact, name, host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us, instances,
              token_file, log_file, device, json_path):
    """Serve ARTIFACT (bundle, .onnx, .engine; host-side defenses included) with Triton Inference Server.

    HTTP and gRPC speak the Open Inference Protocol (KServe v2); dynamic batching is on.  When the model is ready,
    one JSON line goes to stdout: the URLs (http://HOST:PORT/v2/models/NAME, grpc://...), the pid and the public
    info the model config carries.  Every check takes the URL as its ARTIFACT.  SIGTERM or Ctrl-C drains and
    exits; the summary (requests, rows, batches) goes to stdout and --json.
    """
    from edgeguard.api import ServeConfig, serve

    cfg = ServeConfig(name=name, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                      max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances)

    def ready(record):
        click.echo(json.dumps(record))
        sys.stdout.flush()

    res = serve(artifact, cfg, device=device, ready=ready, token_file=token_file, log_file=log_file)
    emit(res, json_path)
