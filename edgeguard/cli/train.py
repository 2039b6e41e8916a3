"""``train``, ``export`` and ``info``: a bundle from a dataset, an ONNX graph from a bundle, an artifact's description."""

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
    floats,
    merge_flags,
    shape,
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
    last = res.fit.history[-1]
    emit(res, json_path, f"bundle {res.bundle} (sha256 {res.sha256[:12]}): {res.arch} on {res.dataset}, "
                         f"{res.fit.epochs} epochs in {res.fit.seconds:.1f} s, final loss {last['loss']:.4f}, "
                         f"train accuracy {last.get('train_accuracy', float('nan')):.4f}")


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
        emit(res, json_path, f"wrote {res.model_dir}: {res.platform}, max_batch_size {cfg.max_batch}, "
                             f"{cfg.instances} instance(s), defense {res.info['defense']['name']}, "
                             f"model sha256 {res.sha256[:12]}")
        return
    res = export_bundle(bundle, out, merge_flags(ExportConfig, "export", opset=opset, max_batch=max_batch), defense=defense,
                        defense_params=dict(defense_params), wrap=wrap, data=data, seed=seed)
    if hasattr(res, "original_sha256"):  # a third-party graph, wrapped
        emit(res, json_path, wrap_summary(res))
        return
    check = ("stored QDQ graph of the INT8 bundle" if res.self_check_max_abs_diff is None else
             f"self-check vs PyTorch: max |Δprob| {res.self_check_max_abs_diff:.2e}, "
             f"top-1 agreement {res.self_check_top1_agreement:.4f}")
    if res.defense != "none":
        head = (f"; head check max |Δ| {res.head_check_max_abs_diff:.2e}" if res.head_check_max_abs_diff is not None
                else "; random head, values not compared" if res.placement == "graph" else "")
        where = f"fused in the graph ({', '.join(res.head_ops)})" if res.placement == "graph" else f"host-side, state in {res.sidecar}"
        check += f"; defense {res.defense} {where}{head}"
    emit(res, json_path, f"wrote {res.path} ({res.bytes:,} bytes, opset {res.opset}, sha256 {res.sha256[:12]}); {check}")


def wrap_summary(res) -> str:
    head = f"defense {res.defense} fused ({', '.join(res.head_ops)})" if res.defense != "none" else "no defense"
    return (f"wrote {res.path} ({res.bytes:,} bytes, sha256 {res.sha256[:12]}): wraps {res.original_sha256[:12]} "
            f"({res.original_nodes} nodes, {res.original_initializers} initializers byte-identical), "
            f"{res.outputs} out of the original -> probabilities, {head}; self-check vs the original: max |Δprob| "
            f"{res.self_check_max_abs_diff:.2e}, top-1 agreement {res.self_check_top1_agreement:.4f}; "
            + "; ".join(res.notes))


@click.command("info")
@ARTIFACT
@JSON_OUT
@REMOTE
def info_cmd(artifact, json_path):
    """Describe an artifact: backend, precision, defense, input shape, classes, hashes, stages."""
    from edgeguard.api import describe_artifact

    res = describe_artifact(artifact)
    i = res.info
    lines = [
        f"artifact    {i['path']}",
        f"backend     {i['backend']} ({i['device']})",
        f"precision   {i['precision']}",
        f"defense     {i['defense']}",
        f"input       N x {' x '.join(str(d) for d in i['input_shape'])} "
        + ("(normalisation unknown: not recorded in the graph)" if "third_party" in res.details
           else "(raw images in [0,1] or uint8)"),
        f"classes     {len(i['classes'])}: {', '.join(i['classes'][:10])}{' ...' if len(i['classes']) > 10 else ''}",
        f"sha256      {i['sha256']}",
    ]
    if "manifest" in res.details:
        m = res.details["manifest"]
        lines.append(f"arch        {m['arch']} (edgeguard {m.get('edgeguard_version', '?')})")
        lines.append(f"stages      {' -> '.join(s['stage'] for s in m['stages'])}")
        lines.append(f"vault       {', '.join(res.details['vault_entries']) or '(empty)'}")
    if "onnx" in res.details:
        o = res.details["onnx"]
        lines.append(f"onnx        opset {o['opset']}, {o['nodes']} nodes, {o['bytes']:,} bytes")
    if "third_party" in res.details:
        t = res.details["third_party"]
        lines.append(f"outputs     {t['outputs']} ({t['why']})" + ("; the runner applies a softmax"
                                                                    if t["outputs"] == "logits" else ""))
        lines.append("note        not an edgeguard artifact: `edgeguard export FILE --mean .. --std .. --out W.onnx` "
                     "wraps it (raw images in, probabilities out, defense fused)")
    if "wrapped" in res.details:
        w = res.details["wrapped"]
        a, b = w["node_range"]
        i0, i1 = w["initializer_range"]
        lines.append(f"wraps       {w['file']} (sha256 {w['sha256'][:12]}, returns {w['outputs']}, layout "
                     f"{w['layout']}): {b - a} nodes, {i1 - i0} initializers "
                     + ("byte-identical (checked now)" if w["intact"] else "CHANGED since wrapping"))
    emit(res, json_path, "\n".join(lines))
