"""The ``edgeguard`` command line: one thin command per stage over ``edgeguard.api``.

Contract (DESIGN.md): every command takes ``--json PATH``; exit 0 success, 1 a check failed,
2 bad usage or input, 3 a needed optional backend is missing.  Results go to stdout, progress to
stderr, and an error is one sentence on stderr -- never a traceback for a user error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from edgeguard.errors import EdgeguardError

# --- shared options, defined once ------------------------------------------------------------------


class KeyValue(click.ParamType):
    """``k=v`` -> (k, v); a malformed pair is a usage error (exit 2)."""

    name = "k=v"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        if "=" not in value:
            self.fail(f"{value!r} is not of the form key=value", param, ctx)
        k, v = value.split("=", 1)
        return k.strip(), _scalar(v.strip())


def _scalar(v: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(v)
    except yaml.YAMLError:
        return v


def _registry_names(kind: str) -> list[str]:
    if kind == "model":
        from edgeguard.models import MODELS

        return MODELS.names()
    if kind == "defense":
        from edgeguard.defenses import DEFENSES

        return DEFENSES.names()
    from edgeguard.data import DATASETS

    return DATASETS.names()


JSON_OUT = click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the result as JSON to this file.")
SEED = click.option("--seed", type=int, default=None, help="Random seed (default: the config's, else 0).")
DEVICE = click.option("--device", type=str, default=None, help="cpu (default) or cuda[:N].")
ARTIFACT = click.argument("artifact", type=click.Path(path_type=Path))
DATASET = click.option("--dataset", type=click.Choice(_registry_names("dataset")), default=None, help="Dataset registry name.")
DATA_ROOT = click.option("--data-root", type=str, default=None, help="Where the dataset's files are (on-disk formats).")
DATA_OPTION = click.option("--data-option", "data_options", type=KeyValue(), multiple=True, help="Dataset option k=v (repeatable).")
SPLIT = click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)


def _data_config(dataset: str | None, root: str | None, options: tuple, default: Any = None):
    from edgeguard.config import DataConfig

    base = default or DataConfig()
    if dataset is not None and dataset != base.name:
        base = DataConfig(name=dataset)  # another dataset: the default's root and options do not apply to it
    opts = dict(base.options)
    opts.update(dict(options))
    return DataConfig(name=dataset or base.name, root=root if root is not None else base.root, options=opts)


def emit(result: Any, json_path: Path | None, human: str) -> None:
    """Print the human summary, write the JSON, and exit 1 if the result's verdict is negative."""
    if json_path is not None:
        from edgeguard.fileio import atomic_write_json

        atomic_write_json(json_path, result.to_json())
    click.echo(human)
    if not getattr(result, "passed", True):
        raise SystemExit(1)


# --- the commands ------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeguard")
@click.option("-q", "--quiet", is_flag=True, help="No progress output on stderr.")
def cli(quiet: bool) -> None:
    """edgeguard: train, protect, quantize, export and verify image classifiers.

    ARTIFACT arguments take a bundle folder, a .onnx file or a .engine file.
    """
    if quiet:
        os.environ["EDGEGUARD_QUIET"] = "1"


@cli.command("train")
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
    from edgeguard.api import train_bundle
    from edgeguard.config import ModelConfig
    from edgeguard.pipeline import PipelineConfig

    base = PipelineConfig.load(config_path) if config_path else PipelineConfig()
    data = _data_config(dataset, data_root, data_options, base.data)
    model = ModelConfig(arch=arch or base.model.arch, options={**base.model.options, **dict(model_options)})
    train = base.train_config().replace(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
                                        augment=augment, early_stop_patience=early_stop_patience, max_steps=max_steps,
                                        seed=seed, device=device)
    res = train_bundle(data, model, train, out)
    last = res.fit.history[-1]
    emit(res, json_path, f"bundle {res.bundle} (sha256 {res.sha256[:12]}): {res.arch} on {res.dataset}, "
                         f"{res.fit.epochs} epochs in {res.fit.seconds:.1f} s, final loss {last['loss']:.4f}, "
                         f"train accuracy {last.get('train_accuracy', float('nan')):.4f}")


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
    from edgeguard.evaluate.grid import GridConfig, run_grid

    res = run_grid(GridConfig.load(config_path), out, backend=backend, workers=workers)
    c = res.report["counts"]
    emit(res, json_path, res.table() + f"\n{c['done']}/{c['cells']} cells done (computed {c['computed']}, reused "
                                       f"{c['reused']}, failed {c['failed']}); report: {Path(out) / 'grid.md'}")


