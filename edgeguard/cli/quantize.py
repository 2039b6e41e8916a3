"""``quantize``: a bundle to INT8 (PT2E PTQ or QAT)."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import BUNDLE, DATA_ROOT, JSON_OUT, SEED, _registry_names, emit, merge_flags


@click.command("quantize")
@BUNDLE
@click.option("--mode", type=click.Choice(["ptq", "qat"]), default="ptq", show_default=True)
@click.option("--target", type=click.Choice(["tensorrt", "cpu"]), default="tensorrt", show_default=True,
              help="tensorrt: symmetric INT8 (zero point 0); cpu: U8 activations + S8 weights for ONNX Runtime on x86.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="INT8 bundle to write.")
@click.option("--calibration", type=click.Choice(["minmax", "histogram"]), default=None, help="PTQ observer (default histogram).")
@click.option("--calib-samples", type=int, default=None, help="Calibration images from the training split (default 512).")
@click.option("--calib-dataset", type=click.Choice(_registry_names("dataset")), default=None,
              help="Calibration / QAT data (default: the bundle's own training data).")
@DATA_ROOT
@click.option("--exclude", multiple=True, help="Module path kept in float (repeatable).")
@click.option("--epochs", type=int, default=None, help="QAT epochs (default 2).")
@click.option("--lr", type=float, default=None, help="QAT learning rate (default 1e-3).")
@click.option("--freeze-observers", "freeze_observers_epoch", type=int, default=None,
              help="QAT: stop updating observers from this epoch on.")
@SEED
@JSON_OUT
def quantize_cmd(bundle, mode, target, out, calibration, calib_samples, calib_dataset, data_root, exclude, epochs, lr,
                 freeze_observers_epoch, seed, json_path):
    """Quantize a bundle to INT8 (PT2E PTQ or QAT); the result carries a QDQ ONNX graph."""
    from edgeguard.api import PtqConfig, QatConfig, quantize_bundle

    base = merge_flags(PtqConfig, "quantize", target=target, calibration=calibration, calib_samples=calib_samples,
                       calib_dataset=calib_dataset, calib_root=data_root, exclude=tuple(exclude) or None, seed=seed)
    cfg = base if mode == "ptq" else merge_flags(QatConfig, "quantize", base=base, epochs=epochs, lr=lr,
                                                 freeze_observers_epoch=freeze_observers_epoch, seed=seed)
    res = quantize_bundle(bundle, out, cfg)
    emit(res, json_path)
