#!/usr/bin/env bash
# Verify the TensorRT target on a machine with an NVIDIA GPU and TensorRT 10.x or 11.x:
#   pip install -c constraints.txt -e ".[tensorrt,dev]"   (tensorrt comes from NVIDIA's index)
#   scripts/verify_tensorrt.sh
# Runs the TensorRT integration tests, builds FP32/FP16/INT8 engines of every zoo model (each
# gated on accuracy against the FP32 ONNX), then benchmarks them. Nothing here runs in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import tensorrt; print('TensorRT', tensorrt.__version__)"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
"$PY" -m pytest -m tensorrt tests/test_tensorrt.py -rs
for model in digits_cnn efficientnet_lite0 minilm_l6; do
  "$PY" -m enginekit build -m "$model" --targets tensorrt --precisions fp32,fp16,int8 -o "artifacts/verify-tensorrt/$model"
done
"$PY" -m studies.tensorrt --root artifacts/verify-tensorrt
