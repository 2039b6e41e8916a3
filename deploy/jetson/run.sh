#!/usr/bin/env bash
# On the Jetson host: record the power mode, then build + check the engine inside the container.
# Usage: deploy/jetson/run.sh MODEL_DIR [device_check.py options, e.g. --vault /models/vault --fp16]
# MODEL_DIR holds model.onnx and golden.npz (and optionally vault/); results land in MODEL_DIR.
set -euo pipefail

if [[ $# -lt 1 || ! -d "$1" ]]; then
    echo "usage: $0 MODEL_DIR [device_check.py options]" >&2
    exit 2
fi
model_dir="$(cd "$1" && pwd)"
shift
image="${EDGEGUARD_IMAGE:-edgeguard-jetson:latest}"

# nvpmodel and jetson_clocks live on the host, not in the container: record them here.
{
    echo "# nvpmodel -q"
    sudo -n nvpmodel -q 2>&1 || echo "nvpmodel unavailable"
    echo "# jetson_clocks --show"
    sudo -n jetson_clocks --show 2>&1 || echo "jetson_clocks unavailable"
} > "$model_dir/power.txt"

docker run --rm --runtime nvidia --ipc=host --user "$(id -u):$(id -g)" \
    -v "$model_dir":/models \
    -v /etc/nv_tegra_release:/etc/nv_tegra_release:ro \
    "$image" \
    python3 /opt/edgeguard/deploy/jetson/device_check.py \
        --onnx /models/model.onnx --golden /models/golden.npz --out-dir /models \
        --power-file /models/power.txt "$@"
