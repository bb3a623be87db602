#!/usr/bin/env bash
# Runs on the GPU machine, in the repository copy (see docs/gpu.md and .device/calls.txt).
#   on_device.sh receive NN   keep the carried wheel part .device/parts/NN in /tmp/kit
#   on_device.sh run          reassemble and install the wheels, run the check, results to $OUT
set -euo pipefail
KIT=/tmp/kit
mkdir -p "$KIT"
case "${1:-}" in
receive)
    cp ".device/parts/$2" "$KIT/part-$2"
    echo "have $(ls "$KIT" | wc -l) parts, $(du -sh "$KIT" | cut -f1)"
    ;;
run)
    read -r wheel sha < .device/kit/wheel.txt
    cat "$KIT"/part-* > "$KIT/$wheel"
    echo "$sha  $KIT/$wheel" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$KIT/$wheel" .device/kit/wheels/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    out=${OUT:-runs}
    mkdir -p "$out"
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    status=0
    python3 scripts/device/check.py --provider cuda --repository .device/kit/repository \
        --images-file .device/kit/images.npz --out "$out/device_check.json" 2>&1 | tee "$out/check.log" || status=$?
    exit "$status"
    ;;
*)
    echo "usage: on_device.sh receive NN | run" >&2
    exit 2
    ;;
esac
