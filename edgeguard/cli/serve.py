"""``serve``: an artifact behind a real Triton Inference Server (PyTriton), until SIGTERM or Ctrl-C."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeguard.api import ServeConfig
from edgeguard.cli.options import ARTIFACT, DEVICE, JSON_OUT, emit, merge_flags

_D = ServeConfig()  # the defaults shown in --help come from the config


@click.command("serve")
@ARTIFACT
@click.option("--name", default=None, help=f"Model name: URLs end in /v2/models/NAME.  [default: {_D.name}]")
@click.option("--host", default=None, help=f"Bind address (0.0.0.0: every interface).  [default: {_D.host}]")
@click.option("--http-port", type=int, default=None, help=f"[default: {_D.http_port}]")
@click.option("--grpc-port", type=int, default=None, help=f"[default: {_D.grpc_port}]")
@click.option("--metrics-port", type=int, default=None, help=f"[default: {_D.metrics_port}]")
@click.option("--max-batch", type=int, default=None,
              help=f"Largest batch the dynamic batcher forms.  [default: {_D.max_batch}]")
@click.option("--max-queue-delay-us", type=int, default=None,
              help=f"How long the dynamic batcher waits to fill a batch.  [default: {_D.max_queue_delay_us}]")
@click.option("--instances", type=int, default=None, help=f"Model instances (one Runner each).  [default: {_D.instances}]")
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
    from edgeguard.api import serve

    cfg = merge_flags(ServeConfig, "serve", name=name, host=host, http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                      instances=instances)

    def ready(record):
        click.echo(json.dumps(record))
        sys.stdout.flush()

    res = serve(artifact, cfg, device=device, ready=ready, token_file=token_file, log_file=log_file)
    emit(res, json_path)
