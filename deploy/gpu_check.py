#!/usr/bin/env python3
"""The stages of deploy/gpu_check.sh: ``probe`` (standard library only), ``install`` (import checks) and ``run``
(artifacts, engines, bench, tests).  Everything lands in OUT/gpu_check.json (stages) and OUT/gpu_env.json (machine).

Each step is an ``edgeguard`` command (through deploy/jetson/device_check.py for the per-engine steps), so what is
checked here is exactly what a user runs.  Exit codes: 0 all passed, 1 a check failed, 3 no GPU / TensorRT.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("device_check", REPO / "deploy" / "jetson" / "device_check.py")
device_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_check)  # type: ignore[union-attr]
sh, edgeguard = device_check.sh, device_check.edgeguard

MODELS = (("demo", "smallcnn", 10), ("resnet18", "resnet18", 4))  # (name, arch, epochs)
VARIANTS = ("fp32", "int8", "int8_heuristic", "fp32_heuristic", "fp32_modelguard_w", "fp32_magicguard", "fp32_gaussian")
KEY_SEED = "1234"


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def load_report(out: Path) -> dict[str, Any]:
    p = out / "gpu_check.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            pass
    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": {}}


# --- probe -------------------------------------------------------------------------------------------------

_PY_PROBE = r"""
import json, sys
r = {"python": sys.version.split()[0], "executable": sys.executable}
def attempt(key, fn):
    try:
        r[key] = fn()
    except BaseException as e:
        r[key] = {"error": f"{type(e).__name__}: {e}"[:300]}
def torch_info():
    import torch
    d = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if d["cuda_available"]:
        d["device"] = torch.cuda.get_device_name(0)
        d["capability"] = list(torch.cuda.get_device_capability(0))
        d["cudnn"] = torch.backends.cudnn.version()
    return d
def ort_info():
    import onnxruntime as ort
    return {"version": ort.__version__, "providers": ort.get_available_providers()}
def trt_info():
    import tensorrt
    return {"version": tensorrt.__version__}
def cuda_python_info():
    try:
        from cuda.bindings import runtime as rt
        import cuda.bindings as cb
        ver = getattr(cb, "__version__", None)
    except ImportError:
        from cuda import cudart as rt
        ver = None
    err, n = rt.cudaGetDeviceCount()
    err2, v = rt.cudaRuntimeGetVersion()
    return {"version": ver, "device_count": int(n) if int(err) == 0 else None, "runtime_version": int(v)}
def edgeguard_info():
    import edgeguard
    return {"version": getattr(edgeguard, "__version__", None), "path": edgeguard.__file__}
