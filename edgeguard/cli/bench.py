"""``bench``, ``build-engine``, ``golden`` and ``golden-check``: latency, TensorRT engines and golden outputs."""

from __future__ import annotations

from pathlib import Path

import click

from edgeguard.cli.options import (
    ARTIFACT,
    ARTIFACTS,
    DATA_ROOT,
    DATASET,
    DEVICE,
    JSON_OUT,
    REMOTE,
    SEED,
    SPLIT,
    _data_config,
    _default_data,
    emit,
    merge_flags,
)


@click.command("bench")
@ARTIFACTS
@click.option("--batch-sizes", default="1,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--iterations", type=int, default=50, show_default=True)
@DEVICE
@SEED
@JSON_OUT
@REMOTE
def bench_cmd(artifacts, batch_sizes, warmup, iterations, device, seed, json_path):
    """Latency (p50/p90) and throughput of artifacts side by side; ratios against the first."""
    from edgeguard.api import BenchConfig, bench_artifacts

    cfg = merge_flags(BenchConfig, "bench", batch_sizes=batch_sizes, warmup=warmup, iterations=iterations, seed=seed)
    res = bench_artifacts(list(artifacts), cfg, device=device)
    emit(res, json_path)


@click.command("build-engine")
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
@JSON_OUT
def build_engine_cmd(onnx_path, out, fp16, workspace_mib, timing_cache, min_batch, opt_batch, max_batch,
                     optimization_level, json_path):
    """Build a TensorRT engine from an exported ONNX graph, on this machine's GPU (GPU server or Jetson).

    Strongly typed by default: INT8 only through the graph's Q/DQ nodes, everything else (the defense head and
    MagicGuard included) in the graph's FP32.  Exit 3 without tensorrt or a CUDA GPU; nothing is written then.
    """
    from edgeguard.api import EngineConfig, build_engine

    cfg = merge_flags(EngineConfig, "build-engine", fp16=fp16, workspace_mib=workspace_mib,
                      timing_cache=str(timing_cache) if timing_cache else None, min_batch=min_batch,
                      opt_batch=opt_batch, max_batch=max_batch, optimization_level=optimization_level)
    res = build_engine(onnx_path, out, cfg)
    emit(res, json_path)


@click.command("golden")
@ARTIFACT
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Golden file to write (.npz).")
@click.option("--vault", type=click.Path(path_type=Path), default=None,
              help="Also record the vault's watermark and fragile triggers (the file is then as secret as the vault).")
@DATASET
@DATA_ROOT
@SPLIT
@click.option("--n", "n", type=int, default=None, help="Clean inputs: the first N images of the split (default 256).")
@JSON_OUT
def golden_cmd(artifact, out, vault, dataset, data_root, split, n, json_path):
    """Record golden outputs of an artifact on CPU (normally the shipped .onnx in ONNX Runtime)."""
    from edgeguard.api import GoldenConfig, record_golden

    cfg = merge_flags(GoldenConfig, "golden", data=_data_config(dataset, data_root, (), _default_data(artifact)),
                      split=split, n=n)
    res = record_golden(artifact, out, cfg, vault=vault)
    emit(res, json_path)


@click.command("golden-check")
@ARTIFACT
@click.argument("golden", type=click.Path(path_type=Path))
@click.option("--atol", type=click.FloatRange(min=0.0), default=None,
              help="Max |Δprob| allowed (default 1e-3 FP32/TF32, 1e-2 FP16, not asserted for INT8).")
@click.option("--min-top1", type=click.FloatRange(0.0, 1.0), default=None,
              help="Top-1 agreement required (default 0.99 when either side is INT8, else not asserted).")
@DEVICE
@JSON_OUT
@REMOTE
def golden_check_cmd(artifact, golden, atol, min_top1, device, json_path):
    """Compare an artifact (engine, ONNX, bundle) with golden outputs; exit 1 outside the tolerance."""
    from edgeguard.api import check_golden

    res = check_golden(artifact, golden, atol=atol, min_top1=min_top1, device=device)
    emit(res, json_path)
