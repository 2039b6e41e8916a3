#!/usr/bin/env python3
"""On-device check of a shipped model: build the engine here, compare with the CI goldens, verify the watermark,
benchmark, and write one JSON report.  Runs with JetPack 6's Python 3.10 (no 3.11-only syntax or stdlib).

Usage (inside the edgeguard-jetson container, or any Python with edgeguard[trt] on the device):

    python3 device_check.py --onnx model.onnx --golden golden.npz --out-dir OUT [--vault VAULT] [--fp16]

Steps, each an ``edgeguard`` command whose exit code and JSON are kept:

1. ``build-engine``: skipped when OUT/model.engine exists, its manifest records this ONNX's sha256 and the same
   --fp16 choice, and ``edgeguard info`` accepts it on this machine (same TensorRT and compute capability).
2. ``golden-check`` of the engine against golden.npz (recorded in CI from ONNX Runtime on CPU).
3. ``verify`` of the watermark with the owner vault (when --vault is given).  A fragile-trigger result is reported
   when ``edgeguard verify`` returns one (a vault with a fragile store); otherwise it is marked not checked.
   ``--enrol-fragile`` first enrols fragile triggers on the freshly built engine (generated against --onnx): every
   engine build is a new artifact and needs its own enrolment (fragile spec 9.3).
4. ``bench`` of the engine, with the power mode (``nvpmodel -q``) and ``jetson_clocks`` state recorded.

Exit code: 0 when every step passed, else the first failing step's code (1 check failed, 2 bad input,
3 missing backend).  The report is OUT/device_check.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def sh(cmd: list[str], timeout: float = 3600.0) -> tuple[int, str, str]:
    """Run a command; (exit code, stdout, stderr); 127 when the program does not exist."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, "", f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, "", f"{' '.join(cmd)}: timed out after {timeout:.0f} s"
    return p.returncode, p.stdout, p.stderr


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def power_state(power_file: Path | None) -> dict[str, Any]:
    """nvpmodel mode and jetson_clocks state: asked here if the tools exist (on the host), else read from the file
    run.sh wrote on the host before starting the container."""
    state: dict[str, Any] = {"source": None, "nvpmodel": None, "jetson_clocks": None}
    rc, out, _ = sh(["nvpmodel", "-q"], timeout=30)
    if rc == 0:
        state.update(source="nvpmodel", nvpmodel=out.strip())
        rc2, out2, err2 = sh(["jetson_clocks", "--show"], timeout=30)
        state["jetson_clocks"] = out2.strip() if rc2 == 0 else f"unavailable ({err2.strip()[:120]})"
    elif power_file is not None and power_file.is_file():
        text = power_file.read_text()
        parts = text.split("# jetson_clocks --show")
        state.update(source=str(power_file), nvpmodel=parts[0].replace("# nvpmodel -q", "").strip(),
                     jetson_clocks=parts[1].strip() if len(parts) > 1 else None)
    try:
        state["l4t"] = Path("/etc/nv_tegra_release").read_text().splitlines()[0].lstrip("# ").strip()
    except (OSError, IndexError):
        state["l4t"] = None
    return state


def edgeguard(args: list[str], json_path: Path) -> dict[str, Any]:
    """Run ``edgeguard ARGS --json JSON_PATH``; {"rc", "result", "stdout", "error", "seconds"}."""
    if json_path.exists():
        json_path.unlink()
    t0 = time.time()
    rc, out, err = sh([sys.executable, "-m", "edgeguard", *args, "--json", str(json_path)])
    result = None
    if json_path.is_file():
        try:
            result = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            result = None
    error = err.strip().splitlines()[-1] if rc != 0 and err.strip() else None
    print(f"[{'ok' if rc == 0 else 'rc=' + str(rc)}] edgeguard {' '.join(args)}", file=sys.stderr)
    if out.strip():
        print(out.rstrip(), file=sys.stderr)
    if error:
        print(f"  {error}", file=sys.stderr)
    return {"rc": rc, "result": result, "stdout": out.strip(), "error": error, "seconds": round(time.time() - t0, 2)}