attempt("torch", torch_info); attempt("onnxruntime", ort_info); attempt("tensorrt", trt_info)
attempt("cuda_python", cuda_python_info); attempt("edgeguard", edgeguard_info)
print(json.dumps(r))
"""


def python_probe(python: str) -> dict[str, Any]:
    rc, out, err = sh([python, "-c", _PY_PROBE], timeout=300)
    if rc != 0:
        return {"error": (err.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.strip().splitlines()[-1])


def probe(out: Path) -> int:
    env: dict[str, Any] = {"probed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                           "machine": platform.machine(), "platform": platform.platform(), "cpus": os.cpu_count()}
    rc, smi, err = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                       "--format=csv,noheader"], timeout=60)
    gpus = []
    if rc == 0:
        for line in smi.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 4:
                gpus.append(dict(zip(("name", "driver", "memory", "compute_cap"), parts, strict=True)))
    env["gpus"] = gpus
    env["nvidia_smi"] = "ok" if rc == 0 else (err.strip() or f"exit {rc}")[:200]
    rc, head, _ = sh(["nvidia-smi"], timeout=60)
    m = re.search(r"CUDA Version:\s*([0-9.]+)", head) if rc == 0 else None
    env["driver_cuda"] = m.group(1) if m else None
    rc, nvcc, _ = sh(["nvcc", "--version"], timeout=60)
    m = re.search(r"release ([0-9.]+)", nvcc) if rc == 0 else None
    env["nvcc"] = m.group(1) if m else None
    rc, ld, _ = sh(["ldconfig", "-p"], timeout=60)
    libs = sorted({line.split()[0] for line in ld.splitlines() if "libnvinfer" in line}) if rc == 0 else []
    # where TensorRT installs put it: the wheels' tensorrt_libs, the Debian packages, tar files under /opt or /usr/local
    patterns = [f"{p}/tensorrt*/libnvinfer*.so*" for p in sys.path if p.endswith("-packages")]
    patterns += ["/usr/lib/*-linux-gnu/libnvinfer*.so*", "/usr/local/cuda*/lib*/libnvinfer*.so*",
                 "/usr/local/*/lib/libnvinfer*.so*", "/opt/*/lib/libnvinfer*.so*", "/opt/*/*/lib/libnvinfer*.so*"]
    for pattern in patterns:
        libs += glob.glob(pattern)
    env["libnvinfer"] = sorted(set(libs))[:20]
    env["python"] = python_probe(sys.executable)
    env["gpu_found"] = bool(gpus)
    write_json(out / "gpu_env.json", env)
    summary = ", ".join(f"{g['name']} (driver {g['driver']}, compute {g['compute_cap']})" for g in gpus) or "no GPU"
    trt = env["python"].get("tensorrt", {})
    print(f"probe: {summary}; CUDA (driver) {env['driver_cuda']}; torch {env['python'].get('torch')}; "
          f"tensorrt {trt}; libnvinfer: {len(env['libnvinfer'])} found", file=sys.stderr)
    return 0 if gpus else 3


# --- install -----------------------------------------------------------------------------------------------

def install(out: Path) -> int:
    report = load_report(out)
    found = python_probe(sys.executable)
    problems = [f"{k}: {found[k]['error']}" for k in ("edgeguard", "tensorrt", "cuda_python")
                if isinstance(found.get(k), dict) and "error" in found[k]]
    report["stages"]["install"] = {"python": found, "passed": not problems, "problems": problems}
    if problems:
        report["passed"] = False
        report["blocked"] = "; ".join(problems)
    write_json(out / "gpu_check.json", report)
    for p in problems:
        print(f"install: {p}", file=sys.stderr)
    return 3 if problems else 0


# --- run ---------------------------------------------------------------------------------------------------

def has_option(command: list[str], option: str) -> bool:
    _, text, _ = sh([sys.executable, "-m", "edgeguard", *command, "--help"], timeout=120)
    return option in text


def artifacts(work: Path, quick: bool, cuda: bool) -> dict[str, Any]:
    """Bundles, the three ONNX variants per model, CPU goldens and the ONNX watermark verdicts."""
    res: dict[str, Any] = {}
    train_dev = ["--device", "cuda"] if cuda and has_option(["train"], "--device") else []
    only = [m for m in os.environ.get("GPU_CHECK_MODELS", "").split(",") if m]
    for name, arch, epochs in MODELS:
        if only and name not in only:
            continue
        d = work / name
        d.mkdir(parents=True, exist_ok=True)
        steps: dict[str, Any] = {}
        steps["train"] = edgeguard(["train", "--dataset", "digits", "--arch", arch, "--epochs", str(1 if quick else epochs),
                                    "--out", str(d / "bundle"), *train_dev], d / "train.json")
        steps["watermark"] = edgeguard(["protect", "watermark", str(d / "bundle"), "--out", str(d / "marked"),
                                        "--key-seed", KEY_SEED, *(["--epochs", "3"] if quick else [])],
                                       d / "watermark.json")
        steps["quantize"] = edgeguard(["quantize", str(d / "marked"), "--mode", "ptq", "--target", "tensorrt",
                                       "--out", str(d / "int8")], d / "quantize.json")
        steps["magicguard"] = edgeguard(["protect", "magicguard", str(d / "marked"), "--out", str(d / "guarded")],
                                        d / "magicguard.json")
        exports = {"fp32": (d / "marked", []), "int8": (d / "int8", []),
                   "int8_heuristic": (d / "int8", ["--defense", "heuristic"]),
                   # the defended and guarded FP32 graphs (issue 30): each head's ops through TensorRT's parser
                   "fp32_heuristic": (d / "marked", ["--defense", "heuristic"]),
                   "fp32_modelguard_w": (d / "marked", ["--defense", "modelguard_w"]),
                   "fp32_magicguard": (d / "guarded", []),
                   "fp32_gaussian": (d / "marked", ["--defense", "gaussian"])}
        onnx: dict[str, Any] = {}
        for v, (src, extra) in exports.items():
            path = d / f"{v}.onnx"
            e = edgeguard(["export", str(src), "--out", str(path), *extra], d / f"export_{v}.json")
            g = edgeguard(["golden", str(path), "--out", str(d / f"{v}.golden.npz"), "--vault", str(d / "marked" / "vault")],
                          d / f"golden_{v}.json") if e["rc"] == 0 else None
            w = edgeguard(["verify", str(path), "--vault", str(d / "marked" / "vault")], d / f"verify_{v}.json") \
                if e["rc"] == 0 else None
            onnx[v] = {"path": str(path), "export": e, "golden": g, "verify": w,
                       "watermark_verdict": watermark_verdict(w)}
        res[name] = {"arch": arch, "steps": steps, "onnx": onnx}
    return res


def watermark_verdict(step: dict[str, Any] | None) -> str | None:
    """The watermark verdict of an ``edgeguard verify`` step (one artifact: the result itself; several: results[0])."""
    try:
        result = step["result"]  # type: ignore[index]
        return (result["results"][0] if "results" in result else result)["watermark"]["verdict"]
    except (TypeError, KeyError, IndexError):
        return None


def engines(work: Path, arts: dict[str, Any], trt_major: int, quick: bool) -> dict[str, Any]:
    """device_check.py per ONNX (build, golden-check, fragile enrol, verify, bench at 1/64), then extraction."""
    res: dict[str, Any] = {}
    fragile = os.environ.get("GPU_CHECK_FRAGILE", "1") != "0"  # enrolment generates triggers: about a minute on CPU
    for name, a in arts.items():
        vault = work / name / "marked" / "vault"
        for v, o in a["onnx"].items():
            if o["export"]["rc"] != 0:
                continue
            for fp16 in ((False, True) if v == "fp32" and trt_major == 10 else (False,)):
                key = f"{name}/{v}" + ("-fp16" if fp16 else "")
                d = work / "engines" / key.replace("/", "_")
                cmd = [sys.executable, str(REPO / "deploy" / "jetson" / "device_check.py"), "--onnx", o["path"],
                       "--golden", str(work / name / f"{v}.golden.npz"), "--out-dir", str(d), "--vault", str(vault),
                       *(["--enrol-fragile"] if fragile else []), "--batch-sizes", "1,64", "--warmup", "20",
                       "--iterations", "50" if quick else "300"] + (["--fp16"] if fp16 else [])
                t0 = time.time()
                rc, _, err = sh(cmd, timeout=1800)
                print(err.rstrip(), file=sys.stderr)
                try:
                    dc = json.loads((d / "device_check.json").read_text())
                except (OSError, json.JSONDecodeError):
                    dc = {"error": (err.strip().splitlines() or ["no report"])[-1]}
                engine = Path(dc.get("engine", d / ("model.fp16.engine" if fp16 else "model.engine")))
                ext = edgeguard(["attack", "extract", str(engine), "--method", "knockoff", "--budget", "500",
                                 "--epochs", "2" if quick else "10", "--out", str(d / "surrogate")], d / "extract.json") \
                    if engine.is_file() else None
                engine_wm = watermark_verdict((dc.get("steps") or {}).get("watermark"))
                res[key] = {"rc": rc, "seconds": round(time.time() - t0, 1), "device_check": dc, "extract": ext,
                            "watermark_verdict": engine_wm, "onnx_watermark_verdict": o["watermark_verdict"],
                            "watermark_matches_onnx": engine_wm is not None and engine_wm == o["watermark_verdict"]}
                if v in RANDOM_HEADS and engine.is_file():
                    res[key]["statistical"] = random_head_check(engine, Path(o["path"]), d)
    return res


RANDOM_HEADS = ("fp32_gaussian",)  # TensorRT ignores RandomNormalLike's seed: no golden, a statistical check
STAT_MAX_ACC_DIFF = 0.02


def random_head_check(engine: Path, onnx_path: Path, d: Path) -> dict[str, Any]:
    """A head that draws noise per query cannot match goldens; its engine must keep the ONNX file's accuracy
    (within 2 points on the digits test split) and its answers to one batch must differ between two calls (the
    noise is live, not folded into a constant by the builder)."""
    import numpy as np

    from edgeguard.runtime import open_runner

    acc = {}
    for what, path in (("engine", engine), ("onnx", onnx_path)):
        step = edgeguard(["evaluate", str(path), "--dataset", "digits", "--no-latency"], d / f"evaluate_{what}.json")
        acc[what] = (step.get("result") or {}).get("accuracy")
    live, live_error = None, None
    try:
        with open_runner(engine) as r:
            x = np.random.default_rng(0).random((16, *r.info.input_shape), dtype=np.float32)
            live = float(np.abs(r.predict(x) - r.predict(x)).max())
    except Exception as e:  # reported, not raised: the other checks still run
        live_error = f"{type(e).__name__}: {e}"[:300]
    ok = (None not in acc.values() and live is not None and abs(acc["engine"] - acc["onnx"]) <= STAT_MAX_ACC_DIFF
          and live > 0)
    return {"accuracy": acc, "max_diff": STAT_MAX_ACC_DIFF, "max_abs_change_between_calls": live,
            "live_error": live_error, "passed": bool(ok)}


def bench(work: Path, arts: dict[str, Any], eng: dict[str, Any], quick: bool) -> dict[str, Any]:
    """ORT-CPU and ORT-CUDA on the FP32 and INT8 ONNX; the engines' rows come from their device_check bench."""
    res: dict[str, Any] = {}
    iters = "50" if quick else "300"
    for name, a in arts.items():
        for v in ("fp32", "int8"):
            path = a["onnx"][v]["path"]
            if not Path(path).is_file():
                continue
            for dev in ("cpu", "cuda"):
                res[f"{name}/{v}/ort-{dev}"] = edgeguard(["bench", path, "--batch-sizes", "1,64", "--warmup", "20",
                                                          "--iterations", iters, "--device", dev],
                                                         work / f"bench_{name}_{v}_{dev}.json")
    for key, e in eng.items():
        b = ((e.get("device_check") or {}).get("steps") or {}).get("bench")
        if b is not None:
            res[f"{key}/trt"] = b
    return res


