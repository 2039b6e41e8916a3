#!/usr/bin/env bash
# One-shot check of every TensorRT path on an x86 NVIDIA GPU host (issue 15).  Writes JSON only under OUT.
#
#   bash deploy/gpu_check.sh [OUT]          # OUT defaults to $OUT, else runs/gpu_check
#
# Stages (each recorded in OUT/gpu_check.json, the environment in OUT/gpu_env.json, the log in OUT/gpu_check.log):
#   probe      GPU, driver, CUDA, torch, ONNX Runtime providers, TensorRT and libnvinfer on this machine
#   install    a venv (system site packages, so the host's CUDA torch is used) with edgeguard and tensorrt +
#              cuda-python from the registry, or from the wheels in $EDGEGUARD_WHEELS (offline hosts)
#   artifacts  demo CNN and ResNet-18 on digits, watermarked; FP32, INT8-QDQ (tensorrt target), heuristic-defended
#              INT8 and FP32, ModelGuard-W, MagicGuard-guarded and gaussian-defended FP32 ONNX; CPU goldens (ONNX
#              Runtime) with the vault's triggers.  The gaussian head draws noise per query and TensorRT ignores its
#              seed: its engine gets a statistical check (accuracy within 2 points of the ONNX file), not goldens
#   engines    per ONNX: build (strongly typed; FP16 too on TensorRT 10), golden-check, verify watermark and
#              fragile triggers (enrolled on the engine), attack extract (budget 500) through the TrtRunner
#   bench      ORT-CPU vs ORT-CUDA vs TRT FP16 vs TRT INT8 at batch 1 and 64
#   tests      pytest -m tensorrt
#
# Exit codes: 0 all passed, 1 a check failed, 3 no GPU or no TensorRT here (nothing else is attempted).
# GPU_CHECK_ALLOW_CPU=1 runs past the probe without a GPU, for testing the script with a fake tensorrt;
# GPU_CHECK_PYTHON=PY uses that interpreter instead of making a venv; GPU_CHECK_QUICK=1 trains for one epoch;
# GPU_CHECK_MODELS=demo limits the models; GPU_CHECK_FRAGILE=0 skips fragile enrolment on the engines.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/runs/gpu_check}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
log() { echo "[gpu_check] $*" | tee -a "$LOG" >&2; }

BASE_PY="${GPU_CHECK_BASE_PYTHON:-python3}"
command -v "$BASE_PY" >/dev/null || { log "no $BASE_PY here"; exit 3; }

# --- probe: needs only the standard library (and reports what else it finds) ---
"$BASE_PY" "$REPO/deploy/gpu_check.py" probe --out "$OUT_DIR" 2>>"$LOG"
rc=$?
if [ "$rc" -ne 0 ] && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    log "probe: no usable NVIDIA GPU here (exit $rc); see $OUT_DIR/gpu_env.json"
    exit 3
fi

# --- install ---
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY="$GPU_CHECK_PYTHON"
    log "install: using $PY as it is"
else
    VENV="${GPU_CHECK_VENV:-/tmp/edgeguard-gpu-venv}"
    "$BASE_PY" -m venv --system-site-packages "$VENV" >>"$LOG" 2>&1 || { log "install: cannot make a venv at $VENV"; exit 3; }
    PY="$VENV/bin/python"
    # --system-site-packages sees the base interpreter's packages only; when python3 is itself a venv (a CUDA
    # image's torch venv), a .pth file adds that venv's site-packages too.
    "$BASE_PY" -c 'import site; print("\n".join(site.getsitepackages()))' \
        >"$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_check_parent.pth"
    PIP=("$PY" -m pip install -q --disable-pip-version-check --retries 1 --timeout 20)
    if [ -n "${EDGEGUARD_WHEELS:-}" ]; then
        PIP+=(--no-index --find-links "$EDGEGUARD_WHEELS")
    fi
    # edgeguard itself without touching the host's torch; then its missing pure-Python needs; then the trt extra.
    timeout 600 "${PIP[@]}" --no-deps --no-build-isolation "$REPO" >>"$LOG" 2>&1 || { log "install: edgeguard did not install"; }
    missing=$("$PY" - <<'EOF'
import importlib.util
need = {"torchao": "torchao>=0.18,<0.19", "onnxscript": "onnxscript", "click": "click", "rich": "rich",
        "yaml": "pyyaml", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "PIL": "pillow", "onnx": "onnx",
        "onnxruntime": "onnxruntime", "pytest": "pytest"}
print(" ".join(spec for mod, spec in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
    if [ -n "$missing" ]; then
        log "install: $missing"
        timeout 600 "${PIP[@]}" $missing >>"$LOG" 2>&1 || log "install: some of ($missing) did not install"
    fi
    "$PY" -c "import tensorrt" >/dev/null 2>&1 || timeout 900 "${PIP[@]}" tensorrt cuda-python >>"$LOG" 2>&1 \
        || log "install: pip install tensorrt cuda-python failed (last lines of $LOG)"
fi
"$PY" "$REPO/deploy/gpu_check.py" install --out "$OUT_DIR" 2>>"$LOG"
rc=$?
if [ "$rc" -ne 0 ]; then
    log "install: edgeguard, tensorrt or cuda-python cannot be imported (exit $rc); see $OUT_DIR/gpu_check.json"
    tail -n 5 "$LOG" >&2
    exit "$rc"
fi

# --- artifacts, engines, bench, tests ---
"$PY" "$REPO/deploy/gpu_check.py" run --out "$OUT_DIR" 2>>"$LOG"
rc=$?
log "done (exit $rc): $OUT_DIR/gpu_check.json"
exit "$rc"
