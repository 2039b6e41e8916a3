"""The metadata edgeguard writes into every exported artifact and the Runners read back.

Keys live in ONNX ``metadata_props`` (and later in an engine's manifest).  Values are strings; lists
and mappings are JSON.  Nothing secret (vault content) is ever written here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from edgeguard import __version__

PREFIX = "edgeguard."
KEYS = (
    "version",
    "arch",
    "classes",
    "input_shape",
    "normalization",
    "precision",
    "defense",
    "output",
    "source_sha256",
    "stages",
    "quantization",
    "magicguard",
    "wrapped",
)
JSON_KEYS = {"classes", "input_shape", "normalization", "defense", "stages", "quantization", "magicguard", "wrapped"}


def encode(meta: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in meta.items():
        if k not in KEYS:
            raise ValueError(f"unknown artifact metadata key {k!r}")
        out[PREFIX + k] = json.dumps(v) if k in JSON_KEYS else str(v)
    return out


def decode(props: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in props.items():
        if not k.startswith(PREFIX):
            continue
        key = k[len(PREFIX) :]
        try:
            out[key] = json.loads(v) if key in JSON_KEYS else v
        except json.JSONDecodeError:
            out[key] = v
    return out


def public_info(runner: Any) -> dict[str, Any]:
    """What a server may tell any client about the artifact it serves: precision, defense name and public
    parameters, input shape, classes, the artifact's sha256.  Built from the runner's info and the artifact's own
    public metadata -- never from a vault."""
    info = runner.info
    r = info.defense_record
    defense: dict[str, Any] = {"name": r.name}
    if r.name != "none":
        defense.update(params=dict(r.params), placement=r.placement)
    return {
        "precision": info.precision,
        "defense": defense,
        "input_shape": [d for d in info.input_shape],
        "classes": list(info.classes),
        "sha256": info.sha256,
        "backend": info.backend,
        "device": info.device,
        "output": "probabilities",
        "version": __version__,
    }
