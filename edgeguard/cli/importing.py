"""``import``: a user's PyTorch model (factory + state dict, or a torch.export program) becomes a bundle."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import (
    DATA_OPTION,
    DATA_ROOT,
    DATASET,
    JSON_OUT,
    KeyValue,
    _data_config,
    emit,
    floats,
    shape,
)


@click.command("import")
@click.argument("source", type=str)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder to write.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="State dict for a factory: .pt/.pth (read with weights_only=True) or .safetensors.")
@click.option("--factory-arg", "factory_args", type=KeyValue(), multiple=True, help="Factory keyword k=v (repeatable).")
@click.option("--input-shape", type=str, default=None, help="C,H,W of one input image (default: the dataset's).")
@click.option("--classes", type=str, default=None, help="Class count, or a file with one class name per line.")
@click.option("--mean", type=str, default=None, help="Per-channel mean the model expects on [0,1] inputs (default 0).")
@click.option("--std", type=str, default=None, help="Per-channel std the model expects (default 1).")
@click.option("--head", type=str, default=None, help="Dotted path of the final linear layer, when it is not found.")
@DATASET
@DATA_ROOT
@DATA_OPTION
@JSON_OUT
def import_cmd(source, out, weights, factory_args, input_shape, classes, mean, std, head, dataset, data_root,
               data_options, json_path):
    """Import SOURCE -- package.module:factory, path/file.py:factory (with --weights) or an ExportedProgram .pt2 --
    as a bundle that every protect / quantize / export / attack / verify command takes."""
    from edgeguard.api import import_model

    data = _data_config(dataset, data_root, data_options) if dataset or data_root or data_options else None
    res = import_model(source, out=out, input_shape=shape(input_shape), classes=classes, mean=floats(mean, "--mean"),
                       std=floats(std, "--std"), weights=weights, factory_args=dict(factory_args), head=head,
                       data=data)
    emit(res, json_path)
