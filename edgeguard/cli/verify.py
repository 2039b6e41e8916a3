"""``verify``: the watermark and the fragile triggers on one or more artifacts, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import (
    ARTIFACTS,
    DATA_ROOT,
    DATASET,
    DEVICE,
    JSON_OUT,
    REMOTE,
    SPLIT,
    _data_config,
    emit,
)


@click.command("verify")
@ARTIFACTS
@click.option("--vault", type=click.Path(path_type=Path), default=None,
              help="Owner vault (default for a bundle: its own BUNDLE/vault).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Significance level (default: the vault's, 1e-3).")
@DATASET
@DATA_ROOT
@SPLIT
@DEVICE
@JSON_OUT
@REMOTE
def verify_cmd(artifacts, vault, alpha, dataset, data_root, split, device, json_path):
    """Verify the watermark and the fragile triggers on one or more artifacts, side by side.

    Exit 0 only if every part the vault holds passes: watermark present, fragile triggers intact.  Exit 1 when a
    verdict is negative (watermark absent; fragile modified, or drift when the artifact was enrolled on another
    backend or precision -- reported as deployment drift, not tampering).
    """
    from edgeguard.api import verify_artifacts

    data = _data_config(dataset, data_root, ()) if dataset else None
    res = verify_artifacts(list(artifacts), vault, alpha=alpha, data=data, split=split, device=device)
    emit(res, json_path)
