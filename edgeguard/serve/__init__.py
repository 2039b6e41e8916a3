"""Serving: ``serve`` hosts an artifact's Runner in a real Triton Inference Server (PyTriton, extra ``[serve]``).

A served model is checked like a file: ``open_runner("http://HOST:PORT/v2/models/NAME")`` (see
:mod:`edgeguard.runtime.remote`).  For the production Triton container, ``export --format triton-repo`` writes a
model repository instead (:mod:`edgeguard.export.triton_repo`).
"""

from edgeguard.serve.process import ServerProcess, free_ports, launch
from edgeguard.serve.triton import ServeConfig, ServeResult, check_ports, serve, server_env

__all__ = ["ServeConfig", "ServeResult", "ServerProcess", "check_ports", "free_ports", "launch", "serve", "server_env"]
