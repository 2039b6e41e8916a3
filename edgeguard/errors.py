"""Errors that carry the CLI exit code they map to (see DESIGN.md, "CLI contract").

The library raises these; ``edgeguard.cli.main`` catches them in one place and prints the message
as one sentence on stderr.  Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgeguardError(Exception):
    """Base class: an expected failure with a one-sentence message and an exit code."""

    exit_code = 1


class CheckFailed(EdgeguardError):
    """A check ran and its verdict is negative (watermark absent, tampering detected, parity lost)."""

    exit_code = 1


class BadInput(EdgeguardError):
    """Bad usage or bad input: missing or corrupt file, wrong shape, unknown name, bad config."""

    exit_code = 2


class BackendUnavailable(EdgeguardError):
    """A needed optional backend is missing: tensorrt, a GPU, an execution provider, an extra."""

    exit_code = 3


class RemoteError(EdgeguardError):
    """A server could not be reached, did not answer within its deadline, or answered against the protocol
    (malformed, oversized, redirected, an HTTP 5xx, the model gone or swapped mid-run).  Nothing the user typed was
    wrong, so it is not exit 2: exit 4 says "the other side failed"; ``transient`` says whether a retry may help."""

    exit_code = 4

    def __init__(self, message: str, *, transient: bool = False, status: int | None = None):
        super().__init__(message)
        self.transient = transient
        self.status = status


class Unreachable(RemoteError):
    """No connection: refused, reset before an answer, no route, name not resolved."""


class DeadlineExceeded(RemoteError):
    """A request (connect + send + receive, retries included) or the whole check ran past its deadline."""


class ProtocolViolation(RemoteError):
    """The server answered, but not as the Open Inference Protocol says: status, framing, JSON, size, identity."""


class OutputContractError(BadInput):
    """An artifact edgeguard did not make returned something that is not (N, classes) probabilities: non-finite,
    negative, not summing to 1, or in another datatype or shape than declared (exit 2, like any bad input)."""


class ServerExited(RemoteError):
    """``edgeguard serve``: the Triton Inference Server it runs died (killed, crashed) instead of being stopped."""
