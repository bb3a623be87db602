#!/usr/bin/env bash
# Prepare the GPU check kit in .device/ (ignored by git), then print the device calls to make.
#
#   bash scripts/device/pack.sh [REPOSITORY]
#
# REPOSITORY: a model repository holding the three calibrated models (default: build one
# from models/weights/*.pt into .device/build with scripts/build_repository.sh).
# What it writes:
#   .device/kit/wheels/      Python 3.12 manylinux wheels the engine needs that the GPU
#                            machine lacks (pydantic and its binary core, ...)
#   .device/kit/repository/  stage ONNX files, manifest.json and calibration.json per model
#   .device/kit/images.npz   512 Fashion-MNIST test images and labels
#   .device/kit/wheel.txt    the onnxruntime-gpu wheel's file name and sha256
#   .device/parts/NN         the onnxruntime-gpu wheel (about 244 MiB) in parts that each fit
#                            one call beside the working tree (64 MiB a call in all)
#   .device/calls.txt        the calls, in order: what each carries and runs
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
CALL_LIMIT=$((64 * 1024 * 1024))
MARGIN=$((3 * 1024 * 1024))
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf .device/kit .device/parts .device/calls.txt
mkdir -p .device/kit/wheels .device/kit/repository .device/parts .device/download

echo "== wheels (Python 3.12, manylinux x86-64)"
ORT_VERSION=$(version onnxruntime-gpu)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
download() {
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$1" "${@:2}"
}
download .device/download "onnxruntime-gpu==$ORT_VERSION"
# what the engine imports and the GPU machine's image does not hold (numpy, protobuf,
# flatbuffers, packaging and sympy are there)
download .device/kit/wheels "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)"
WHEEL=$(ls .device/download/onnxruntime_gpu-"$ORT_VERSION"-cp312-*.whl)
echo "$(basename "$WHEEL") $(sha256sum "$WHEEL" | cut -d' ' -f1)" > .device/kit/wheel.txt

echo "== model repository"
SOURCE=${1:-}
if [ -z "$SOURCE" ]; then
    SOURCE=.device/build
    bash scripts/build_repository.sh "$SOURCE"
fi
for folder in "$SOURCE"/*/; do
    name=$(basename "$folder")
    [ -f "$folder/calibration.json" ] || { echo "skip $name: not calibrated"; continue; }
    mkdir -p ".device/kit/repository/$name"
    cp "$folder"/manifest.json "$folder"/calibration.json "$folder"/stage_*.onnx ".device/kit/repository/$name/"
done

echo "== test images"
$PY - <<'PYTHON'
import numpy as np
from exitserve.models.data import load_splits
test = load_splits("fashion-mnist").test
np.savez_compressed(".device/kit/images.npz", images=test.images[:512], labels=test.labels[:512])
PYTHON

echo "== parts"
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s}')
kit=$(du -sb .device/kit | cut -f1)
part=$((CALL_LIMIT - tree - MARGIN))
[ "$part" -gt $((8 * 1024 * 1024)) ] || { echo "the working tree ($tree bytes) leaves no room for parts"; exit 1; }
split -b "$part" -d -a 2 "$WHEEL" .device/parts/
parts=(.device/parts/*)
last=${parts[-1]}
last_size=$(stat -c %s "$last")

{
    echo "# device calls, in order, back to back (the machine is released after about 30 s idle)."
    echo "# working tree $tree bytes; parts of $part bytes; kit $kit bytes"
    for p in "${parts[@]}"; do
        if [ "$p" = "$last" ] && [ $((last_size + kit)) -le $((part)) ]; then
            break
        fi
        echo "carry=[\"$p\"]  command=bash scripts/device/on_device.sh receive $(basename "$p")"
    done
    if [ $((last_size + kit)) -le $((part)) ]; then
        echo "carry=[\"$last\", \".device/kit\"]  command=bash scripts/device/on_device.sh receive $(basename "$last") && bash scripts/device/on_device.sh run"
    else
        echo "carry=[\".device/kit\"]  command=bash scripts/device/on_device.sh run"
    fi
} > .device/calls.txt
cat .device/calls.txt
