"""``pipeline``: every stage of a config (train -> export -> evaluate -> bench) into one run folder."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import DEVICE, JSON_OUT, SEED, emit


@click.command("pipeline")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder to write.")
@SEED
@DEVICE
@JSON_OUT
def pipeline_cmd(config_path, out, seed, device, json_path):
    """Run every stage of a config (train -> export -> evaluate -> bench) and write report.md/json."""
    from edgeguard.api import PipelineConfig, run_pipeline

    res = run_pipeline(PipelineConfig.load(config_path, seed=seed, device=device), out)
    emit(res, json_path)