def table(bench_res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, step in bench_res.items():
        for r in ((step or {}).get("result") or {}).get("rows", []):
            rows.append({"run": key, "backend": r["backend"], "precision": r["precision"], "batch": r["batch"],
                         "p50_ms": r["p50_ms"], "p90_ms": r["p90_ms"], "throughput": r["throughput"]})
    return rows


def run(out: Path) -> int:
    report = load_report(out)
    quick = os.environ.get("GPU_CHECK_QUICK") == "1"
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/edgeguard-gpu-work"))
    work.mkdir(parents=True, exist_ok=True)
    found = report.get("stages", {}).get("install", {}).get("python") or python_probe(sys.executable)
    trt_version = (found.get("tensorrt") or {}).get("version") or "0"
    cuda = bool((found.get("torch") or {}).get("cuda_available"))
    stages = report.setdefault("stages", {})

    t0 = time.time()
    arts = artifacts(work, quick, cuda)
    stages["artifacts"] = {"seconds": round(time.time() - t0, 1), "models": arts}
    write_json(out / "gpu_check.json", report)

    t0 = time.time()
    eng = engines(work, arts, int(str(trt_version).split(".")[0]), quick)
    stages["engines"] = {"seconds": round(time.time() - t0, 1), "engines": eng}
    write_json(out / "gpu_check.json", report)

    b = bench(work, arts, eng, quick)
    stages["bench"] = {"runs": b, "table": table(b)}

    rc, tout, terr = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "tensorrt",
                         str(REPO / "tests")], timeout=1800)
    stages["tests"] = {"rc": rc, "tail": (tout + terr).strip().splitlines()[-15:]}

    failures = []
    for name, a in arts.items():
        failures += [f"{name}: {k} exit {s['rc']}" for k, s in a["steps"].items() if s["rc"] != 0]
        failures += [f"{name}/{v}: export or golden failed" for v, o in a["onnx"].items()
                     if o["export"]["rc"] != 0 or (o["golden"] or {}).get("rc", 1) != 0]
    for key, e in eng.items():
        steps = (e["device_check"].get("steps") or {})
        random_head = "statistical" in e or any(key.split("/")[-1].startswith(h) for h in RANDOM_HEADS)
        failures += [f"{key}: {s} exit {st.get('rc')}" for s, st in steps.items()
                     if st.get("rc", 0) != 0 and not (random_head and s == "golden_check")]
        if random_head and not (e.get("statistical") or {}).get("passed"):
            failures.append(f"{key}: the random head's statistical check failed: {e.get('statistical')}")
        if not e["watermark_matches_onnx"]:
            failures.append(f"{key}: watermark verdict {e['watermark_verdict']} != ONNX {e['onnx_watermark_verdict']}")
        if e["extract"] is None or e["extract"]["rc"] != 0:
            failures.append(f"{key}: attack extract failed")
    if rc not in (0, 5):  # 5: no test selected (nothing marked tensorrt ran)
        failures.append(f"pytest -m tensorrt exit {rc}")
    report["failures"] = failures
    report["passed"] = not failures
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out / "gpu_check.json", report)

    print("| run | backend | precision | batch | p50 ms | img/s |")
    print("|---|---|---|---:|---:|---:|")
    for r in stages["bench"]["table"]:
        print(f"| {r['run']} | {r['backend']} | {r['precision']} | {r['batch']} | {r['p50_ms']:.3f} | {r['throughput']:.0f} |")
    for key, e in eng.items():
        gc = ((e["device_check"].get("steps") or {}).get("golden_check") or {}).get("rc")
        print(f"{key}: golden-check exit {gc}, watermark {e['watermark_verdict']} (ONNX {e['onnx_watermark_verdict']})")
    print(f"pytest -m tensorrt: exit {rc}; {len(failures)} failure(s)" + (": " + "; ".join(failures[:8]) if failures else ""))
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["probe", "install", "run"])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    return {"probe": probe, "install": install, "run": run}[a.stage](a.out)


if __name__ == "__main__":
    sys.exit(main())
