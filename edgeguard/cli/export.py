"""``export``: a bundle (or a third-party .onnx, wrapped) to ONNX with a fused defense, or a Triton model repository."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import (
    DATA_OPTION,
    DATA_ROOT,
    DATASET,
    JSON_OUT,
    SEED,
    KeyValue,
    _data_config,
    _registry_names,
    emit,
    floats,
    merge_flags,
    shape,
)


@click.command("export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The .onnx file to write; with --format triton-repo, the repository folder (REPO/NAME is written).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "triton-repo"]), default="onnx", show_default=True,
              help="triton-repo: a model repository for the Triton container (config.pbtxt + 1/model.onnx or .plan).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20).")
@click.option("--max-batch", type=int, default=None,
              help="ONNX: upper bound of the dynamic batch axis (default 4096); triton-repo: max_batch_size (default 64).")
@click.option("--defense", default="none", show_default=True,
              help="Output defense against model extraction: " + ", ".join(_registry_names("defense")) + ".")
@click.option("--defense-param", "defense_params", type=KeyValue(), multiple=True,
              help="Defense parameter (repeatable), e.g. --defense-param beta=0.5.")
@click.option("--name", default="model", show_default=True, help="triton-repo: the model's name (REPO/NAME).")
@click.option("--instances", type=int, default=1, show_default=True, help="triton-repo: instance_group count.")
@click.option("--kind", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="triton-repo: instance kind (auto: KIND_GPU for an engine, KIND_CPU for ONNX).")
@click.option("--outputs", type=click.Choice(["auto", "logits", "probabilities"]), default=None,
              help="Third-party .onnx: what the graph returns (default: detected on a probe batch, and said).")
@click.option("--mean", type=str, default=None, help="Third-party .onnx: per-channel mean it expects on [0,1] images.")
@click.option("--std", type=str, default=None, help="Third-party .onnx: per-channel std it expects.")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default=None,
              help="Third-party .onnx: its input layout (the wrapped graph always takes NCHW).")
@click.option("--input-shape", type=str, default=None, help="Third-party .onnx: C,H,W where the graph leaves them dynamic.")
@click.option("--classes", type=str, default=None, help="Third-party .onnx: class count or a names file.")
@DATASET
@DATA_ROOT
@DATA_OPTION
@SEED
@JSON_OUT
def export_cmd(bundle, out, fmt, opset, max_batch, defense, defense_params, name, instances, kind, outputs, mean, std,
               layout, input_shape, classes, dataset, data_root, data_options, seed, json_path):
    """Export a bundle to ONNX (probabilities out, dynamic batch, metadata, parity self-check).

    With --defense the defense head is fused into the graph after the logits, in FP32, for FP32 and INT8
    bundles; host-side defenses (mad, modelguard_s online=true, modelguard_w solver=lp) write their state
    next to the graph as MODEL.defense.pt and open_runner serves the pair.

    With --format triton-repo, BUNDLE may also be an exported .onnx or a built .engine/.plan; the repository's
    graph carries the defense fused, so no Python runs in the server (host-side defenses are refused: use
    `edgeguard serve`).
    """
    from edgeguard.api import (
        ExportConfig,
        TritonRepoConfig,
        WrapConfig,
        export_bundle,
        export_triton_repo,
        parse_classes,
    )

    wrap_flags = {"outputs": outputs, "mean": floats(mean, "--mean"), "std": floats(std, "--std"), "layout": layout,
                  "input_shape": shape(input_shape),
                  "classes": parse_classes(classes, None) if classes is not None else None}
    wrap = merge_flags(WrapConfig, "export", **wrap_flags) if any(v is not None for v in wrap_flags.values()) else None
    data = _data_config(dataset, data_root, data_options) if dataset or data_root or data_options else None
    seed = 0 if seed is None else seed
    if fmt == "triton-repo":
        cfg = merge_flags(TritonRepoConfig, "export", name=name, instances=instances, kind=kind, max_batch=max_batch)
        res = export_triton_repo(bundle, out, cfg, defense=defense, defense_params=dict(defense_params),
                                 export=merge_flags(ExportConfig, "export", opset=opset), wrap=wrap, data=data, seed=seed)
        emit(res, json_path)
        return
    res = export_bundle(bundle, out, merge_flags(ExportConfig, "export", opset=opset, max_batch=max_batch), defense=defense,
                        defense_params=dict(defense_params), wrap=wrap, data=data, seed=seed)
    emit(res, json_path)
