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
