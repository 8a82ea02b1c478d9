#!/usr/bin/env bash
# One-shot check of the CUDA paths on a lent GPU machine (PyTorch with CUDA, no package registry, no TensorRT):
# calibration, one sensitivity ranking and COCO evaluation of the real YOLOv6Lite-S on cuda:0 against the same on
# the CPU (same top-10, mAP within 0.002, amax within 1e-5 relative), with timings -> $OUT/gpu_check.json.
#
# Prepare here, in the repository root (both folders are git-ignored, and travel with `carry`):
#   .whl/    wheels the machine lacks (pytorch-quantization 2.1.3, pycocotools, onnxsim), downloaded for its
#            Python 3.12 as the device README says
#   .carry/  the checkpoint and the images: yolov6lite_s_coco_fused.pt, instances_val.json, val/, train/
# then run:  benchmarks/gpu_check.sh   (carry: .whl .carry)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
DATA="${GPU_CHECK_DATA:-.carry}"
RESULTS="${OUT:-runs/gpu_check}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --weights "$DATA/yolov6lite_s_coco_fused.pt" --val-data "$DATA/instances_val.json" \
    --val-images "$DATA/val" --calib-images "$DATA/train" --devices cpu "${GPU_CHECK_DEVICE:-cuda:0}" \
    --output-dir runs/gpu_check --json "$RESULTS/gpu_check.json" --no-progress "$@"
