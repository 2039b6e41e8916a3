"""``train`` and ``info``: a bundle from a dataset, an artifact's description."""

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
    SEED,
    KeyValue,
    _data_config,
    _registry_names,
    emit,
    merge_flags,
)


@click.command("train")
@DATASET
@DATA_ROOT
@DATA_OPTION
@click.option("--arch", type=click.Choice(_registry_names("model")), default=None, help="Model registry name (default smallcnn).")
@click.option("--model-option", "model_options", type=KeyValue(), multiple=True, help="Model option k=v (repeatable).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="YAML with data/model/train sections (as in a pipeline config); flags override it.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default=None)
@click.option("--schedule", type=click.Choice(["cosine", "step", "none"]), default=None)
@click.option("--augment", type=click.Choice(["none", "shift", "crop_flip"]), default=None)
@click.option("--early-stop", "early_stop_patience", type=int, default=None, help="Patience in epochs on a 10% hold-out (0: off).")
@click.option("--max-steps", type=int, default=None)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@SEED
@DEVICE
@JSON_OUT
def train_cmd(dataset, data_root, data_options, arch, model_options, config_path, epochs, batch_size, lr, optimizer,
              schedule, augment, early_stop_patience, max_steps, out, seed, device, json_path):
    """Train a model on a dataset and write a bundle."""
    from edgeguard.api import PipelineConfig, train_bundle

    base = PipelineConfig.load(config_path) if config_path else PipelineConfig()
    data = _data_config(dataset, data_root, data_options, base.data)
    model = merge_flags(base.model, "model", arch=arch, options=dict(model_options) or None)
    train = merge_flags(base.train_config(), "train", epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                        schedule=schedule, augment=augment, early_stop_patience=early_stop_patience,
                        max_steps=max_steps, seed=seed, device=device)
    res = train_bundle(data, model, train, out)
    emit(res, json_path)


@click.command("info")
@ARTIFACT
@JSON_OUT
@REMOTE
def info_cmd(artifact, json_path):
    """Describe an artifact: backend, precision, defense, input shape, classes, hashes, stages."""
    from edgeguard.api import describe_artifact

    res = describe_artifact(artifact)
    emit(res, json_path)
