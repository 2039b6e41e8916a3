"""edgeguard: protect image classifiers and check the protections on the artifact that ships.

The public surface is listed here by name; everything else is internal.
"""

__version__ = "0.1.0"

from edgeguard.errors import BackendUnavailable, BadInput, CheckFailed, EdgeguardError  # noqa: E402

__all__ = [
    "__version__",
    "EdgeguardError",
    "BadInput",
    "CheckFailed",
    "BackendUnavailable",
]
