"""``evaluate ARTIFACT`` (accuracy, plus defense measurements) and ``evaluate grid`` (defenses x attacks x seeds)."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import (
    ARTIFACT,
    DATA_OPTION,
    DATA_ROOT,
    DATASET,
    DEVICE,
    JSON_OUT,
    REMOTE,
    SPLIT,
    KeyValue,
    _data_config,
    _default_data,
    emit,
)


@click.command("grid")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Grid config (YAML): victim, defenses, attacks, seeds; e.g. configs/grid-default.yaml.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder; running again into it resumes (finished cells are not recomputed).")
@click.option("--backend", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: a process pool on this machine; ray: Ray tasks (pip install 'edgeguard[dist]').")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes (default: the config's, else 2).")
@JSON_OUT
def evaluate_grid_cmd(config_path, out, backend, workers, json_path):
    """Defenses x extraction attacks x seeds against one victim, resumable.

    Any defense or attack parameter given as a list is swept.  Writes OUT/grid.json, OUT/grid.md, OUT/plots/*.png
    (defender accuracy against attacker accuracy and fidelity, per attack) and one OUT/cells/ID.json per cell.
    """
    from edgeguard.api import GridConfig, run_grid

    res = run_grid(GridConfig.load(config_path), out, backend=backend, workers=workers)
    emit(res, json_path)


class EvaluateCommand(click.Command):
    """``evaluate ARTIFACT`` as before; ``evaluate grid ...`` runs :func:`evaluate_grid_cmd` with its own options."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "grid":
            return evaluate_grid_cmd.make_context(f"{info_name} grid", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@click.command("evaluate", cls=EvaluateCommand,
               epilog="The defense x attack grid: edgeguard evaluate grid --help.")
@ARTIFACT
@DATASET
@DATA_ROOT
@DATA_OPTION
@SPLIT
@click.option("--min-accuracy", type=click.FloatRange(0.0, 1.0), default=None, help="Exit 1 if accuracy is below this (0-1).")
@click.option("--ood-dataset", default=None,
              help="Out-of-distribution query set for defense measurements (default: synthetic gratings at the model's shape).")
@click.option("--ood-option", "ood_options", type=KeyValue(), multiple=True, help="Option k=v of the OOD dataset (repeatable).")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="Time a defended artifact against its undefended view at batch 1 and 64.")
@DEVICE
@JSON_OUT
@REMOTE
def evaluate_cmd(artifact, dataset, data_root, data_options, split, min_accuracy, ood_dataset, ood_options, latency, device,
                 json_path):
    """Top-1 accuracy of an artifact on a dataset split, through its Runner.

    For an artifact with an output defense it also measures the defense against the artifact's own undefended
    view: argmax agreement, mean/max L1 on the split and on an out-of-distribution set, and latency overhead.
    """
    from edgeguard.api import evaluate

    ood = _data_config(ood_dataset, None, ood_options) if ood_dataset else None
    res = evaluate(artifact, _data_config(dataset, data_root, data_options, _default_data(artifact)), split=split,
                   min_accuracy=min_accuracy, ood=ood, latency=latency, device=device)
    emit(res, json_path)