def reusable(engine: Path, onnx_sha: str, fp16: bool) -> bool:
    manifest = engine.with_name(engine.name + ".json")
    if not (engine.is_file() and manifest.is_file()):
        return False
    try:
        m = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return False
    if m.get("source_onnx_sha256") != onnx_sha or bool(m.get("flags", {}).get("fp16")) != fp16:
        return False
    rc, _, _ = sh([sys.executable, "-m", "edgeguard", "info", str(engine)], timeout=600)
    return rc == 0  # the runner refuses another TensorRT version or GPU architecture


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, required=True, help="The shipped ONNX graph.")
    ap.add_argument("--golden", type=Path, required=True, help="Golden outputs recorded in CI (edgeguard golden).")
    ap.add_argument("--out-dir", type=Path, required=True, help="Where the engine, cache and reports go.")
    ap.add_argument("--vault", type=Path, default=None, help="Owner vault: verify the watermark on the engine.")
    ap.add_argument("--enrol-fragile", action="store_true",
                    help="Enrol fragile triggers on the new engine (generated against --onnx) into VAULT/fragile first.")
    ap.add_argument("--fp16", action="store_true", help="Weakly typed FP16 build (TensorRT 10.x only).")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8", help="Benchmark batch sizes.")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--power-file", type=Path, default=None, help="nvpmodel/jetson_clocks output from the host.")
    ap.add_argument("--rebuild", action="store_true", help="Build the engine even if a matching one exists.")
    a = ap.parse_args(argv)

    out = a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for f in (a.onnx, a.golden):
        if not f.is_file():
            print(f"device_check: error: {f} does not exist", file=sys.stderr)
            return 2
    engine = out / ("model.fp16.engine" if a.fp16 else "model.engine")
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "python": platform.python_version(),
        "onnx": str(a.onnx),
        "onnx_sha256": sha256_file(a.onnx),
        "engine": str(engine),
        "power": power_state(a.power_file),
        "steps": {},
    }
    steps = report["steps"]

    if not a.rebuild and reusable(engine, report["onnx_sha256"], a.fp16):
        steps["build_engine"] = {"rc": 0, "result": None, "skipped": "engine matches this ONNX, TensorRT and GPU"}
    else:
        args = ["build-engine", str(a.onnx), "--out", str(engine), "--timing-cache", str(out / "timing.cache"),
                "--max-batch", str(a.max_batch)] + (["--fp16"] if a.fp16 else [])
        steps["build_engine"] = edgeguard(args, out / "build_engine.json")

    if steps["build_engine"]["rc"] == 0:
        steps["golden_check"] = edgeguard(["golden-check", str(engine), str(a.golden)], out / "golden_check.json")
        if a.vault is not None and a.enrol_fragile:
            steps["fragile_enrol"] = edgeguard(["protect", "fragile", str(engine), "--out", str(a.vault / "fragile"),
                                                "--surrogate", str(a.onnx)], out / "fragile_enrol.json")
        if a.vault is not None:
            v = edgeguard(["verify", str(engine), "--vault", str(a.vault)], out / "verify.json")
            steps["watermark"] = v
            fragile = (v.get("result") or {}).get("fragile")
            steps["fragile"] = {"rc": 0 if fragile is None or fragile.get("passed") is True else 1,
                                "result": fragile,
                                "note": None if fragile is not None else "not checked: edgeguard verify returned no fragile result"}
        bench = edgeguard(["bench", str(engine), "--batch-sizes", a.batch_sizes, "--warmup", str(a.warmup),
                           "--iterations", str(a.iterations)], out / "bench.json")
        if bench.get("result") is not None:
            bench["result"]["power"] = report["power"]
        steps["bench"] = bench

    failed = [s for s in steps.values() if s.get("rc", 0) != 0]
    report["passed"] = not failed
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tmp = out / ".device_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "device_check.json")
    print(f"device check {'PASSED' if report['passed'] else 'FAILED'}: {out / 'device_check.json'}", file=sys.stderr)
    return 0 if not failed else int(failed[0]["rc"])


if __name__ == "__main__":
    sys.exit(main())