class EvaluateCommand(click.Command):
    """``evaluate ARTIFACT`` as before; ``evaluate grid ...`` runs :func:`evaluate_grid_cmd` with its own options."""

    def make_context(self, info_name, args, parent=None, **extra):
        if args and args[0] == "grid":
            return evaluate_grid_cmd.make_context(f"{info_name} grid", list(args[1:]), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


@cli.command("evaluate", cls=EvaluateCommand,
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
@SEED
@JSON_OUT
def evaluate_cmd(artifact, dataset, data_root, data_options, split, min_accuracy, ood_dataset, ood_options, latency, device,
                 seed, json_path):
    """Top-1 accuracy of an artifact on a dataset split, through its Runner.

    For an artifact with an output defense it also measures the defense against the artifact's own undefended
    view: argmax agreement, mean/max L1 on the split and on an out-of-distribution set, and latency overhead.
    """
    from edgeguard.api import evaluate_artifact, evaluate_defense
    from edgeguard.config import DataConfig
    from edgeguard.evaluate import BenchConfig

    data = _data_config(dataset, data_root, data_options, _default_data(artifact))
    res = evaluate_artifact(artifact, data, split=split, min_accuracy=min_accuracy, device=device)
    art = res.artifact
    human = (f"accuracy {res.accuracy:.4f} ({res.correct}/{res.n}) on {res.dataset}/{res.split}: "
             f"{artifact} [{art['backend']} {art['precision']}, defense {art['defense']}]")
    if art["defense"] != "none":
        ood = DataConfig(ood_dataset, options=dict(ood_options)) if ood_dataset else None
        bench = BenchConfig(batch_sizes=(1, 64), warmup=5, iterations=60, seed=seed or 0) if latency else None
        measured = evaluate_defense(artifact, data, split=split, ood=ood, bench=bench, device=device)
        res = _Combined(res, {"defense_measurements": measured.to_json()})
        human += "\n" + measured.summary()
    emit(res, json_path, human)


class _Combined:
    """A result plus extra JSON sections; keeps the first result's verdict."""

    def __init__(self, base: Any, extra: dict[str, Any]):
        self.base, self.extra = base, extra
        self.passed = getattr(base, "passed", True)

    def to_json(self) -> dict[str, Any]:
        return {**self.base.to_json(), **self.extra}


def _default_data(artifact: Path):
    """A bundle remembers the dataset it was trained on; use it when --dataset is not given."""
    from edgeguard.bundle import is_bundle, load_bundle
    from edgeguard.config import DataConfig
    from edgeguard.protect.watermark import bundle_data_config

    return bundle_data_config(load_bundle(artifact, verify=False)) if is_bundle(artifact) else DataConfig()


@cli.command("export")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file to write.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 20).")
@click.option("--max-batch", type=int, default=None, help="Upper bound of the dynamic batch axis.")
@click.option("--defense", default="none", show_default=True,
              help="Output defense against model extraction: " + ", ".join(_registry_names("defense")) + ".")
@click.option("--defense-param", "defense_params", type=KeyValue(), multiple=True,
              help="Defense parameter (repeatable), e.g. --defense-param beta=0.5.")
@SEED
@JSON_OUT
def export_cmd(bundle, out, opset, max_batch, defense, defense_params, seed, json_path):
    """Export a bundle to ONNX (probabilities out, dynamic batch, metadata, parity self-check).

    With --defense the defense head is fused into the graph after the logits, in FP32, for FP32 and INT8
    bundles; host-side defenses (mad, modelguard_s online=true, modelguard_w solver=lp) write their state
    next to the graph as MODEL.defense.pt and open_runner serves the pair.
    """
    from edgeguard.api import export_bundle
    from edgeguard.export import ExportConfig

    res = export_bundle(bundle, out, ExportConfig().replace(opset=opset, max_batch=max_batch), defense=defense,
                        defense_params=dict(defense_params))
    check = ("stored QDQ graph of the INT8 bundle" if res.self_check_max_abs_diff is None else
             f"self-check vs PyTorch: max |Δprob| {res.self_check_max_abs_diff:.2e}, "
             f"top-1 agreement {res.self_check_top1_agreement:.4f}")
    if res.defense != "none":
        head = (f"; head check max |Δ| {res.head_check_max_abs_diff:.2e}" if res.head_check_max_abs_diff is not None
                else "; random head, values not compared" if res.placement == "graph" else "")
        where = f"fused in the graph ({', '.join(res.head_ops)})" if res.placement == "graph" else f"host-side, state in {res.sidecar}"
        check += f"; defense {res.defense} {where}{head}"
    emit(res, json_path, f"wrote {res.path} ({res.bytes:,} bytes, opset {res.opset}, sha256 {res.sha256[:12]}); {check}")


@cli.command("info")
@ARTIFACT
@SEED
@JSON_OUT
def info_cmd(artifact, seed, json_path):
    """Describe an artifact: backend, precision, defense, input shape, classes, hashes, stages."""
    from edgeguard.api import describe_artifact

    res = describe_artifact(artifact)
    i = res.info
    lines = [
        f"artifact    {i['path']}",
        f"backend     {i['backend']} ({i['device']})",
        f"precision   {i['precision']}",
        f"defense     {i['defense']}",
        f"input       N x {' x '.join(str(d) for d in i['input_shape'])} (raw images in [0,1] or uint8)",
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
    emit(res, json_path, "\n".join(lines))


@cli.command("bench")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--iterations", type=int, default=50, show_default=True)
@DEVICE
@SEED
@JSON_OUT
def bench_cmd(artifacts, batch_sizes, warmup, iterations, device, seed, json_path):
    """Latency (p50/p90) and throughput of artifacts side by side; ratios against the first."""
    from edgeguard.api import bench_artifacts
    from edgeguard.config import Config
    from edgeguard.evaluate import BenchConfig

    cfg: Config = BenchConfig.from_mapping(
        {"batch_sizes": batch_sizes, "warmup": warmup, "iterations": iterations, "seed": seed or 0}, what="bench"
    )
    res = bench_artifacts(list(artifacts), cfg, device=device)
    emit(res, json_path, res.table())


@cli.command("build-engine")
@click.argument("onnx_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Engine to write (.engine or .plan); its manifest goes to OUT.json.")
@click.option("--fp16", is_flag=True, default=None,
              help="Weakly typed FP16 build with the defense and MagicGuard layers pinned to FP32 (TensorRT 10.x only).")
@click.option("--workspace", "workspace_mib", type=int, default=None, help="Builder workspace in MiB (default 1024).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Timing cache file: loaded if it exists, saved after the build.")
@click.option("--min-batch", type=int, default=None, help="Smallest batch of the optimization profile (default 1).")
@click.option("--opt-batch", type=int, default=None, help="Batch TensorRT tunes for (default 8).")
@click.option("--max-batch", type=int, default=None, help="Largest batch of the optimization profile (default 64).")
@click.option("--opt-level", "optimization_level", type=int, default=None,
              help="Builder optimization level 0-5 (default 3; 5 for release builds).")
@SEED
@JSON_OUT
def build_engine_cmd(onnx_path, out, fp16, workspace_mib, timing_cache, min_batch, opt_batch, max_batch,
                     optimization_level, seed, json_path):
    """Build a TensorRT engine from an exported ONNX graph, on this machine's GPU (GPU server or Jetson).

    Strongly typed by default: INT8 only through the graph's Q/DQ nodes, everything else (the defense head and
    MagicGuard included) in the graph's FP32.  Exit 3 without tensorrt or a CUDA GPU; nothing is written then.
    """
    from edgeguard.export.tensorrt import EngineConfig, build_engine

    cfg = EngineConfig().replace(fp16=fp16, workspace_mib=workspace_mib,
                                 timing_cache=str(timing_cache) if timing_cache else None, min_batch=min_batch,
                                 opt_batch=opt_batch, max_batch=max_batch, optimization_level=optimization_level)
    res = build_engine(onnx_path, out, cfg)
    p = res.profile
    emit(res, json_path, f"wrote {res.engine} ({res.bytes:,} bytes, {res.precision}, sha256 {res.sha256[:12]}) with "
                         f"TensorRT {res.tensorrt_version} on {res.gpu_name} (compute {res.compute_capability}) in "
                         f"{res.seconds:.1f} s; batch profile {p['min'][0]}/{p['opt'][0]}/{p['max'][0]}; manifest {res.manifest}")


@cli.command("golden")
@ARTIFACT
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Golden file to write (.npz).")
@click.option("--vault", type=click.Path(path_type=Path), default=None,
              help="Also record the vault's watermark and fragile triggers (the file is then as secret as the vault).")
@DATASET
@DATA_ROOT
@SPLIT
@click.option("--n", "n", type=int, default=None, help="Clean inputs: the first N images of the split (default 256).")
@SEED
@JSON_OUT
def golden_cmd(artifact, out, vault, dataset, data_root, split, n, seed, json_path):
    """Record golden outputs of an artifact on CPU (normally the shipped .onnx in ONNX Runtime)."""
    from edgeguard.evaluate.golden import GoldenConfig, record_golden

    cfg = GoldenConfig(data=_data_config(dataset, data_root, (), _default_data(artifact))).replace(split=split, n=n)
    res = record_golden(artifact, out, cfg, vault=vault)
    groups = ", ".join(f"{k} {v}" for k, v in res.groups.items())
    emit(res, json_path, f"wrote {res.path} (sha256 {res.sha256[:12]}): {groups} inputs through {artifact} "
                         f"[{res.artifact['backend']} {res.artifact['precision']}]")


@cli.command("golden-check")
@ARTIFACT
@click.argument("golden", type=click.Path(path_type=Path))
@click.option("--atol", type=click.FloatRange(min=0.0), default=None,
              help="Max |Δprob| allowed (default 1e-3 FP32/TF32, 1e-2 FP16, not asserted for INT8).")
@click.option("--min-top1", type=click.FloatRange(0.0, 1.0), default=None,
              help="Top-1 agreement required (default 0.99 when either side is INT8, else not asserted).")
@DEVICE
@SEED
@JSON_OUT
def golden_check_cmd(artifact, golden, atol, min_top1, device, seed, json_path):
    """Compare an artifact (engine, ONNX, bundle) with golden outputs; exit 1 outside the tolerance."""
    from edgeguard.evaluate.golden import check_golden

    res = check_golden(artifact, golden, atol=atol, min_top1=min_top1, device=device)
    emit(res, json_path, res.summary())


@cli.command("pipeline")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder to write.")
@SEED
@DEVICE
@JSON_OUT
def pipeline_cmd(config_path, out, seed, device, json_path):
    """Run every stage of a config (train -> export -> evaluate -> bench) and write report.md/json."""
    from edgeguard.pipeline import PipelineConfig, run_pipeline

    res = run_pipeline(PipelineConfig.load(config_path, seed=seed, device=device), out)
    lines = [f"{'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}" for c in res.report["checks"]]
    lines.append(f"report: {Path(out) / 'report.md'}")
    emit(res, json_path, "\n".join(lines))


# --- protect / verify / attack -------------------------------------------------------------------------


@cli.group("protect")
def protect_group() -> None:
    """Embed a protection into a bundle (the owner's secrets go to BUNDLE/vault/)."""


@protect_group.command("watermark")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Watermarked bundle to write.")
@click.option("--trigger-dir", type=click.Path(path_type=Path), default=None, help="Trigger images (WatermarkNN layout).")
@click.option("--labels", type=click.Path(path_type=Path), default=None, help="Labels file paired with --trigger-dir.")
@click.option("--n-triggers", type=int, default=None, help="Generate this many abstract triggers (default 100).")
@click.option("--renderer", type=click.Choice(["center_crop", "resize"]), default=None,
              help="How trigger files become model-sized images (default center_crop, as the reference code).")
@click.option("--mode", type=click.Choice(["pretrained", "fromscratch"]), default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--trigger-batch", type=int, default=None, help="Triggers appended to every clean batch (default 16).")
@click.option("--alpha", type=float, default=None, help="Significance of the verdict (default 1e-3).")
@click.option("--key-seed", type=click.IntRange(0, 2**63 - 1), default=None, help="Seed of a generated key (default: a random secret).")
@SEED
@JSON_OUT
def protect_watermark_cmd(bundle, out, trigger_dir, labels, n_triggers, renderer, mode, epochs, lr, trigger_batch,
                          alpha, key_seed, seed, json_path):
    """Embed a backdoor watermark (Adi et al. 2018) with a secret trigger set."""
    from edgeguard.protect import WatermarkConfig, embed_watermark

    cfg = WatermarkConfig().replace(
        trigger_dir=str(trigger_dir) if trigger_dir else None, labels=str(labels) if labels else None,
        n_triggers=n_triggers, renderer=renderer, mode=mode, epochs=epochs, lr=lr, trigger_batch=trigger_batch,
        alpha=alpha, seed=seed,
    )
    res = embed_watermark(bundle, out, cfg, key_seed=key_seed)
    emit(res, json_path, f"watermarked bundle {res.bundle}: {res.n} triggers (key sha256 {res.key_sha256[:16]}), "
                         f"{res.epochs} epochs, trigger accuracy {res.trigger_accuracy:.3f} during training; "
                         f"the key is in {Path(res.bundle) / 'vault'}")


@protect_group.command("magicguard")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Guarded bundle to write.")
@click.option("--a", "a", type=float, default=None, help="Amplitude: the largest change of any guarded value (default 0.01).")
@click.option("--w", "w", type=float, default=None, help="Frequency; a*w is the gradient amplitude (default 1e4, a*w = 100).")
@click.option("--site", default=None, help="'logits' (default) or the dotted name of a layer whose output is guarded.")
@click.option("--ratio", type=float, default=None, help="Share of units guarded, mask drawn once from --seed (default 1.0).")
@click.option("--variant", type=click.Choice(["sine", "staircase", "reversal"]), default=None,
              help="sine (default, the method); staircase (no gradient: freezes); reversal (gradient ascent).")
@SEED
@JSON_OUT
def protect_magicguard_cmd(bundle, out, a, w, site, ratio, variant, seed, json_path):
    """Insert MagicGuard (y = x + a*sin(w*x)): fine-tuning the guarded model destroys it.

    No training: a graph edit, checked for fidelity (top-1 unchanged, logits moved by at most a) before the bundle is
    written.  Quantization keeps the guard in FP32 and QAT runs in owner mode; exports list the guard's nodes for
    FP32 pinning.  An informed attacker can delete the guard: see the README's limitations.
    """
    from edgeguard.protect.magicguard import MagicGuardConfig, protect_magicguard

    cfg = MagicGuardConfig().replace(a=a, w=w, site=site, ratio=ratio, variant=variant, seed=seed)
    res = protect_magicguard(bundle, out, cfg)
    trig = (f", trigger accuracy {res.trigger_accuracy_before:.3f} -> {res.trigger_accuracy_after:.3f}"
            if res.trigger_accuracy_before is not None else "")
    emit(res, json_path, f"guarded bundle {res.bundle} (sha256 {res.sha256[:12]}): MagicGuard {cfg.variant} at {cfg.site}, "
                         f"a={cfg.a:g}, w={cfg.w:g} (a*w={cfg.a * cfg.w:g}); test accuracy {res.accuracy_before:.4f} -> "
                         f"{res.accuracy_after:.4f}, top-1 agreement {res.top1_agreement:.4f}, max |Δlogit| "
                         f"{res.max_abs_change:.4f}{trig}")


@protect_group.command("fragile")
@ARTIFACT
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Fragile store to write, VAULT/fragile (default for a bundle: BUNDLE/vault/fragile).")
@click.option("--surrogate", type=click.Path(path_type=Path), default=None,
              help="Differentiable model to generate against (default: the artifact itself; needed for .engine).")
@click.option("--key", "key_sha256", default=None, help="Enrol a trigger set already in --out (its sha256 prefix) instead of generating.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Triggers (default 100).")
@click.option("--a", "a", type=click.FloatRange(min=0), default=None, help="Weight of Var(P) (default: from --margin).")
@click.option("--margin", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target log-probability margin of the key class, sets a (default 0.2).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Generator steps (default 300, as the paper's epochs).")
@click.option("--variant", type=click.Choice(["full", "cla", "var", "non"]), default=None,
              help="full: CE + a*Var (default, the method); cla: CE only; var: Var only; non: untrained generator.")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Enrolment runs per batch size (default 10).")
@click.option("--batch-sizes", default=None, help="Enrolment batch sizes, comma-separated (default 1,100).")
@DEVICE
@SEED
@JSON_OUT
def protect_fragile_cmd(artifact, out, surrogate, key_sha256, n, a, margin, steps, variant, repeats, batch_sizes, device,
                        seed, json_path):
    """Fragile triggers (Yin et al. 2022): generate triggers next to the decision boundaries of ARTIFACT and enrol
    them on it (the artifact's own labels, stability and margin filters), so that `verify` detects any modification.

    The model is never changed.  Enrol every artifact you ship (FP32 ONNX, INT8, each engine): a different backend
    or precision is reported as drift, not tampering.
    """
    from edgeguard.protect.fragile import EnrolConfig, FragileConfig, protect_fragile

    cfg = FragileConfig().replace(n=n, a=a, margin=margin, steps=steps, max_steps=max(3000, steps or 0), variant=variant, seed=seed)
    given = {"repeats": repeats, "batch_sizes": batch_sizes}
    enrol_cfg = EnrolConfig.from_mapping({k: v for k, v in given.items() if v is not None}, what="enrolment")
    res = protect_fragile(artifact, out, cfg, enrol_cfg, surrogate=surrogate, key_sha256=key_sha256, device=device)
    g = res.generation
    gen = (f"generated against {res.surrogate} in {g['steps']} steps (a = {g['a']:.4g}, mean top-1 probability "
           f"{g['mean_top1_probability']:.3f}); " if "steps" in g else "stored key; ")
    emit(res, json_path, f"fragile triggers enrolled on {artifact} [{res.artifact['backend']} {res.artifact['precision']}]: "
                         f"{gen}{res.kept}/{res.n} kept (margin >= {res.margin_floor:.2g}, min {res.margin_min:.3g}, noise "
                         f"{res.noise:.2g}), agreement with the key {res.key_agreement:.3f}; re-verified "
                         f"{res.check.verdict}; stored in {res.store} (key {res.trigger_sha256[:12]})")


@cli.command("quantize")
@click.argument("bundle", type=click.Path(path_type=Path))
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
    from edgeguard.quantize import PtqConfig, QatConfig, quantize_bundle

    base = PtqConfig(target=target).replace(calibration=calibration, calib_samples=calib_samples, calib_dataset=calib_dataset,
                                            calib_root=data_root, exclude=tuple(exclude) or None, seed=seed)
    cfg = base if mode == "ptq" else QatConfig(base=base).replace(epochs=epochs, lr=lr,
                                                                   freeze_observers_epoch=freeze_observers_epoch, seed=seed)
    res = quantize_bundle(bundle, out, cfg)
    emit(res, json_path, f"INT8 bundle {res.bundle} ({res.mode}, target {res.target}): {res.qdq_nodes} Q/DQ nodes, "
                         f"QDQ graph {res.onnx_bytes:,} bytes")


@cli.command("verify")
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--vault", type=click.Path(path_type=Path), default=None,
              help="Owner vault (default for a bundle: its own BUNDLE/vault).")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=None,
              help="Significance level (default: the vault's, 1e-3).")
@DATASET
@DATA_ROOT
@SPLIT
@DEVICE
@SEED
@JSON_OUT
def verify_cmd(artifacts, vault, alpha, dataset, data_root, split, device, seed, json_path):
    """Verify the watermark and the fragile triggers on one or more artifacts, side by side.

    Exit 0 only if every part the vault holds passes: watermark present, fragile triggers intact.  Exit 1 when a
    verdict is negative (watermark absent; fragile modified, or drift when the artifact was enrolled on another
    backend or precision -- reported as deployment drift, not tampering).
    """
    from edgeguard.api import verify_artifacts

    data = _data_config(dataset, data_root, ()) if dataset else None
    res = verify_artifacts(list(artifacts), vault, alpha=alpha, data=data, split=split, device=device)
    lines = []
    for r in res.results:
        parts = []
        w = r.watermark
        if w is not None:
            parts.append(f"watermark {w.verdict.upper()}: {w.matches}/{w.n} triggers match (p-value {w.p_value:.3g}, "
                         f"threshold {w.m_star} at alpha {w.alpha:g}, chance 1/{w.k})")
        if r.fragile is not None:
            parts.append(r.fragile.summary())
        art = (w or r.fragile).artifact
        line = f"{art['path']} [{art['backend']} {art['precision']}]: " + "; ".join(parts)
        if r.clean is not None:
            line += f"; clean accuracy {r.clean.accuracy:.4f} ({r.clean.correct}/{r.clean.n}) on {r.clean.dataset}/{r.clean.split}"
        lines.append(line)
    emit(res, json_path, "\n".join(lines))


@cli.group("attack")
def attack_group() -> None:
    """Attacks against protected models: removal (finetune) and model extraction (extract)."""


@attack_group.command("finetune")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--mode", type=click.Choice(["ftll", "ftal", "rtll", "rtal"]), required=True,
              help="Fine-tune / retrain the last layer / all layers (rt*: the last layer is re-initialised).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Attacked bundle to write (no vault).")
@click.option("--epochs", type=int, default=None, help="Default 20, as the reference.")
@click.option("--lr", type=float, default=None, help="Default 0.01.")
@click.option("--batch-size", type=int, default=None)
@click.option("--data-fraction", type=float, default=None, help="Share of the attacker's data used (default 1.0).")
@click.option("--attack-dataset", type=click.Choice(_registry_names("dataset")), default=None,
              help="Attacker's dataset (default: the bundle's own training data).")
@DATA_ROOT
@click.option("--freeze-bn", is_flag=True, default=None, help="Keep BatchNorm statistics fixed (strict *LL).")
@SEED
@JSON_OUT
def attack_finetune_cmd(bundle, mode, out, epochs, lr, batch_size, data_fraction, attack_dataset, data_root,
                        freeze_bn, seed, json_path):
    """Removal attack by fine-tuning: FTLL, FTAL, RTLL, RTAL."""
    from edgeguard.attacks import FinetuneConfig, finetune_attack

    cfg = FinetuneConfig(mode=mode).replace(epochs=epochs, lr=lr, batch_size=batch_size, data_fraction=data_fraction,
                                            dataset=attack_dataset, data_root=data_root, freeze_bn=freeze_bn, seed=seed)
    res = finetune_attack(bundle, out, cfg)
    acc = f", test accuracy {res.test_accuracy:.4f}" if res.test_accuracy is not None else ""
    div = (f"; the loss stopped being finite at step {res.diverged_at} (the model self-destructed), training stopped "
           "there" if res.diverged_at is not None else "")
    emit(res, json_path, f"attacked bundle {res.bundle}: {res.mode} on {res.samples} images, {res.epochs} epochs "
                         f"({res.steps} steps), final loss {res.final_loss:.4f}{acc}{div}")


@attack_group.command("extract")
@ARTIFACT
@click.option("--method", required=True, help="Extraction attack (e.g. knockoff; see the README for the list).")
@click.option("--budget", type=int, required=True, help="Queries to the artifact (counted at its Runner).")
@click.option("--query-set", default=None, help="Attacker's query pool, a dataset name (default: synthetic, shaped like the victim's input).")
@click.option("--query-option", "query_options", type=KeyValue(), multiple=True, help="Query-pool dataset option k=v.")
@click.option("--query-root", type=click.Path(path_type=Path), default=None, help="Folder of an on-disk query pool.")
@click.option("--surrogate", default=None, help="Attacker's architecture (default smallcnn).")
@click.option("--epochs", type=int, default=None, help="Surrogate training epochs (default 20).")
@click.option("--hard-label", is_flag=True, default=None, help="The API returns only the top-1 label.")
@click.option("--param", "params", type=KeyValue(), multiple=True, help="Method option k=v (repeatable).")
@DATASET
@DATA_ROOT
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Surrogate bundle to write (with attack.json).")
@SEED
@JSON_OUT
def attack_extract_cmd(artifact, method, budget, query_set, query_options, query_root, surrogate, epochs, hard_label,
                       params, dataset, data_root, out, seed, json_path):
    """Model extraction: query ARTIFACT as a client would (probabilities only, counted budget), train a surrogate,
    and report its accuracy and fidelity on the victim's test split (--dataset, default digits)."""
    from edgeguard.attacks.extraction import extract, method_config
    from edgeguard.config import DataConfig

    given = {"budget": budget, "query_set": query_set, "query_options": dict(query_options) or None,
             "query_root": str(query_root) if query_root else None, "surrogate": surrogate, "epochs": epochs,
             "hard_label": hard_label, "seed": seed, **dict(params)}
    cfg = method_config(method, {k: v for k, v in given.items() if v is not None})
    res = extract(artifact, out, method, cfg, eval_data=DataConfig(dataset or "digits", root=str(data_root) if data_root else None))
    l1 = f", defense L1 {res.defense_l1_mean:.4f}" if res.defense_l1_mean is not None else ""
    emit(res, json_path, f"{method} against {artifact} (defense {res.defense}): {res.queries_used}/{res.budget} queries; "
                         f"surrogate accuracy {res.surrogate_accuracy:.4f}, fidelity {res.fidelity:.4f}, defender accuracy "
                         f"{res.defender_accuracy:.4f}{l1}; surrogate bundle {res.surrogate_bundle}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps EdgeguardError to its exit code with one sentence on stderr."""
    try:
        cli.main(args=argv, prog_name="edgeguard", standalone_mode=False)
    except EdgeguardError as e:
        click.echo(f"edgeguard: error: {e}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("edgeguard: interrupted; outputs are written atomically, so nothing half-written was left", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("edgeguard: interrupted; outputs are written atomically, so nothing half-written was left", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except OSError as e:  # unreadable input, unwritable --out / --json, full disk
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        click.echo(f"edgeguard: error: cannot access{where}: {e.strerror or e}", err=True)
        return 2
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
